"""bench/: what a bench prints and how it compares (children faked: no training, no timing asserts). From an audit
of the benches (session 26)."""

import argparse
import ast
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


# bench/contrastive_throughput.py with its children faked (no training, no timing): the sides run interleaved over
# --repeats and the ratio is read from medians, so one slow moment of a shared machine cannot land on one side only.
def test_sides_are_interleaved_and_medians_reported(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import contrastive_throughput as cb

    calls = []
    # the baseline is slow on its first run only (a load spike at the start): one run each would read 3x
    rates = {"three_forwards": [0.1, 0.3, 0.3]}

    def fake(name, args):
        calls.append(name)
        k = sum(c == name for c in calls) - 1
        rate = rates.get(name, [0.45, 0.45, 0.45])[k]
        return {"triplets_per_s": rate, "step_median_s": 1 / rate, "peak_rss_bytes": 2**30, "lm_head_rows_per_step": 48,
                "tokens_per_step": 432, "first_loss": 1.0, "inj_shared_share": 0.5, "inj_shared_share_full_prompts": 0.5,
                "inj_shared_share_train_split": 0.5, "params": 139_000_000}

    monkeypatch.setattr(cb, "run_side", fake)
    monkeypatch.setattr(sys, "argv", ["contrastive_throughput.py", "--repeats", "3"])
    cb.main()
    sides = list(cb.SIDES)
    assert calls == sides + sides[::-1] + sides
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["triplets_per_s_ratio_vs_three_forwards"] == 1.5 and result["repeats"] == 3


# bench/contrastive_throughput.py times a handful of triplets; their injected prompts must share as much prefix with
# the benign prompt as the training split's do, since that share is what sectune's default forward saves.
def test_representative_rows_match_the_split_share(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import contrastive_throughput as cb

    # a split whose first rows share much more than the rest (as the real one: 62% vs 48%)
    shares = [0.9, 0.8, 0.85, 0.9] + [0.1 * (i % 9) for i in range(200)]
    rows = [{"inj_shared": round(100 * s), "inj_ids": [0] * 100, "i": i} for i, s in enumerate(shares)]
    split = statistics.mean(shares)
    picked = cb.representative_rows(rows, 4)
    assert len(picked) == 4 and [r["i"] for r in picked] == sorted(r["i"] for r in picked)
    assert abs(statistics.mean(r["inj_shared"] / 100 for r in picked) - split) < 0.1
    assert abs(statistics.mean(shares[:4]) - split) > 0.3  # what the bench timed before


# bench/gpu_memory.py on a machine without CUDA refuses with a message; when a case's child fails the bench must not
# exit 0 (its JSON line would read as a measurement). Children and CUDA are faked: no GPU needed.
def test_refuses_without_cuda(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_memory as gm
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_memory.py", "--cases", "smollm_full"])
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        gm.main()


def test_failed_case_exits_nonzero(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_memory as gm
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gm.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "CUDA out of memory"))
    monkeypatch.setattr(sys, "argv", ["gpu_memory.py", "--cases", "smollm_full"])
    with pytest.raises(SystemExit) as e:
        gm.main()
    assert e.value.code not in (0, None)
    assert '"failed": ["smollm_full"]' in capsys.readouterr().out


# bench/grpo_throughput.py's summary with the children faked (no training, no timing): completions/s is only the
# same work when both sides generated as many tokens per completion, so the bench must report each side's length.
def fake_side(side, variant, args, length):
    return {"side": side, "variant": variant, "settings": {"beta": 0.0, "gradient_checkpointing": False, "bf16": True, "shared_prompt": side != "trl",
                                                         "learning_rate": 1e-6},
            "params": 21_000_000, "completions_per_s": 2.0 if side == "trl" else 4.0, "step_median_s": 1.0, "sample_s": 0.5, "score_s": 0.1,
            "loss_backward_s": 0.4, "completion_tokens_mean": length, "prompt_tokens_mean": 600.0, "peak_rss_bytes": 2**30,
            "train_wall_s": 5.0, "peak_cuda_bytes": None, "gpu": None}


def test_grpo_bench_reports_each_sides_completion_length(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import grpo_throughput as gb

    lengths = {"trl": 64.0, "sectune": 32.0}  # sectune's completions half as long: half the work per completion
    monkeypatch.setattr(gb, "run_side", lambda side, variant, args: fake_side(side, variant, args, lengths[side]))
    monkeypatch.setattr(gb, "matmul_peak_flops", lambda threads: {"peak_flops": 1e11, "by_size": {}}, raising=False)
    monkeypatch.setattr(sys, "argv", ["grpo_throughput.py", "--quick", "--variants", ""])
    gb.main()
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["grpo_completions_per_s_ratio_vs_trl"] == 2.0
    assert result["completion_tokens_mean_ratio_vs_trl"] == 0.5
    assert result["grpo_completion_tokens_per_s_ratio_vs_trl"] == 1.0
    assert "WARN" in out


# bench/grpo_throughput.py: sectune's side must sample with TRL's GRPOConfig defaults (temperature, top_p,
# repetition penalty), or the two sides draw from different distributions (and do different work per token).
def test_sectune_side_samples_as_trl_defaults(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import grpo_throughput as gb
    from trl import GRPOConfig

    args = argparse.Namespace(prompts=2, warmup=1, steps=2, max_completion_length=64, device="cpu")
    cfg = gb.compose_cfg(args)
    trl = GRPOConfig(output_dir="/tmp/unused", use_cpu=True, per_device_train_batch_size=16, num_generations=8)
    assert float(cfg.generation.repetition_penalty) == trl.repetition_penalty
    assert float(cfg.rl.temperature) == trl.temperature and float(cfg.rl.top_p) == trl.top_p


# The benches' rule: each prints the CPU it ran on and the bf16 matmul peak it measured, and its JSON line holds
# both.
def _json_keys(script: str) -> set[str]:
    """String keys of every dict literal in the script (the result JSON is built from one)."""
    tree = ast.parse((BENCH / script).read_text())
    return {k.value for node in ast.walk(tree) if isinstance(node, ast.Dict) for k in node.keys if isinstance(k, ast.Constant)}


@pytest.mark.parametrize("script", ["grpo_throughput.py", "sft_throughput.py", "contrastive_throughput.py", "reward_throughput.py",
                                    "eval_throughput.py", "constrained_generation.py", "federated_rounds.py", "dora_memory.py"])
def test_bench_reports_cpu_and_bf16_peak(script):
    keys = _json_keys(script)
    assert {"cpu", "bf16_matmul_peak_gflops"} <= keys, f"{script}: its JSON line lacks the CPU model or the measured bf16 peak"


def test_machine_helpers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from contrastive_throughput import cpu_model
    from sft_throughput import matmul_peak_flops

    assert cpu_model().strip()
    peak = matmul_peak_flops(1, seconds=0.05)
    assert peak["peak_flops"] > 0 and set(peak["by_size"]) == {"1024", "2048", "3072"}


def test_the_constrained_generation_bench_really_measures_on_the_tiny_model(monkeypatch):
    """An audit (session 36): the bench's timing wrapper took the constraint's processor(max_new_tokens) only, and
    generate had passed the windows too since grounded decoding came in: every run with --n > 0 (and
    reward_throughput's default) died with a TypeError; the tests here faked the child processes, so none called it."""
    monkeypatch.syspath_prepend(str(BENCH))
    import constrained_generation as C

    r = C.measure(n=2, model="tiny", max_new_tokens=64, batch_size=2)
    assert r["schema_valid_rate_constrained"] == 1.0 and r["constrained_steps"] > 0 and r["constrained_processor_ms_per_step"] > 0
