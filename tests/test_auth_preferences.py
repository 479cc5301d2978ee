"""dataset=auth_preferences: one corruption per pair, its kind recorded, splits by window, user JSONL."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from conftest import compose, requires_real_data, sectune
from sectune.data import auth_preferences as P
from sectune.data.auth_logs import render_completion, validate_analysis
from sectune.errors import ConfigError, DataError

ANALYSIS = {
    "verdict": "malicious", "failed_logins": 7, "accepted_logins": 1, "invalid_users": ["admin", "oracle"],
    "targeted_users": ["root"], "source_ips": [{"ip": "183.62.140.253", "failures": 6}, {"ip": "5.36.59.76", "failures": 1}],
    "brute_force": True, "break_in_attempts": 0,
    "summary": "Malicious: brute force from 183.62.140.253 (6 failures); 7 failed, 1 accepted logins.",
}
BENIGN = {"verdict": "benign", "failed_logins": 0, "accepted_logins": 2, "invalid_users": [], "targeted_users": [],
          "source_ips": [], "brute_force": False, "break_in_attempts": 0, "summary": "Benign: no failed logins; 0 failed, 2 accepted logins."}


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


@pytest.mark.parametrize("analysis", [ANALYSIS, BENIGN], ids=["malicious", "benign"])
@pytest.mark.parametrize("seed", range(6))
def test_each_corruption_changes_what_its_kind_names(analysis, seed):
    chosen = render_completion(analysis)
    assert not validate_analysis(analysis)
    for kind, fn in P.CORRUPTIONS.items():
        text = fn(analysis, random.Random(seed))
        assert text != chosen, kind
        if kind == "truncated":
            assert chosen.startswith(text) and len(text) < len(chosen)
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)
            continue
        bad = json.loads(text)
        diff = _changed(analysis, bad)
        if kind == "schema_invalid":
            assert validate_analysis(bad), text
            continue
        assert not validate_analysis(bad), (kind, validate_analysis(bad))
        if kind == "verdict":
            assert diff == {"verdict"}
        elif kind == "counts":
            counts = diff & {"failed_logins", "accepted_logins", "break_in_attempts"}
            assert len(counts) == 1 and diff <= counts | {"summary"}
            assert f"{bad['failed_logins']} failed, {bad['accepted_logins']} accepted logins" in bad["summary"]
        elif kind == "users":
            assert diff and diff <= {"invalid_users", "targeted_users"}
            before = set(analysis["invalid_users"]) | set(analysis["targeted_users"])
            after = set(bad["invalid_users"]) | set(bad["targeted_users"])
            assert len(before ^ after) == 1
        elif kind == "source_ip":
            assert diff == {"source_ips"} and abs(len(bad["source_ips"]) - len(analysis["source_ips"])) == 1
        elif kind == "brute_force":
            assert diff == {"brute_force"}
        elif kind == "summary":
            assert diff == {"summary"} and not bad["summary"].lower().startswith(analysis["verdict"])


def test_pairs_per_window_draws_distinct_kinds_by_weight():
    rng = random.Random(0)
    kinds = [P._draw_kinds(P.corruption_weights({}), 3, rng) for _ in range(400)]
    assert all(len(set(k)) == 3 for k in kinds)
    counts = Counter(k for ks in kinds for k in ks)
    assert set(counts) == set(P.CORRUPTIONS) and max(counts.values()) < 2 * min(counts.values())  # equal weights
    only = [P._draw_kinds(P.corruption_weights({"truncated": 1, "verdict": 0}), 2, rng) for _ in range(20)]
    assert all(k == ["truncated"] for k in only)
    with pytest.raises(ConfigError, match="unknown kind.*'typo'"):
        P.corruption_weights({"typo": 1})


@requires_real_data
def test_real_pairs_split_by_window_with_every_kind():
    cfg = compose(["dataset=auth_preferences", "stage=reward", "dataset.pairs_per_window=3"])
    splits = P.preference_splits(cfg)
    ids = {s: {p["window_id"] for p in splits[s]} for s in P.SPLITS}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"]) and not (ids["validation"] & ids["test"])
    windows = {s: {p["window"] for p in splits[s]} for s in P.SPLITS}
    assert not (windows["train"] & windows["test"])  # no window's lines in two splits
    n = sum(len(v) for v in ids.values())
    assert len(ids["test"]) == pytest.approx(0.15 * n, abs=2)
    assert Counter(p["window_id"] for p in splits["train"]).most_common(1)[0][1] == 3
    assert set(p["kind"] for p in splits["train"]) == set(P.CORRUPTIONS)
    for p in splits["test"][:20]:
        assert p["chosen"] == render_completion(p["annotation"]) and p["prompt"].endswith("### Analysis:\n")


def test_user_jsonl_pairs_and_bad_lines(tmp_path, capsys):
    good = tmp_path / "pairs.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"p{i % 5}", "chosen": "{\"a\":1}", "rejected": "{\"a\":2}"}) for i in range(20)) + "\n")
    cfg = compose(["dataset=auth_preferences", "stage=reward", f"dataset.path={good}"])
    splits = P.preference_splits(cfg)
    assert sum(map(len, splits.values())) == 20
    prompts = {s: {p["prompt"] for p in splits[s]} for s in P.SPLITS}
    assert not (prompts["train"] & prompts["test"])  # the same prompt never crosses splits
    # ... also when every line carries its own id (a walkthrough found 7 of 20 test prompts in train), and lines
    # sharing an id stay together even under different prompts
    lines = [{"prompt": f"p{i % 20}", "chosen": "{\"a\":1}", "rejected": "{\"a\":2}", "id": f"line{i}"} for i in range(60)]
    lines += [{"prompt": f"q{i}", "chosen": "{\"a\":1}", "rejected": "{\"a\":2}", "id": "shared"} for i in range(3)]
    ids = tmp_path / "pairs_ids.jsonl"
    ids.write_text("\n".join(map(json.dumps, lines)) + "\n")
    splits = P.preference_splits(compose(["dataset=auth_preferences", "stage=reward", f"dataset.path={ids}"]))
    by = {s: {p["prompt"] for p in splits[s]} for s in P.SPLITS}
    assert splits["test"] and not (by["train"] & by["test"]) and not (by["train"] & by["validation"]) and not (by["validation"] & by["test"])
    assert len({s for s in P.SPLITS for p in splits[s] if p["prompt"].startswith("q")}) == 1
    assert len({p["window_id"] for s in P.SPLITS for p in splits[s]}) == 21
    # a window whose lines disagree on "label", or give it on the first pair only (an audit, session 37): it went into
    # two or three splits (36 / 12 / 12 pairs of a 40-line file, test pairs trained on) and the note counted it twice
    lines = []
    for w in range(20):
        lines.append({"prompt": f"window {w}", "chosen": "c", "rejected": "r1", "label": ["benign", "malicious"][w % 2]})
        lines.append({"prompt": f"window {w}", "chosen": "c", "rejected": "r2", **({"label": "suspicious"} if w % 3 == 0 else {})})
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(map(json.dumps, lines)) + "\n")
    splits = P.preference_splits(compose(["dataset=auth_preferences", "stage=reward", f"dataset.path={labels}"]))
    by = {s: {p["window_id"] for p in splits[s]} for s in P.SPLITS}
    assert sum(map(len, splits.values())) == 40 and len(by["train"] | by["validation"] | by["test"]) == 20
    assert not (by["train"] & by["test"]) and not (by["train"] & by["validation"]) and not (by["validation"] & by["test"])
    assert "20 window(s) without a" in capsys.readouterr().out
    bom = tmp_path / "bom.jsonl"  # Windows tools write a byte-order mark first
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode() + b"\r\n")
    assert [p["prompt"] for p in P.read_pairs_jsonl(bom)] == ["p"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3: missing or non-string rejected"):
        P.read_pairs_jsonl(bad)
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: invalid JSON"):
        P.read_pairs_jsonl(bad)
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match="not UTF-8"):
        P.read_pairs_jsonl(bad)


def test_bad_pairs_line_exits_nonzero_naming_file_and_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n[1, 2]\n')
    run = sectune(["stage=reward", "loss=bradley_terry", "dataset=auth_preferences", f"dataset.path={bad}", "logger=none"], tmp_path / "run")
    assert run.returncode == 2
    assert f"{bad}: line 2: expected an object" in run.stderr
    assert run.result["status"] == "failed" and not (tmp_path / "run" / "reward_model").exists()


def test_preference_settings_that_could_not_mean_what_they_say_are_refused(tmp_path, capsys):
    """An audit (session 36): dataset.corruptions with inf crashed in random.choices (no key named) and with nan dropped
    its kind; pairs_per_window above the weighted kinds was capped silently; a pairs file's kind "start" wrote over
    reward_accuracy_start; and loss.* values another objective reads trained as without them, without a word."""
    from sectune.loss_settings import warn_unread_loss

    for w in ("inf", "nan"):
        with pytest.raises(ConfigError, match="dataset.corruptions: weights must be finite numbers >= 0"):
            P.corruption_weights({"verdict": float(w), "counts": 1.0})
    with pytest.raises(ConfigError, match=r"dataset.pairs_per_window=3: .*weights 1 \(verdict\); at most 1"):
        P.build_pairs(compose(["dataset=auth_preferences", "stage=reward", "+dataset.corruptions={verdict: 1}",
                               "dataset.pairs_per_window=3"]))
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "kind": "start"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl: line 1: kind='start'"):
        P.read_pairs_jsonl(f)
    warn_unread_loss(compose(["stage=dpo", "loss=dpo", "loss.margin=2", "loss.key_weight=5"]))
    assert "loss.key_weight=5.0, loss.margin=2.0: not read by loss=dpo (it reads loss.beta, loss.label_smoothing)" in capsys.readouterr().err
    warn_unread_loss(compose(["stage=rl", "loss=grpo", "loss.beta=0.1"]))
    assert capsys.readouterr().err == ""
    # sft, classify and contrastive read what they read whatever loss=… names (session 40: the rest was taken silently)
    warn_unread_loss(compose(["stage=sft", "loss.margin=2", "loss.key_weight=5", "loss.label_smoothing=0.1"]))
    assert "loss.margin=2.0: not read by stage=sft (it reads loss.label_smoothing, loss.key_weight, loss.weighted_keys)" in capsys.readouterr().err
    warn_unread_loss(compose(["stage=classify", "loss=cross_entropy", "loss.key_weight=5", "loss.class_weights=balanced"]))
    assert "loss.key_weight=5.0: not read by stage=classify" in capsys.readouterr().err
    warn_unread_loss(compose(["stage=contrastive", "loss=causal_contrastive", "loss.lambda_task=2"]))
    assert capsys.readouterr().err == ""


def test_a_setting_only_another_setting_reads_is_said_when_set_alone(tmp_path, capsys):
    """Session 40 left these silent: sft.warmup_epochs without sft.warmup_lines, classify.pooling with the generative head
    (each trained as without it). Now a warning names both keys."""
    from sectune import runner
    from sectune.stages import classify, sft

    assert sft.warmup(runner.RunContext(cfg=compose(["stage=sft", "sft.warmup_epochs=3"]), run_dir=tmp_path / "a")) is None
    assert "sft.warmup_epochs=3.0 does nothing without a warm-up: set sft.warmup_lines=N" in capsys.readouterr().err
    assert sft.warmup(runner.RunContext(cfg=compose(["stage=sft"]), run_dir=tmp_path / "b")) is None
    assert capsys.readouterr().err == ""
    cfg = compose(["stage=classify", "dataset=cic_iot_2023_merged", "classify.head=generative", "classify.pooling=last",
                   "classify.folds=0"])  # folds=0 stops the stage right after its first checks
    with pytest.raises(ConfigError, match="classify.folds=0"):
        classify.run(runner.RunContext(cfg=cfg, run_dir=tmp_path / "c"))
    assert "classify.pooling=last is the seq_cls head's; classify.head=generative" in capsys.readouterr().err
