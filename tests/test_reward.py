"""stage=reward: Bradley-Terry reward model, its memory check and heuristic fallback, one interface."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import compose, requires_real_data, sectune
from sectune import reward_model as RM
from sectune.errors import ConfigError

REWARD = ["stage=reward", "loss=bradley_terry", "dataset=auth_preferences", "logger=none"]


def test_shared_prompt_rows_score_each_completion_as_alone():
    """A prompt encoded once with all its completions gives every completion the score it gets alone."""
    from sectune import modeling

    cfg = compose(["stage=reward", "dataset=auth_preferences", "lora=none"])
    path = modeling.model_path(cfg)
    tok = modeling.load_tokenizer(cfg, path)
    model = modeling.load_model(cfg, task="seq_cls", num_labels=1, path=path).eval()
    model.config.pad_token_id = tok.pad_token_id
    p1, p2 = "Analyze:\nsshd[1]: Failed password for root", "Analyze:\nlogin[2]: session opened for user x"
    pairs = [{"prompt": p1, "chosen": '{"verdict":"malicious"}', "rejected": '{"verdict":"benign"'},
             {"prompt": p1, "chosen": '{"verdict":"malicious"}', "rejected": "{}"},
             {"prompt": p2, "chosen": '{"verdict":"benign","failed_logins":0}', "rejected": "nope"}]
    rows, _ = RM.encode_pair_groups(tok, pairs, 512)
    assert [len(r["completion_ids"]) for r in rows] == [3, 2] and rows[0]["pairs"] == [[0, 1], [0, 2]]
    batch = RM.SharedPromptCollator(tok.pad_token_id)(rows)
    assert batch["input_ids"].shape[1] % 64 == 0 and batch["pairs"].tolist() == [[0, 1], [0, 2], [3, 4]]
    with torch.no_grad():
        grouped = RM.sequence_rewards(model, batch)
        alone = [model(input_ids=torch.tensor([r["prompt_ids"] + c])).logits[0, 0].item() for r in rows for c in r["completion_ids"]]
    torch.testing.assert_close(grouped, torch.tensor(alone), rtol=1e-4, atol=1e-4)
    assert grouped.std() > 0  # distinct completions, distinct scores
    scorer = RM.TrainedRewardModel(model, tok, 512, batch_size=1)  # the scorer regroups by prompt, in input order
    torch.testing.assert_close(torch.tensor(scorer.score([p2, p1, p1], ["nope", '{"verdict":"benign"', "{}"])),
                               torch.tensor([alone[4], alone[1], alone[2]]), rtol=1e-4, atol=1e-4)


def test_long_prompt_is_cut_from_its_start_and_the_completions_kept():
    from sectune import modeling

    tok = modeling.load_tokenizer(compose([]))
    enc, cut = RM.encode_group(tok, "line of logs " * 200, ['{"verdict":"benign"}', "x"], 64)
    assert cut > 0 and len(enc["prompt_ids"]) + len(enc["completion_ids"][0]) == 64
    assert enc["completion_ids"][0][-1] == tok.eos_token_id and tok.decode(enc["completion_ids"][0][:-1]) == '{"verdict":"benign"}'


def test_forced_fallback_writes_a_heuristic_that_ranks_pairs(tmp_path):
    run = sectune([*REWARD, "reward.force_fallback=true"], tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    res = run.result
    assert res["metrics"]["fallback"] == 1
    assert res["metrics"]["reward_accuracy"] >= 0.8, res["metrics"]
    assert "HEURISTIC reward model" in run.stdout
    scorer = RM.load_reward_model(tmp_path / "run")
    assert scorer.kind == "heuristic"
    chosen = '{"verdict":"benign","failed_logins":0,"accepted_logins":1,"invalid_users":[],"targeted_users":[],"source_ips":[],' \
             '"brute_force":false,"break_in_attempts":0,"summary":"Benign: no failed logins; 0 failed, 1 accepted logins."}'
    prompt = "### Logs:\nDec 10 09:32:20 LabSZ sshd[24680]: Accepted password for fztu from 119.137.62.142 port 49116 ssh2\n### Analysis:\n"
    good, bad = scorer.score([prompt, prompt], [chosen, chosen[:60]])
    assert good > bad


def test_memory_check_stops_or_falls_back_with_the_estimate(tmp_path):
    stop = sectune([*REWARD, "reward.memory_limit_gb=0.01", "dataset.max_samples=30"], tmp_path / "stop")
    assert stop.returncode == 2
    err = stop.stderr.strip().splitlines()[-1]
    assert "predicted peak" in err and "0.01 GB reward.memory_limit_gb" in err and "reward.fallback=heuristic" in err
    assert stop.result["status"] == "failed" and not (tmp_path / "stop" / "reward_model").exists()
    fall = sectune([*REWARD, "reward.memory_limit_gb=0.01", "reward.fallback=heuristic", "dataset.max_samples=30"], tmp_path / "fall")
    assert fall.returncode == 0, fall.stderr[-2000:]
    assert fall.result["metrics"]["fallback"] == 1
    meta = json.loads((tmp_path / "fall" / "reward_model" / RM.META_FILE).read_text())
    assert meta["kind"] == "heuristic" and "predicted peak" in meta["reason"]


def test_reward_model_dir_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no reward model there"):
        RM.load_reward_model(tmp_path)
    (tmp_path / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "artifacts": {}}))
    with pytest.raises(ConfigError, match="not a succeeded stage=reward run"):
        RM.load_reward_model(tmp_path)
