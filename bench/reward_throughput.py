"""sectune's reward step vs seed 000's item-by-item pattern and TRL's RewardTrainer (its defaults).

All three train the same ~21M-parameter Llama of bench/sft_throughput.py, as a one-output
sequence classifier (random init, full fine-tune, fp32 weights + bf16 autocast), on the same real
preference pairs (``dataset=auth_preferences``, the default corruption mix), batch 8 pairs, same
seed and number of optimizer steps:

* ``sectune``  — ``sectune.stages.reward.BradleyTerryTrainer``: the pairs grouped by prompt, each
                 group one row (the prompt once, then the chosen and rejected analyses, each seeing
                 the prompt and itself: a 4D mask), the score head on the completions' last tokens
                 only, selective activation checkpointing (sectune's defaults); 4 prompts × 2 pairs.
* ``itemwise`` — seed 000: every chosen and every rejected sequence in its own forward ("process
                 items individually"), -log(sigmoid(Δ)) per pair, averaged over the batch (a
                 Trainer subclass, so the optimizer, autocast and loop are the same).
* ``trl``      — ``trl.RewardTrainer`` + ``RewardConfig`` defaults (chosen and rejected of a batch
                 padded to the longest, one forward of 16 rows, gradient checkpointing as its
                 config defaults), the way a user would call it.

Each side runs in its own subprocess (peak RSS = that process's VmHWM); the sides are interleaved
over ``--repeats`` and medians are reported. Timing covers whole optimizer steps after warm-up.
Then constrained vs unconstrained generation of 32 analyses (bench/constrained_generation.py).

    .venv/bin/python bench/reward_throughput.py            # ~6 min
    .venv/bin/python bench/reward_throughput.py --quick    # ~2 min smoke run

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _child import emit, run_child  # noqa: E402
from sft_throughput import MODEL, matmul_peak_flops  # noqa: E402

TARGETS = {"vs_itemwise": 1.3, "vs_trl": 1.3}
BATCH = 8


def compose_cfg(args):
    from hydra import compose, initialize_config_dir

    from sectune import config
    from sectune.paths import PROJECT_ROOT

    config.register()
    overrides = ["logger=none", "lora=none", "stage=reward", "loss=bradley_terry", "dataset=auth_preferences",
                 f"train.batch_size={BATCH}", f"train.max_steps={args.warmup + args.steps}", f"model.max_seq_length={args.max_length}",
                 "train.learning_rate=3e-4", "train.seed=42", "train.precision=bf16", "train.device=cpu"]
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    mc = LlamaConfig(**MODEL, vocab_size=len(tokenizer), max_position_embeddings=2048, num_labels=1,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return LlamaForSequenceClassification(mc)


class Meter:
    """What the decoder body is fed (all tokens, real tokens) and when each optimizer step ends."""

    def __init__(self):
        self.fwd: list[tuple[int, int]] = []
        self.step_end: list[float] = []

    def hook(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() == 4:  # sectune's shared-prompt rows: padding has position 0 after the row's start
            real = int((kwargs["position_ids"] != 0).sum()) + ids.shape[0]
        elif am is not None:
            real = int(am.sum())
        else:
            real = ids.numel()
        self.fwd.append((ids.numel(), real))

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                meter.step_end.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                meter.step_end.append(time.perf_counter())

        return _Timer()


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset

    from sectune.data.auth_preferences import preference_splits
    from sectune.models import modeling

    cfg = compose_cfg(args)
    pairs = preference_splits(cfg)["train"]
    tokenizer = modeling.load_tokenizer(cfg)
    model = build_model(tokenizer)
    meter = Meter()
    model.model.register_forward_pre_hook(meter.hook, with_kwargs=True)
    out_dir = Path(tempfile.mkdtemp(prefix=f"reward_bench_{args.child}_"))
    steps = args.warmup + args.steps
    common = dict(output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=3e-4, bf16=True,
                  use_cpu=True, seed=42, data_seed=42, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True)

    if args.child == "trl":
        from trl import RewardConfig, RewardTrainer

        ds = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs])
        trainer = RewardTrainer(model=model, args=RewardConfig(**common, max_length=args.max_length), train_dataset=ds,
                                processing_class=tokenizer)
    else:
        from transformers import TrainingArguments

        from sectune.models import reward_model as RM
        from sectune.stages.reward import BradleyTerryTrainer
        from sectune.training import engine

        if args.child == "sectune":
            # a batch is prompts with all their pairs: 8 / pairs_per_window prompts = the same 8 pairs per step
            rows, _ = RM.encode_pair_groups(tokenizer, pairs, args.max_length)
            common["per_device_train_batch_size"] = BATCH // int(cfg.dataset.pairs_per_window)
            targs = TrainingArguments(**common, remove_unused_columns=False, label_names=[])
            trainer = BradleyTerryTrainer(model=model, args=targs, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                          data_collator=RM.SharedPromptCollator(tokenizer.pad_token_id))
            engine.selective_checkpointing(trainer.model, cfg)
        else:
            rows = [{"chosen_ids": RM.encode_group(tokenizer, p["prompt"], [p["chosen"]], args.max_length)[0],
                     "rejected_ids": RM.encode_group(tokenizer, p["prompt"], [p["rejected"]], args.max_length)[0]} for p in pairs]
            rows = [{k: v["prompt_ids"] + v["completion_ids"][0] for k, v in r.items()} for r in rows]
            targs = TrainingArguments(**common, remove_unused_columns=False, label_names=[])
            trainer = _itemwise_trainer()(model=model, args=targs, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                          data_collator=lambda ex: {"items": ex})
    trainer.add_callback(meter.callback())
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    w, s = args.warmup, args.steps
    elapsed = meter.step_end[w + s] - meter.step_end[w]
    fwd_per_step = len(meter.fwd) // steps
    fed = meter.fwd[w * fwd_per_step : (w + s) * fwd_per_step]
    total, real = sum(f[0] for f in fed), sum(f[1] for f in fed)
    from sectune.training.engine import peak_rss_bytes

    return {"side": args.child, "pairs_per_s": BATCH * s / elapsed, "fed_tokens_per_step": total / s, "real_tokens_per_s": real / elapsed, "pad_share": 1 - real / total,
            "step_median_s": statistics.median(b - a for a, b in zip(meter.step_end[w:w + s], meter.step_end[w + 1:w + s + 1])),
            "peak_rss_bytes": peak_rss_bytes(), "train_wall_s": wall, "pairs": len(pairs),
            "params": sum(p.numel() for p in model.parameters())}


def _itemwise_trainer():
    import torch
    from transformers import Trainer

    class _Itemwise(Trainer):
        """Seed 000's reward loop body in a Trainer: each sequence scored in its own forward."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            device = next(model.parameters()).device
            losses = []
            for ex in inputs["items"]:
                rc = model(input_ids=torch.tensor([ex["chosen_ids"]], device=device)).logits.squeeze()
                rr = model(input_ids=torch.tensor([ex["rejected_ids"]], device=device)).logits.squeeze()
                losses.append(-torch.log(torch.sigmoid(rc - rr)))
            return torch.stack(losses).mean()

        def _prepare_inputs(self, inputs):
            return inputs

    return _Itemwise


