"""sectune SFT vs TRL's SFTTrainer used as a user would: real (non-pad) tokens/s, padding, MFU, RSS.

Both sides train the same ~20M-parameter Llama (hidden 512, 6 layers, 8 heads, intermediate 1376,
vocab = sectune's tiny BPE tokenizer, random init, full fine-tune, fp32 weights + bf16 autocast)
on the same real auth-log prompt/answer records (``sectune.data.sft_records``), batch 8, same seed,
same number of optimizer steps:

* ``trl``     — ``SFTTrainer`` + ``SFTConfig`` defaults: pad to the longest example of each batch,
                no packing, no length grouping, gradient checkpointing on (SFTConfig's default).
* ``sectune`` — ``sectune.stages.sft.build_sft_trainer`` with sectune's defaults: padding-free batches
                (``train.packing=padding_free``: the 8 examples of a batch flattened into one row,
                padded to a multiple of 64 tokens, the same random batches as TRL's sampler),
                attention per example and the LM head on answer positions only
                (``sectune.training.packed_attention``), selective activation checkpointing
                (``train.selective_checkpointing=true``). Variants ``nosac``, ``rows`` and ``gc``
                change those defaults (see ``CONFIG_VARIANTS``).

Each side runs in its own subprocess (its ``VmHWM``, via ``sectune.training.engine.peak_rss_bytes``, is that side's peak
RSS; ``ru_maxrss`` would carry the parent's peak across exec); sides are
interleaved over ``--repeats`` and medians are reported. Timing covers whole optimizer steps
(data collation + forward + backward + optimizer + logging) after ``--warmup`` steps.

Model FLOPs (the same formula for both sides, real tokens only, state-of-the-art convention):
    6 · N · T  +  12 · L · d · Σ_real (p + 1)
with N = parameters that do matmuls (all but the input embedding), T = real tokens, and p the
0-based position of a real token inside its own example (causal attention, QKᵀ and AV, fwd+bwd).
MFU = model FLOPs / time / peak, the peak being the best bf16 ``torch.matmul`` rate measured in
this run on the same threads.

    .venv/bin/python bench/sft_throughput.py            # ~5 min: 2 interleaved repeats per side
    .venv/bin/python bench/sft_throughput.py --quick    # ~1.5 min smoke run

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
sys.path.insert(0, str(ROOT / "bench"))
from _child import emit, run_child  # noqa: E402
from contrastive_throughput import cpu_model  # noqa: E402

MODEL = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1376)
TARGETS = {"ratio": 1.3, "pad_share": 0.05, "mfu_real": 0.35, "rss_ratio": 1.0}


# ----------------------------------------------------------------------------- peak
def matmul_peak_flops(threads: int, seconds: float = 1.5) -> dict:
    """Best bf16 matmul rate over a few square sizes (FLOP/s), on ``threads`` threads (the caller's thread count put back)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = {}
    try:
        for n in (1024, 2048, 3072):
            a = torch.randn(n, n, dtype=torch.bfloat16)
            b = torch.randn(n, n, dtype=torch.bfloat16)
            for _ in range(2):
                torch.matmul(a, b)
            times, t_end = [], time.perf_counter() + seconds / 3
            while time.perf_counter() < t_end or len(times) < 3:
                t0 = time.perf_counter()
                torch.matmul(a, b)
                times.append(time.perf_counter() - t0)
            best[n] = 2 * n**3 / min(times)
    finally:
        torch.set_num_threads(before)
    return {"peak_flops": max(best.values()), "by_size": {str(k): round(v / 1e9, 1) for k, v in best.items()}}


# ----------------------------------------------------------------------------- child
def compose_cfg(args):
    from hydra import compose, initialize_config_dir

    from sectune import config
    from sectune.paths import PROJECT_ROOT

    config.register()
    overrides = [
        "logger=none",
        "lora=none",  # full fine-tune on both sides: same trainable parameters
        "train.batch_size=8",
        f"train.max_steps={args.warmup + args.steps}",
        f"model.max_seq_length={args.max_length}",
        "train.learning_rate=3e-4",
        "train.logging_steps=1",
        "train.seed=42",
        "train.precision=bf16",
        "train.device=cpu",
    ]
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    mc = LlamaConfig(
        **MODEL,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(mc)  # fp32 weights; Trainer's bf16=True autocasts


class Meter:
    """Counts what each forward is fed (real/pad tokens, Σ(p+1)) and times whole steps."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.fwd: list[tuple[int, int, int]] = []  # (total, real, sum of (pos+1) over real tokens)
        self.step_end: list[float] = []

    def hook(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        am = kwargs.get("attention_mask")
        pos = kwargs.get("position_ids")
        real = (am.bool() if am is not None else ids != self.pad_id)
        if pos is None:
            pos = (real.long().cumsum(-1) - 1).clamp(min=0)
        self.fwd.append((ids.numel(), int(real.sum()), int(((pos + 1) * real).sum())))
        return None

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                meter.step_end.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                meter.step_end.append(time.perf_counter())

        return _Timer()


#: variants that are sectune settings rather than prototypes: ``train.*`` values set before the build
CONFIG_VARIANTS = {
    "nosac": {"selective_checkpointing": False},  # keep every activation
    "rows": {"packing": "bfd"},  # the earlier default: 8 BFD-packed rows of max_length, length-grouped
    "gc": {"gradient_checkpointing": True},  # full checkpointing, TRL's SFTConfig default
}


def patch_variant(variant: str, trainer) -> None:
    """Prototypes of proposed changes to sectune, applied to the built sectune trainer (bench only).

    compact   — score only the completion positions in TRL's fused LM head on CPU too (TRL scores every
                position, prompt and pad included, when Triton is absent: ``compact = _use_triton(device)``)
    nometrics — fused LM head asked for log-probs only (no entropy / top-1) and no per-step ``.item()`` metrics
    padN      — the collator's ``pad_to_multiple_of=N`` (N=0: no padding)
    trim      — glibc ``malloc_trim(0)`` after every optimizer step (hand freed heap pages back to the OS)
    bf16norm  — RMSNorm outputs cast to the autocast dtype once, so q/k/v (and gate/up) share one saved bf16 input
    """
    from sectune.training import engine

    for v in filter(None, variant.split("+")):
        if v == "compact":
            import trl.trainer.utils as trl_utils

            trl_utils._use_triton = lambda device: True  # only the compaction switch; the kernels keep torch ops
        elif v == "nometrics":
            _drop_trl_metrics(trainer)
        elif v in CONFIG_VARIANTS:
            continue  # applied to the config before the build
        elif v == "trim":
            import ctypes

            from transformers import TrainerCallback

            libc = ctypes.CDLL("libc.so.6")

            class _Trim(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    libc.malloc_trim(0)

            trainer.add_callback(_Trim())
        elif v == "bf16norm":
            import torch

            def cast_out(mod, args, out):
                if torch.is_autocast_enabled("cpu"):
                    return out.to(torch.get_autocast_dtype("cpu"))

            for name, m in trainer.model.named_modules():
                if type(m).__name__.endswith("RMSNorm"):
                    m.register_forward_hook(cast_out)
        elif v.startswith("pad"):
            collator = engine.PackedRowsCollator if isinstance(trainer.data_collator, engine.PackedRowsCollator) else engine.FlatBatchCollator
            trainer.data_collator = collator(trainer.processing_class.pad_token_id, pad_to_multiple_of=int(v[3:]) or None)
        else:
            raise SystemExit(f"unknown variant {v!r}")


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from sectune import data
    from sectune.models import modeling

    cfg = compose_cfg(args)
    records = data.sft_records(cfg)
    tokenizer = modeling.load_tokenizer(cfg)
    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = n_params - model.get_input_embeddings().weight.numel()
    meter = Meter(tokenizer.pad_token_id)
    model.register_forward_pre_hook(meter.hook, with_kwargs=True)
    out_dir = Path(tempfile.mkdtemp(prefix=f"sft_bench_{args.child}_"))

    if args.child == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        sft_args = SFTConfig(
            output_dir=str(out_dir),
            max_length=args.max_length,
            per_device_train_batch_size=8,
            max_steps=args.warmup + args.steps,
            learning_rate=3e-4,
            bf16=True,
            use_cpu=True,
            seed=42,
            data_seed=42,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
        )
        ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=ds, processing_class=tokenizer)
    else:
        from sectune.stages.sft import build_sft_trainer

        for v in args.variant.split("+"):
            for key, value in CONFIG_VARIANTS.get(v, {}).items():
                cfg.train[key] = value
        trainer = build_sft_trainer(cfg, model, tokenizer, records, [], out_dir)
        trainer.args.disable_tqdm = True
        patch_variant(args.variant, trainer)
    trainer.add_callback(meter.callback())

    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    w, s = args.warmup, args.steps
    elapsed = meter.step_end[w + s] - meter.step_end[w]  # step_end[0] is train begin
    fed = meter.fwd[w : w + s]
    total = sum(f[0] for f in fed)
    real = sum(f[1] for f in fed)
    attn = sum(f[2] for f in fed)
    L, d = MODEL["num_hidden_layers"], MODEL["hidden_size"]
    flops = 6 * n_matmul * real + 12 * L * d * attn
    step_times = [b - a for a, b in zip(meter.step_end[w:], meter.step_end[w + 1 :])]
    from sectune.training.engine import peak_rss_bytes

    rss = peak_rss_bytes()
    return {
        "side": args.child,
        "variant": args.variant,
        "steps_timed": s,
        "seconds": elapsed,
        "step_median_s": statistics.median(step_times),
        "real_tokens": real,
        "fed_tokens": total,
        "real_tokens_per_s": real / elapsed,
        "fed_tokens_per_s": total / elapsed,
        "pad_share": 1 - real / total,
        "model_flops_per_s": flops / elapsed,
        "params": n_params,
        "peak_rss_bytes": rss,
        "train_wall_s": wall,
        "examples": len(records),
    }


def _drop_trl_metrics(trainer) -> None:
    """Prototype: log-probs only from the fused LM head, and TRL's compute_loss minus the metric bookkeeping."""
    import types

    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(trainer.model, outputs=("log_probs",))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        n = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        return (-outputs.log_probs).sum() / torch.as_tensor(n).clamp(min=1)

    import torch

    trainer.compute_loss = types.MethodType(compute_loss, trainer)


# ----------------------------------------------------------------------------- parent
def run_side(side: str, variant: str, args) -> dict:
    return run_child(__file__, [side, "--variant", variant, "--steps", str(args.steps), "--warmup", str(args.warmup),
                                "--max-length", str(args.max_length), "--threads", str(args.threads)], side)


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default 6; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved runs per side (default 2; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer steps, one repeat")
    ap.add_argument(
        "--max-length", type=int, default=1024,
        help="max_length / packed row length (default 1024: the records run to ~1150 tokens, so at 512 "
        "two thirds of the answers are truncated away and TRL pads only ~6%%)",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--variants", default="", help="extra sectune runs with prototype changes, comma-separated (e.g. pad64,nometrics)")
    ap.add_argument("--child", choices=["trl", "sectune"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (3 if args.quick else 6)
    args.repeats = args.repeats or (1 if args.quick else 2)

    if args.child:
        emit(child(args))
        return

    t_start = time.perf_counter()
    peaks = [matmul_peak_flops(args.threads)]
    runs: dict[str, list[dict]] = {}
    order = ["trl", "sectune"] + [f"sectune:{v}" for v in filter(None, args.variants.split(","))]
    for rep in range(args.repeats):
        for name in order if rep % 2 == 0 else order[::-1]:
            side, _, variant = name.partition(":")
            r = run_side(side, variant, args)
            runs.setdefault(name, []).append(r)
            print(
                f"  run {rep + 1}/{args.repeats} {name:<22} {r['real_tokens_per_s']:8.0f} real tok/s  "
                f"pad {r['pad_share']:5.1%}  step {r['step_median_s']:.2f}s  RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB",
                file=sys.stderr, flush=True,
            )  # fmt: skip
    peaks.append(matmul_peak_flops(args.threads))
    peak = max(p["peak_flops"] for p in peaks)

    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "real_tokens_per_s": median_of(rs, "real_tokens_per_s"),
            "fed_tokens_per_s": median_of(rs, "fed_tokens_per_s"),
            "pad_share": median_of(rs, "pad_share"),
            "mfu_real": median_of(rs, "model_flops_per_s") / peak,
            "peak_rss_bytes": median_of(rs, "peak_rss_bytes"),
            "step_median_s": median_of(rs, "step_median_s"),
            "real_tokens_per_step": median_of(rs, "real_tokens") / args.steps,
        }
    t, s = summary["trl"], summary["sectune"]
    r0 = runs["trl"][0]
    print(
        f"\nSFT throughput · Llama {r0['params'] / 1e6:.1f}M params (hidden 512, 6 layers), full fine-tune, bf16 autocast, CPU "
        f"{args.threads} threads · batch 8 · max_length {args.max_length} · {r0['examples']} auth-log records · "
        f"{args.warmup}+{args.steps} steps × {args.repeats} interleaved runs (medians)"
    )
    print(f"CPU: {cpu_model()} · bf16 matmul peak (best of 1024/2048/3072², start/end): {peak / 1e9:.1f} GFLOP/s  {[p['by_size'] for p in peaks]}")
    hdr = f"{'':<22}{'real tok/s':>11}{'fed tok/s':>11}{'pad':>7}{'real tok/step':>14}{'s/step':>8}{'MFU(real)':>10}{'peak RSS':>10}"
    print(hdr)
    for name, m in summary.items():
        print(
            f"{name:<22}{m['real_tokens_per_s']:>11.0f}{m['fed_tokens_per_s']:>11.0f}{m['pad_share']:>7.1%}"
            f"{m['real_tokens_per_step']:>14.0f}{m['step_median_s']:>8.2f}{m['mfu_real']:>10.3f}{m['peak_rss_bytes'] / 2**20:>8.0f}Mi"
        )
    ratio = s["real_tokens_per_s"] / t["real_tokens_per_s"]
    rss_ratio = s["peak_rss_bytes"] / t["peak_rss_bytes"]
    checks = {
        f"tokens/s ratio {ratio:.2f} ≥ {TARGETS['ratio']}": ratio >= TARGETS["ratio"],
        f"pad share {s['pad_share']:.1%} < {TARGETS['pad_share']:.0%}": s["pad_share"] < TARGETS["pad_share"],
        f"MFU(real) {s['mfu_real']:.3f} ≥ {TARGETS['mfu_real']}": s["mfu_real"] >= TARGETS["mfu_real"],
        f"peak RSS ratio {rss_ratio:.2f} ≤ {TARGETS['rss_ratio']}": rss_ratio <= TARGETS["rss_ratio"],
    }
    for k, ok in checks.items():
        print(f"  {'PASS' if ok else 'MISS'}  {k}")
    result = {
        "sft_tokens_per_s_ratio_vs_trl": round(ratio, 3),
        "pad_share": round(s["pad_share"], 4),
        "mfu_real": round(s["mfu_real"], 4),
        "peak_rss_ratio_vs_trl": round(rss_ratio, 3),
        "sectune_real_tokens_per_s": round(s["real_tokens_per_s"], 1),
        "trl_real_tokens_per_s": round(t["real_tokens_per_s"], 1),
        "trl_pad_share": round(t["pad_share"], 4),
        "trl_mfu_real": round(t["mfu_real"], 4),
        "sectune_peak_rss_mib": round(s["peak_rss_bytes"] / 2**20, 1),
        "trl_peak_rss_mib": round(t["peak_rss_bytes"] / 2**20, 1),
        "bf16_matmul_peak_gflops": round(peak / 1e9, 1),
        "cpu": cpu_model(),
        "variants": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in summary.items() if ":" in k},
        "fine_tune": "full",
        "max_length": args.max_length,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "targets_met": all(checks.values()),
        "bench_wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
