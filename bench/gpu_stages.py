"""Seed 000's analyst (``+experiment=auth_grpo``) as one command on one GPU: each pipeline step's predicted peak
against the peak it measured (CUDA only, but for ``--dry-run``).

The model is the preset's architecture (DeepSeek-R1-Distill-Llama-8B) with random weights, saved once and given to
the command as ``model.name_or_path`` (the same ``from_pretrained`` with nf4 + double quant, the preset's
``device_map``/``max_memory``): ``sectune +experiment=auth_grpo 'pipeline.steps=[sft,reward,rl]'`` with each step cut
to ``--steps`` optimizer steps of the preset's batch (the memory of a step does not depend on how many run). A random
model never writes EOS, so every GRPO completion runs to ``rl.max_completion_length``: the longest the plan assumes.

Predicted = what the step's memory check holds against the GPU (``sectune.training.memory.step_need``: SFT one
sequence per example, the reward step's chosen + rejected, GRPO's G completions and the reward model it loads beside
the policy; the GPU side of the preset's ``max_memory`` split), composed exactly as the pipeline composes the step. Measured = the step's
``peak_cuda_footprint_bytes`` in its result.json (torch's peak reserved + the CUDA context outside it) and
``peak_cuda_bytes`` (peak allocated), as ``bench/gpu_memory.py`` measures.

    python bench/gpu_stages.py                      # one H100: ~5 min (16 GB of random weights written once)
    python bench/gpu_stages.py --dry-run            # the same path on a CPU with a 2-layer, 64-wide model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

STEPS = ["sft", "reward", "rl"]
#: sequences per example each step's memory check plans (sectune.stages.reward / rl call memory_check the same way)
SEQUENCES = {"sft": lambda cfg: 1, "reward": lambda cfg: 2, "rl": lambda cfg: int(cfg.rl.num_generations)}


def overrides(model_path: str, steps: int, device: str) -> list[str]:
    out = ["+experiment=auth_grpo", f"model.name_or_path={model_path}", "logger=none", f"train.device={device}",
           f"pipeline.steps=[{','.join(STEPS)}]", f"+pipeline.overrides.sft.train.max_steps={steps}",
           f"pipeline.overrides.reward.train.max_steps={steps}", f"pipeline.overrides.rl.train.max_steps={steps}",
           # memory, not quality: no held-out table (three more loads of the model) and a short greedy check in rl
           "pipeline.heldout_table=false", "+pipeline.overrides.rl.rl.heldout_windows=4"]
    if device == "cpu":  # the dry run: a CPU holds no nf4 model under device_map/max_memory, and plans no GPU
        out += ["model.device_map=null", "model.max_memory=null"]
    return out


def predictions(ovr: list[str], run_dir: Path) -> dict:
    """Each step's predicted need, its config composed as stage=pipeline composes it."""
    from sectune.stages import pipeline
    from sectune.training.memory import step_need

    cfg = pipeline.compose(ovr)
    base = pipeline.step_overrides_base(ovr)
    out = {}
    for name in STEPS:
        step = pipeline.compose_step(cfg, base, name, run_dir, STEPS)
        need, budget, info = step_need(step.cfg, SEQUENCES[name](step.cfg))
        out[name] = {"predicted": int(need), "budget_total": int(budget.total), "sequences": info["batch_size"],
                     "seq_len": info["seq_len"], "offload": bool(info.get("offload")),
                     "reward_model_bytes": info["reward_model_bytes"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per training step of the pipeline")
    ap.add_argument("--work", default="/tmp/sectune_gpu_stages")
    ap.add_argument("--timeout", type=float, default=None, help="stop the pipeline after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU with a 2-layer, 64-wide model (no figures)")
    args = ap.parse_args()
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_stages.py needs a CUDA device (or --dry-run)")
    from gpu_memory import random_weights

    from sectune.stages import pipeline

    work = Path(args.work)
    t0 = time.perf_counter()
    path = random_weights(pipeline.compose(["+experiment=auth_grpo"]), work, device=device, shrink=args.dry_run)
    print(f"random weights at {path} [{time.perf_counter() - t0:.0f}s]", flush=True)
    run_dir = work / f"run_{int(time.time())}"
    ovr = overrides(str(path), args.steps, device)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        code = subprocess.run([sys.executable, "-m", "sectune", *ovr, f"hydra.run.dir={run_dir}"], env=env,
                              timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:  # the steps that finished still have their result.json
        code = f"timeout after {args.timeout}s"
    wall = time.perf_counter() - t0
    pred = predictions(ovr, run_dir)  # after the run: the RL step's plan reads the reward step's model
    rows = {}
    for name in STEPS:
        res = run_dir / name / "result.json"
        if not res.is_file():
            rows[name] = {**pred[name], "error": "no result.json"}
            continue
        r = json.loads(res.read_text())
        m = r.get("metrics", {})
        measured = m.get("peak_cuda_footprint_bytes")
        rows[name] = {**pred[name], "status": r.get("status"), "measured": measured, "peak_allocated": m.get("peak_cuda_bytes"),
                      "ratio_measured_to_predicted": round(measured / pred[name]["predicted"], 3) if measured else None,
                      "peak_rss_bytes": m.get("peak_rss_bytes"), "wall_s": r.get("wall_time_s"),
                      "completion_length_mean": m.get("completion_length_mean")}
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "default"
    print(f"\n{gpu}; sectune +experiment=auth_grpo, random weights, {args.steps} steps each, exit {code}, {wall:.0f}s; "
          f"PYTORCH_CUDA_ALLOC_CONF={alloc}")
    print(f"{'step':7s} {'sequences x len':>16s} {'predicted GiB':>14s} {'measured GiB':>13s} {'ratio':>6s} {'allocated GiB':>14s}")
    for name, r in rows.items():
        gib = lambda b: f"{b / 2**30:.2f}" if b else "-"  # noqa: E731
        ratio = r.get("ratio_measured_to_predicted")
        print(f"{name:7s} {r['sequences']:>7} x {r['seq_len']:<6} {gib(r['predicted']):>14s} {gib(r.get('measured')):>13s} "
              f"{(f'{ratio:.2f}' if ratio else '-'):>6s} {gib(r.get('peak_allocated')):>14s}  {r.get('status') or r.get('error')}")
    print(json.dumps({"gpu": gpu, "alloc_conf": alloc, "exit": code, "wall_s": round(wall), "steps": rows}))
    if code != 0:
        raise SystemExit(f"bench/gpu_stages.py: the pipeline exited {code}")


if __name__ == "__main__":
    main()