def run_side(side: str, args) -> dict:
    return run_child(__file__, [side, "--steps", str(args.steps), "--warmup", str(args.warmup),
                                "--max-length", str(args.max_length), "--threads", str(args.threads)], side)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default 5; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved runs per side (default 2; 1 with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--generation-n", type=int, default=32, help="analyses generated per side for the constrained-decoding timing (0 = skip)")
    ap.add_argument("--child", choices=["sectune", "itemwise", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (3 if args.quick else 5)
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.child:
        emit(child(args))
        return

    t_start = time.perf_counter()
    peak = matmul_peak_flops(args.threads)
    from constrained_generation import cpu_model

    print(f"CPU: {cpu_model()} · bf16 matmul peak {peak['peak_flops'] / 1e9:.0f} GFLOP/s on {args.threads} threads", file=sys.stderr)
    runs: dict[str, list[dict]] = {}
    order = ["trl", "itemwise", "sectune"]
    for rep in range(args.repeats):
        for side in order if rep % 2 == 0 else order[::-1]:
            r = run_side(side, args)
            runs.setdefault(side, []).append(r)
            print(f"  run {rep + 1}/{args.repeats} {side:<9} {r['pairs_per_s']:6.2f} pairs/s  {r['real_tokens_per_s']:7.0f} real tok/s  "
                  f"pad {r['pad_share']:5.1%}  step {r['step_median_s']:.2f}s  RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("pairs_per_s", "real_tokens_per_s", "pad_share", "peak_rss_bytes", "step_median_s",
                                                                   "fed_tokens_per_step")}
           for side, rs in runs.items()}
    r0 = runs["sectune"][0]
    print(f"\nReward step · Llama {r0['params'] / 1e6:.1f}M params, one-output head, full fine-tune, bf16 autocast, CPU {args.threads} threads · "
          f"batch {BATCH} pairs · max_length {args.max_length} · {r0['pairs']} real auth-log pairs · {args.warmup}+{args.steps} steps × "
          f"{args.repeats} interleaved runs (medians)")
    print(f"{'':<10}{'pairs/s':>9}{'tok fed/step':>13}{'real tok/s':>12}{'pad':>7}{'s/step':>8}{'peak RSS':>10}")
    for side, m in med.items():
        print(f"{side:<10}{m['pairs_per_s']:>9.2f}{m['fed_tokens_per_step']:>13.0f}{m['real_tokens_per_s']:>12.0f}{m['pad_share']:>7.1%}{m['step_median_s']:>8.2f}"
              f"{m['peak_rss_bytes'] / 2**20:>8.0f}Mi")
    vs_item = med["sectune"]["pairs_per_s"] / med["itemwise"]["pairs_per_s"]
    vs_trl = med["sectune"]["pairs_per_s"] / med["trl"]["pairs_per_s"]
    checks = {f"pairs/s vs item-by-item {vs_item:.2f} ≥ {TARGETS['vs_itemwise']}": vs_item >= TARGETS["vs_itemwise"],
              f"pairs/s vs TRL RewardTrainer {vs_trl:.2f} ≥ {TARGETS['vs_trl']}": vs_trl >= TARGETS["vs_trl"]}
    gen = {}
    if args.generation_n:
        from constrained_generation import measure

        gen = measure(n=args.generation_n)
        print(f"\nGeneration of {args.generation_n} analyses (bench/constrained_generation.py): unconstrained {gen['unconstrained_s']:.1f}s, "
              f"constrained ({gen['library']}) {gen['constrained_s']:.1f}s → slowdown {gen['constrained_generation_slowdown']:.2f}x; "
              f"schema-valid {gen['schema_valid_rate_unconstrained']:.0%} → {gen['schema_valid_rate_constrained']:.0%}")
    for k, ok in checks.items():
        print(f"  {'PASS' if ok else 'MISS'}  {k}")
    result = {"reward_pairs_per_s_ratio_vs_itemwise": round(vs_item, 3), "reward_pairs_per_s_ratio_vs_trl": round(vs_trl, 3),
              "constrained_generation_slowdown": round(gen["constrained_generation_slowdown"], 3) if gen else None,
              **{f"{side}_{k}": round(v, 4) for side, m in med.items() for k, v in m.items()},
              "bf16_matmul_peak_gflops": round(peak["peak_flops"] / 1e9, 1), "cpu": cpu_model(), "threads": args.threads, "steps": args.steps,
              "repeats": args.repeats, "targets_met": all(checks.values()), "bench_wall_s": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
