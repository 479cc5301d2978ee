"""stage=reward: Bradley-Terry reward model, its memory check and heuristic fallback, one interface."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import compose, requires_real_data, sectune, sentencepiece_like_tokenizer
from sectune.errors import ConfigError
from sectune.inference import cut_middle
from sectune.models import reward_model as RM

REWARD = ["stage=reward", "loss=bradley_terry", "dataset=auth_preferences", "logger=none"]


def test_shared_prompt_rows_score_each_completion_as_alone(monkeypatch):
    """A prompt encoded once with all its completions gives every completion the score it gets alone."""
    from sectune.models import modeling

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
    # a repeated (prompt, completion) is scored once and its score handed to every index asking for it
    scored = []
    real = RM.sequence_rewards
    monkeypatch.setattr(RM, "sequence_rewards", lambda m, b: scored.append(len(b["seq_ends"])) or real(m, b))
    scorer.batch_size = 8
    got = scorer.score([p1, p2, p1, p1, p2], ["{}", "nope", "{}", '{"verdict":"benign"', "nope"])
    assert scored == [3]
    torch.testing.assert_close(torch.tensor(got), torch.tensor([alone[2], alone[4], alone[2], alone[1], alone[4]]), rtol=1e-4, atol=1e-4)


def test_pair_metrics_scores_chosen_and_rejected_in_one_call():
    from sectune.stages.reward import pair_metrics

    calls = []
    table = {"good": 2.0, "bad": 1.0, "worse": 3.0}

    def score(prompts, completions):
        calls.append(len(prompts))
        return [table[c] + (0.5 if p == "p2" else 0.0) for p, c in zip(prompts, completions)]

    pairs = [{"prompt": "p1", "chosen": "good", "rejected": "bad", "kind": "verdict"},
             {"prompt": "p1", "chosen": "good", "rejected": "worse", "kind": "counts"},
             {"prompt": "p2", "chosen": "good", "rejected": "bad", "kind": "verdict"}]
    m = pair_metrics(score, pairs)
    assert calls == [6]
    assert m["reward_accuracy"] == pytest.approx(2 / 3) and m["reward_margin"] == pytest.approx((1 - 1 + 1) / 3)
    assert m["reward_accuracy_verdict"] == 1.0 and m["reward_accuracy_counts"] == 0.0 and m["heldout_pairs"] == 3


def test_long_prompt_is_cut_in_the_middle_and_the_completions_kept():
    """Cut from its start, a long prompt lost BOS and the instruction (Llama-2/3 rows started mid-address); now cut as
    infer cuts it, keeping its head and the answer cue (an audit, session 42)."""
    from sectune.models import modeling

    tok = modeling.load_tokenizer(compose([]))
    prompt = "Analyse these logs.\n### Logs:\n" + "line of logs " * 200 + "\n### Analysis:\n"
    enc, cut = RM.encode_group(tok, prompt, ['{"verdict":"benign"}', "x"], 64)
    assert cut > 0 and len(enc["prompt_ids"]) + len(enc["completion_ids"][0]) == 64
    assert enc["completion_ids"][0][-1] == tok.eos_token_id and tok.decode(enc["completion_ids"][0][:-1]) == '{"verdict":"benign"}'
    whole = tok(prompt)["input_ids"]
    assert enc["prompt_ids"] == cut_middle(whole, len(whole) - cut)
    text = tok.decode(enc["prompt_ids"])
    assert text.startswith("Analyse these logs.") and text.endswith("### Analysis:\n")


def test_a_completion_is_the_tokens_it_adds_after_its_prompt_as_sft_and_generation_see_it():
    """Tokenized alone, a SentencePiece tokenizer wrote the answer as "▁{..." where SFT (TRL splits prompt + answer) and
    generation after the prompt's newline write "{...": the reward model judged a tokenization the policy never emits
    (an audit, session 42)."""
    tok = sentencepiece_like_tokenizer()
    prompt, answer = "line of logs\n### Analysis:\n", '{"verdict":"benign"}'
    alone = tok(answer, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone)[0].startswith("▁")  # the case this guards
    p, full = tok(prompt)["input_ids"], tok(prompt + answer)["input_ids"]
    enc, cut = RM.encode_group(tok, prompt, [answer], 256)
    assert cut == 0 and enc["prompt_ids"] == p and enc["completion_ids"][0] == full[len(p):] + [tok.eos_token_id] != alone


def test_a_completions_score_does_not_depend_on_the_length_of_its_siblings():
    """An audit (session 41): a long prompt was cut by its group's longest completion, so a correct answer scored 0.75
    alone and 0.31 beside a rambling sibling in its GRPO group."""
    from sectune.models import modeling

    cfg = compose(["stage=reward", "dataset=auth_preferences", "lora=none"])
    path = modeling.model_path(cfg)
    tok = modeling.load_tokenizer(cfg, path)
    torch.manual_seed(0)
    model = modeling.load_model(cfg, task="seq_cls", num_labels=1, path=path).eval()
    model.config.pad_token_id = tok.pad_token_id
    prompt, answer, ramble = "line of logs " * 60, '{"verdict":"malicious"}', '{"verdict":"benign","summary":"' + "x " * 30 + '"}'
    scorer = RM.TrainedRewardModel(model, tok, 64, batch_size=4)
    alone = scorer.score([prompt, prompt], [answer, ramble])  # each alone: two groups of one (their cuts differ)
    assert RM.encode_group(tok, prompt, [answer], 64)[1] != RM.encode_group(tok, prompt, [ramble], 64)[1]
    single = [scorer.score([prompt], [c])[0] for c in (answer, ramble)]
    torch.testing.assert_close(torch.tensor(alone), torch.tensor(single), rtol=1e-4, atol=1e-4)
    assert RM._same_cut(tok, prompt, [answer, ramble, answer], 64) == [[answer, answer], [ramble]]  # the same cut: one group
    assert RM._same_cut(tok, "short", [answer, ramble], 512) == [[answer, ramble]]


def test_forced_fallback_writes_a_heuristic_that_ranks_pairs(tmp_path):
    run = sectune([*REWARD, "reward.force_fallback=true"], tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    res = run.result
    assert res["metrics"]["fallback"] == 1
    assert res["metrics"]["reward_accuracy"] >= 0.8, res["metrics"]
    assert "HEURISTIC reward model" in run.stdout
    assert res["metrics"]["heldout_split"] == "test"
    # no test pairs: the held-out numbers are the validation pairs', and the result says so (the name alone said test)
    val = sectune([*REWARD, "reward.force_fallback=true", "dataset.test_fraction=0"], tmp_path / "val")
    assert val.returncode == 0 and val.result["metrics"]["heldout_split"] == "validation", val.stderr[-2000:]
    assert "validation pairwise accuracy" in val.stdout
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
    assert "quantization=nf4" in err and "lora=r4_attention" not in err  # levers this run (lora=r4_attention) does not use yet
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


#: the tiny model's reward settings: every corruption kind for every train window, full fine-tune
TINY_REWARD = [*REWARD, "lora=none", "train.learning_rate=1e-3", "train.epochs=3", "train.batch_size=4", "dataset.pairs_per_window=8"]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reward") / "run"
    run = sectune(TINY_REWARD, run_dir, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.slow  # ~4 min of 2 cores (11 min on a loaded box): 3 epochs over 1,624 pairs
@requires_real_data
def test_reward_model_ranks_held_out_pairs(reward_run):
    m = reward_run.result["metrics"]
    assert m["fallback"] == 0 and m["heldout_pairs"] >= 300
    assert m["reward_accuracy"] >= 0.85 and m["reward_accuracy"] > m["reward_accuracy_start"] + 0.3, m
    kinds = {k[len("reward_accuracy_"):]: v for k, v in m.items() if k.startswith("reward_accuracy_") and k != "reward_accuracy_start"}
    assert len(kinds) == 8  # every kind is reported, the hard ones too
    assert kinds["truncated"] >= 0.95 and kinds["schema_invalid"] >= 0.85, kinds
    assert m["reward_margin"] > 0


def test_reward_model_reloads_with_plain_peft_api_and_scores_the_same(tmp_path):
    """A short run of its own (it was a slow test on the quality run's fixture, so make test never checked the reload)."""
    from transformers import AutoModelForSequenceClassification

    run_dir = tmp_path / "run"
    run = sectune([*TINY_REWARD, "train.max_steps=2", "dataset.max_samples=20"], run_dir)
    assert run.returncode == 0, run.stderr[-2000:]
    folder = run_dir / run.result["artifacts"]["reward_model"]
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()  # lora=none: the whole model, head included
    scorer = RM.load_reward_model(run_dir)
    assert scorer.kind == "trained"
    prompt = "### Logs:\nDec 10 09:32:20 LabSZ sshd[24680]: Failed password for root from 1.2.3.4 port 1 ssh2\n### Analysis:\n"
    ids = scorer.tokenizer(prompt + '{"verdict":"suspicious"}', add_special_tokens=True)["input_ids"] + [scorer.tokenizer.eos_token_id]
    with torch.no_grad():
        alone = plain(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert scorer.score([prompt], ['{"verdict":"suspicious"}'])[0] == pytest.approx(alone, abs=1e-4)
    # a reward model without its head is refused, not silently random
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    from safetensors.torch import load_file, save_file

    weights = {k: v for k, v in load_file(str(broken / "model.safetensors")).items() if not k.startswith("score.")}
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="score head is not in model.safetensors"):
        RM.load_reward_model(broken)


def test_final_eval_loss_is_computed_in_the_training_precision(tmp_path):
    """An audit (precision): the stage took the model out of accelerate's mixed-precision wrapper for saving and scoring
    (``unwrap_model(keep_fp32_wrapper=False)``, which changes the model in place) before its final ``trainer.evaluate()``,
    so under train.precision=bf16 every evaluation during training ran in bf16 and the eval_loss in result.json in fp32:
    the same weights at step 2 logged 0.6550 and reported 0.6517. The final evaluation is the last one's twin."""
    run = sectune([*REWARD, "train.max_steps=2", "train.eval_steps=2", "dataset.max_samples=40", "train.batch_size=2",
                   "train.precision=bf16"], tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    history = json.loads((tmp_path / "run" / run.result["artifacts"]["train_history"]).read_text())
    assert [step for step, _ in history["eval"]] == [2]
    assert run.result["metrics"]["eval_loss"] == pytest.approx(history["eval"][-1][1], rel=1e-6)


def test_seed_preset_on_the_tiny_model_trains_an_nf4_lora_reward_adapter(tmp_path):
    """+experiment=auth_reward (seed 000: nf4 + double quant, LoRA r4 attention, batch 1, AdamW 2e-5) with the
    tiny model: the quantized path runs for real on CPU and saves adapter + score head, loadable by plain PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = sectune(["+experiment=auth_reward", "model=tiny_llama", "train.max_steps=2", "dataset.max_samples=20", "logger=none"], tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    m = run.result["metrics"]
    assert m["quantized_modules"] > 0 and m["fallback"] == 0 and m["trainable_params"] < m["total_params"] / 10
    # beside it, on the same held-out pairs: the heuristic fallback (the rules' classic baseline); it ranks by rules
    # agreement, so it is right on nearly every pair the corruptions make
    assert m["heuristic_reward_accuracy"] >= 0.8 and "heuristic fallback on the same pairs" in run.stdout
    folder = tmp_path / "run" / run.result["artifacts"]["reward_model"]
    meta = json.loads((folder / RM.META_FILE).read_text())
    assert meta["quantization"] == "nf4" and meta["lora"] is True
    # every quantization setting is kept, and rl scores on them, not on its own (an audit, session 41: the name alone
    # let an rl run with bnb_4bit_quant_type=fp4 score an nf4 reward model on an fp4 base, the score moved 43% of its std)
    assert meta["quantization_settings"]["bnb_4bit_quant_type"] == "nf4" and meta["quantization_settings"]["bnb_4bit_use_double_quant"]
    from sectune.models import shared_reward as SR

    fp4 = compose(["+experiment=auth_reward", "model=tiny_llama", "quantization.bnb_4bit_quant_type=fp4"])
    assert SR.same_quantization(meta, compose(["+experiment=auth_reward", "model=tiny_llama"]).quantization)
    assert not SR.same_quantization(meta, fp4.quantization)
    assert SR.same_quantization({"quantization": "nf4"}, fp4.quantization)  # a file from before: its name alone
    loaded = RM.load_reward_model(folder, fp4)
    base = loaded.model.get_base_model()
    assert base.config.quantization_config.bnb_4bit_quant_type == "nf4"
    RM.check_head(folder)  # the trained score head is in adapter_model.safetensors
    base = AutoModelForSequenceClassification.from_pretrained(meta["base_model"], num_labels=1)
    model = PeftModel.from_pretrained(base, folder)
    assert model.peft_config["default"].task_type == "SEQ_CLS"
    # a reward model whose base is a hub id not on this machine: a named error, no download while scoring
    meta["base_model"] = "HuggingFaceTB/SmolLM-135M-not-cached"
    (folder / RM.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"base_model 'HuggingFaceTB/SmolLM-135M-not-cached' is neither a folder here nor in the local"):
        RM.load_reward_model(folder)


# ------------------------------------------------------------------ reward.init_from: start from the SFT weights
def test_init_from_resolves_full_sft_weights_and_refuses_what_it_cannot_start_from(tmp_path):
    from sectune.models import modeling
    from sectune.stages.reward import start_weights

    def cfg_with(init_from):
        return compose([*REWARD, "model=tiny_llama", *([f"reward.init_from={init_from}"] if init_from else [])])

    assert start_weights(cfg_with(None)) == modeling.model_path(cfg_with(None))  # unset: the base model (seed 000)
    run = tmp_path / "sft_run"  # an SFT run dir whose result.json names full weights
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, run / "model" / "model.safetensors")
    (run / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "artifacts": {"model": "model"}}))
    assert start_weights(cfg_with(run)) == str(run / "model")
    assert start_weights(cfg_with(run / "model")) == str(run / "model")  # or the weights folder itself
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    save_file({"w": torch.ones(2)}, adapter / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=r"reward.init_from=.*adapter.*LoRA adapter; the reward model starts from full SFT weights"):
        start_weights(cfg_with(adapter))
    with pytest.raises(ConfigError, match=r"reward.init_from=.*nowhere.*does not exist"):
        start_weights(cfg_with(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="reward.init_from=sft names a pipeline's sft step"):
        start_weights(cfg_with("sft"))


def test_reward_model_trains_from_the_weights_init_from_names(tmp_path):
    """A reward run with reward.init_from=<full weights> loads those weights (not the base model) and its saved
    adapter names them as its base, so RL scores on the same weights."""
    from safetensors.torch import load_file, save_file

    from sectune.models import modeling

    base = Path(modeling.model_path(compose([*REWARD, "model=tiny_llama"])))
    sft = tmp_path / "sft_weights"
    shutil.copytree(base, sft)
    weights = load_file(str(sft / "model.safetensors"))
    emb = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[emb] = weights[emb] * 3.0  # different weights from the base: the run must start from these
    save_file(weights, str(sft / "model.safetensors"), metadata={"format": "pt"})
    run = sectune([*REWARD, "model=tiny_llama", "lora=r4_attention", "train.max_steps=1", "dataset.max_samples=12",
                   "train.batch_size=2", f"reward.init_from={sft}"], tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"the reward model starts from the SFT weights in {sft}" in run.stdout
    folder = tmp_path / "run" / run.result["artifacts"]["reward_model"]
    assert json.loads((folder / RM.META_FILE).read_text())["base_model"] == str(sft)
    scorer = RM.load_reward_model(tmp_path / "run")
    backbone = scorer.model.get_base_model().model.embed_tokens.weight.detach()
    assert torch.allclose(backbone, weights[emb].to(backbone.dtype))
    # the score statistics GRPO standardises by are saved beside the weights, and unit_score uses them
    meta = json.loads((folder / RM.META_FILE).read_text())
    m = run.result["metrics"]
    assert (meta["score_mean"], meta["score_std"]) == (m["score_mean"], m["score_std"]) == scorer.norm and meta["score_std"] > 0
    prompt, answers = "### Logs:\nx\n### Analysis:\n", ['{"verdict":"benign"}', '{"verdict":"malicious"}']
    raw = torch.tensor(scorer.score([prompt] * 2, answers), dtype=torch.float64)
    expect = torch.sigmoid((raw - meta["score_mean"]) / meta["score_std"])
    assert scorer.unit_score([prompt] * 2, answers) == pytest.approx(expect.tolist(), abs=1e-9)


def test_score_stats_and_unit_score_equal_hand_computed_values():
    from sectune.stages.reward import score_stats

    table = {"c1": 1.0, "c2": 3.0, "r1": 0.0, "r2": 0.0}
    fake = lambda prompts, completions: [table[c] for c in completions]  # noqa: E731
    stats = score_stats(fake, [{"prompt": "p", "chosen": "c1", "rejected": "r1"}, {"prompt": "p", "chosen": "c2", "rejected": "r2"}])
    # scores 1, 3, 0, 0: mean 1, sample std sqrt((0 + 4 + 1 + 1) / 3) = sqrt(2)
    assert stats["score_mean"] == pytest.approx(1.0) and stats["score_std"] == pytest.approx(2 ** 0.5)
    assert stats["score_stats_from"] == 4
    same = score_stats(lambda p, c: [2.0] * len(c), [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert same["score_std"] == 1.0  # no spread: divide by 1, never by 0
    scorer = object.__new__(RM.TrainedRewardModel)
    scorer.norm, scorer.score = (1.0, 2.0), lambda p, c: [1.0, 3.0, -1.0]
    # sigmoid(0) = 0.5, sigmoid(1) = 0.7310586, sigmoid(-1) = 0.2689414
    assert scorer.unit_score(["p"] * 3, ["a", "b", "c"]) == pytest.approx([0.5, 0.7310586, 0.2689414], abs=1e-7)
    scorer.norm = None
    with pytest.raises(ValueError, match="no score statistics"):
        scorer.unit_score(["p"], ["a"])


def test_the_rl_memory_check_plans_without_the_selective_checkpointing_rl_does_not_apply(monkeypatch):
    """stage=rl (TRL's GRPO loop) never applies train.selective_checkpointing, yet its memory check planned with it:
    the activations it estimated were those of a run that recomputes them."""
    from sectune.stages import plan
    from sectune.training import memory

    seen = []
    real = plan.estimate
    monkeypatch.setattr(plan, "estimate", lambda c, *a, **k: seen.append(bool(c.train.selective_checkpointing)) or real(c, *a, **k))
    for stage, loss in (("rl", "grpo"), ("reward", "bradley_terry")):
        memory.memory_check(compose([f"stage={stage}", f"loss={loss}", "reward.memory_limit_gb=100"]), 4)
    assert seen == [False, True]


def test_bradley_terry_loss_is_a_mean_over_the_pairs_of_the_whole_optimizer_step(tmp_path):
    """Prompts with 1, 3, 1 and 2 pairs: batch_size=4 grad_accum=1 and batch_size=2 grad_accum=2 (and 1 × 4) give the
    same gradient and log the same loss. A per-micro-batch mean / grad_accum gave 11% (2 × 2) and 50% (1 × 4) apart."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from conftest import assert_one_step_whatever_the_grad_accum
    from sectune.models import modeling
    from sectune.stages.reward import BradleyTerryTrainer
    from sectune.training import engine

    p = ["Analyze:\nsshd[1]: Failed password for root", "Analyze:\nlogin[2]: session opened for user x",
         "Analyze:\nsshd[3]: Accepted password for y", "Analyze:\nsshd[4]: Invalid user z"]
    good, bad = '{"verdict":"malicious","failed_logins":1}', ['{"verdict":"benign"', "{}", "nope", '{"verdict":"x"}']
    pairs = ([{"prompt": p[0], "chosen": good, "rejected": bad[0]}] + [{"prompt": p[1], "chosen": good, "rejected": b} for b in bad[:3]]
             + [{"prompt": p[2], "chosen": good, "rejected": bad[3]}] + [{"prompt": p[3], "chosen": good, "rejected": b} for b in bad[1:3]])

    def step(bs, ga, cb):
        cfg = compose([*REWARD, "lora=none", "train.precision=fp32", "train.max_steps=1", "train.max_grad_norm=1e9",
                       "train.selective_checkpointing=false", f"train.batch_size={bs}", f"train.grad_accum={ga}", "train.device=cpu"])
        path = modeling.model_path(cfg)
        tok = modeling.load_tokenizer(cfg, path)
        torch.manual_seed(0)
        model = modeling.load_model(cfg, task="seq_cls", num_labels=1, path=path)
        model.config.pad_token_id = tok.pad_token_id
        rows, _ = RM.encode_pair_groups(tok, pairs, 256)
        assert [len(r["pairs"]) for r in rows] == [1, 3, 1, 2]
        args = TrainingArguments(**engine.training_kwargs(cfg, tmp_path / f"{bs}x{ga}", has_eval=False), remove_unused_columns=False,
                                 label_names=[], prediction_loss_only=True)
        trainer = BradleyTerryTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                      data_collator=RM.SharedPromptCollator(tok.pad_token_id), callbacks=[cb])
        trainer.train()
        return trainer

    assert_one_step_whatever_the_grad_accum(step)


def test_a_failed_reward_runs_reward_model_folder_is_refused_as_its_run_dir_is(tmp_path):
    """An audit (session 36): rl.reward_model=<failed reward run> was refused, <failed reward run>/reward_model accepted
    (its score_mean NaN), and GRPO ended succeeded with a NaN held-out reward."""
    from sectune.models.reward_model import META_FILE, reward_model_dir

    (tmp_path / "run" / "reward_model").mkdir(parents=True)
    (tmp_path / "run" / "reward_model" / META_FILE).write_text("{}")
    (tmp_path / "run" / "result.json").write_text(json.dumps({"stage": "reward", "status": "failed", "artifacts": {}}))
    with pytest.raises(ConfigError, match="says status 'failed'"):
        reward_model_dir(tmp_path / "run" / "reward_model")
    (tmp_path / "run" / "result.json").write_text(json.dumps({"stage": "reward", "status": "succeeded", "artifacts": {}}))
    assert reward_model_dir(tmp_path / "run" / "reward_model") == tmp_path / "run" / "reward_model"
