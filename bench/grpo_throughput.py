"""sectune's GRPO step vs TRL's GRPOTrainer used as a user would: completions/s, where the step time goes, peak RSS.

Both sides train a LoRA adapter (r 4, alpha 8, attention projections: ``lora=r4_attention``) on the same
~21M-parameter Llama as ``bench/sft_throughput.py`` (hidden 512, 6 layers, random init, the tiny BPE tokenizer),
on the same real auth-log train prompts (``sectune.data.sft_splits``), G = 8 completions per prompt, the same
``--max-completion-length``, the same four rule rewards (``sectune.evaluation.rl_rewards.rule_reward``), same seed:

* ``trl``      — ``GRPOTrainer(model, reward_funcs, GRPOConfig(...), peft_config=LoraConfig(...))`` with
                 GRPOConfig's defaults for everything else: transformers ``generate`` on B·G left-padded prompt
                 copies, loss on B·G padded ``[prompt + completion]`` rows, gradient checkpointing on, bf16,
                 β = 0 (no reference pass), loss_type dapo.
* ``sectune``  — ``sectune.stages.rl.build_grpo_trainer`` with the stage's defaults (``rl.shared_prompt=true``):
                 each prompt prefilled once and its KV cache shared by its G samples; one row per prompt
                 (prompt once, every completion attending to it) for the loss, the old-policy and the reference
                 passes; bf16 autocast; no checkpointing; β = 0.04, so it also runs the reference pass TRL skips.
* variants: ``sectune:beta0`` (β = 0, TRL's work exactly), ``sectune:noshare`` (``rl.shared_prompt=false``:
  TRL's own generation and scoring under sectune's settings — what the two levers are worth).

A random model rarely samples EOS, so every completion runs to the maximum length on both sides: the same
tokens are generated and scored. Each side runs in its own subprocess (its ``VmHWM`` is that side's peak RSS);
sides alternate over ``--repeats``; medians are reported. Timed: whole optimizer steps after ``--warmup``,
split into sampling (``_generate_single_turn``), scoring (the rest of ``_generate_and_score_completions``:
rewards, advantages, reference / old-policy log-probs) and loss + backward + optimizer (the rest of the step).

Threads: on a CPU shared with other jobs, an OpenMP barrier per op dominates small ops (a [8,128]x[128,128]
matmul took 4 ms on 2 threads vs 0.02 ms on 1 on the 2-core box this was written on), so both sides run on
``--threads`` (default 1) threads.

    .venv/bin/python bench/grpo_throughput.py            # 2 interleaved repeats per side, ~10 min on 1 thread
    .venv/bin/python bench/grpo_throughput.py --quick    # 1 repeat, fewer steps
    python bench/grpo_throughput.py --device cuda --model smollm --prompts 4 --max-completion-length 128  # on a GPU

The last line of output is one JSON object (``grpo_completions_per_s_ratio_vs_trl``, …).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _child import emit, run_child  # noqa: E402
from contrastive_throughput import cpu_model  # noqa: E402
from sft_throughput import matmul_peak_flops  # noqa: E402

#: ``--model``: the 21M Llama of bench/sft_throughput.py (vocabulary = the tiny tokenizer's), or SmolLM-135M's shape
#: (vocabulary 49,152, tied embeddings; ids past the tiny tokenizer's 2,048 decode to nothing on both sides, so both
#: sample and score the same tokens, and the rewards see mostly empty text: the work, not the learning, is measured)
MODELS = {
    "tiny21m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1376,
                    tie_word_embeddings=False),
    "smollm": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                   vocab_size=49152, tie_word_embeddings=True),
}  # fmt: skip
G = 8
TARGET_RATIO = 1.3
VARIANTS = {"beta0": ["loss.beta=0"], "noshare": ["rl.shared_prompt=false"]}


def compose_cfg(args, variant: str = ""):
    from hydra import compose, initialize_config_dir

    from sectune import config
    from sectune.paths import PROJECT_ROOT

    config.register()
    overrides = [
        "stage=rl", "loss=grpo", "logger=none", "lora=r4_attention",
        f"train.batch_size={args.prompts}", f"train.max_steps={args.warmup + args.steps}",
        f"rl.num_generations={G}", f"rl.max_completion_length={args.max_completion_length}",
        "train.logging_steps=1", "train.seed=42", "train.precision=bf16", f"train.device={args.device}",
        # TRL's GRPOConfig samples with repetition_penalty 1.0; sectune's stage passes generation.repetition_penalty
        # (1.2 by default) to its sampler: the same sampling distribution on both sides, so the same tokens are drawn
        "generation.repetition_penalty=1.0",
        *(o for v in filter(None, variant.split("+")) for o in VARIANTS[v]),
    ]  # fmt: skip
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def build_model(tokenizer, name: str = "tiny21m"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dims = {"vocab_size": len(tokenizer), **MODELS[name]}
    mc = LlamaConfig(**dims, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                     eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(mc)


class Timer:
    """Wraps the trainer's generation methods and marks step ends: per-step sampling, scoring and total time."""

    def __init__(self, trainer):
        self.step_end: list[float] = []
        self.sample: list[float] = []
        self.generate: list[float] = []
        for name, sink in (("_generate_single_turn", self.sample), ("_generate_and_score_completions", self.generate)):
            inner = getattr(trainer, name)

            def timed(*a, _inner=inner, _sink=sink, **k):
                t = time.perf_counter()
                out = _inner(*a, **k)
                _sink.append(time.perf_counter() - t)
                return out

            setattr(trainer, name, timed)
        from transformers import TrainerCallback

        timer = self

        class _Steps(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timer.step_end.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                timer.step_end.append(time.perf_counter())

        trainer.add_callback(_Steps())


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset

    from sectune import data
    from sectune.data import auth_rewards
    from sectune.evaluation.rl_rewards import rule_reward
    from sectune.models import modeling
    from sectune.models.reward_model import window_from_prompt
    from sectune.stages import rl
    from sectune.training.engine import peak_rss_bytes

    cfg = compose_cfg(args, args.variant)
    tokenizer = modeling.load_tokenizer(cfg)
    records = data.sft_splits(cfg)["train"][: args.num_prompts]
    model = build_model(tokenizer, args.model)
    n_params = sum(p.numel() for p in model.parameters())
    funcs = [rule_reward(n) for n in auth_rewards.REWARDS]
    weights = [float(cfg.rl.rewards[n]) for n in auth_rewards.REWARDS]
    out_dir = Path(tempfile.mkdtemp(prefix=f"grpo_bench_{args.child}_"))
    if args.child == "trl":
        from peft import LoraConfig
        from trl import GRPOConfig, GRPOTrainer

        grpo_args = GRPOConfig(
            output_dir=str(out_dir), num_generations=G, max_completion_length=args.max_completion_length,
            per_device_train_batch_size=G * args.prompts, max_steps=args.warmup + args.steps, use_cpu=args.device == "cpu", seed=42,
            logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, reward_weights=weights,
        )  # fmt: skip
        ds = Dataset.from_list([{"prompt": r["prompt"], "window": window_from_prompt(r["prompt"]), "annotation": r["completion"]} for r in records])
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=grpo_args, train_dataset=ds, processing_class=tokenizer, peft_config=lora)
    else:
        trainer = rl.build_grpo_trainer(cfg, modeling.apply_lora(model, cfg), tokenizer, records, funcs, weights, out_dir)
        trainer.args.disable_tqdm = True
    settings = {"beta": trainer.beta, "gradient_checkpointing": bool(trainer.args.gradient_checkpointing), "bf16": bool(trainer.args.bf16),
                "shared_prompt": bool(getattr(trainer, "shared_prompt", False)), "learning_rate": trainer.args.learning_rate,
                "repetition_penalty": trainer.args.repetition_penalty, "temperature": trainer.args.temperature, "top_p": trainer.args.top_p}
    timer = Timer(trainer)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    w, s = args.warmup, args.steps
    steps = [b - a for a, b in zip(timer.step_end[w:], timer.step_end[w + 1 :])][:s]
    sample, generate = timer.sample[w : w + s], timer.generate[w : w + s]
    lengths = [rec.get("completions/mean_length") for rec in trainer.state.log_history if "completions/mean_length" in rec][w : w + s]
    elapsed = sum(steps)
    completions = G * args.prompts * s
    return {
        "side": args.child, "variant": args.variant, "settings": settings, "params": n_params,
        "completions_per_s": completions / elapsed, "step_median_s": statistics.median(steps),
        "sample_s": sum(sample) / s, "score_s": (sum(generate) - sum(sample)) / s, "loss_backward_s": (elapsed - sum(generate)) / s,
        "completion_tokens_mean": statistics.mean(lengths) if lengths else None,
        "prompt_tokens_mean": statistics.mean(len(tokenizer(r["prompt"])["input_ids"]) for r in records),
        "peak_rss_bytes": peak_rss_bytes(), "train_wall_s": wall,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else None,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }  # fmt: skip


# ----------------------------------------------------------------------------- parent
def run_side(side: str, variant: str, args) -> dict:
    return run_child(__file__, [side, "--variant", variant, "--steps", str(args.steps), "--warmup", str(args.warmup),
                                "--prompts", str(args.prompts), "--num-prompts", str(args.num_prompts),
                                "--max-completion-length", str(args.max_completion_length), "--threads", str(args.threads),
                                "--device", args.device, "--model", args.model],
                     side, threads=args.threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default 4; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved runs per side (default 2; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer steps, one repeat")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step (train.batch_size); G=8 completions each")
    ap.add_argument("--num-prompts", type=int, default=64, help="train prompts in the dataset both sides draw from")
    ap.add_argument("--max-completion-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", choices=list(MODELS), default="tiny21m", help="tiny21m (hidden 512, 6 layers) or smollm (SmolLM-135M's shape)")
    ap.add_argument("--variants", default="beta0,noshare", help="extra sectune runs, comma-separated (beta0, noshare; '' for none)")
    ap.add_argument("--child", choices=["trl", "sectune"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.quick else 4)
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.child:
        emit(child(args))
        return

    t_start = time.perf_counter()
    # the machine, and its bf16 matmul peak on the bench's threads at the start and the end (the benches' rule)
    peaks = [matmul_peak_flops(args.threads)] if args.device == "cpu" else []
    runs: dict[str, list[dict]] = {}
    failed: dict[str, str] = {}
    order = ["trl", "sectune"] + [f"sectune:{v}" for v in filter(None, args.variants.split(","))]
    for rep in range(args.repeats):
        for name in order if rep % 2 == 0 else order[::-1]:
            side, _, variant = name.partition(":")
            try:
                r = run_side(side, variant, args)
            except SystemExit as e:  # one side failing still reports the others (its stderr is above)
                failed[name] = str(e)
                print(f"  run {rep + 1}/{args.repeats} {name:<18} FAILED: {e}", file=sys.stderr, flush=True)
                continue
            runs.setdefault(name, []).append(r)
            print(f"  run {rep + 1}/{args.repeats} {name:<18} {r['completions_per_s']:6.2f} completions/s  step {r['step_median_s']:.2f}s  "
                  f"RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)  # fmt: skip
    if peaks:
        peaks.append(matmul_peak_flops(args.threads))
    peak_gflops = round(max(p["peak_flops"] for p in peaks) / 1e9, 1) if peaks else None
    med = lambda rs, k: None if rs[0][k] is None else statistics.median(r[k] for r in rs)  # noqa: E731
    summary = {name: {k: med(rs, k) for k in ("completions_per_s", "step_median_s", "sample_s", "score_s", "loss_backward_s", "peak_rss_bytes", "peak_cuda_bytes",
                                                 "completion_tokens_mean")}
               for name, rs in runs.items()}
    if not runs:
        raise SystemExit(f"every side failed: {failed}")
    r0 = next(iter(runs.values()))[0]
    dims = MODELS[args.model]
    where = r0["gpu"] if args.device == "cuda" else f"CPU {args.threads} thread(s)"
    print(f"\nCPU: {cpu_model()}" + (f" · bf16 matmul peak (best of 1024/2048/3072², start/end): {peak_gflops} GFLOP/s on {args.threads} "
                                     f"thread(s)  {[p['by_size'] for p in peaks]}" if peaks else ""))
    print(f"\nGRPO throughput · Llama {r0['params'] / 1e6:.1f}M params (hidden {dims['hidden_size']}, {dims['num_hidden_layers']} layers), LoRA r4 attention, {where} · "
          f"{args.prompts} prompts × G={G} per step · prompts ~{r0['prompt_tokens_mean']:.0f} tokens · completions ≤ {args.max_completion_length} "
          f"(mean {r0['completion_tokens_mean'] or float('nan'):.0f}) · {args.warmup}+{args.steps} steps × {args.repeats} runs (medians)")
    print(f"{'':<18}{'compl/s':>9}{'compl tok':>10}{'s/step':>8}{'sample s':>10}{'score s':>9}{'loss+bwd s':>11}{'peak RSS':>10}{'peak GPU':>10}  settings")
    for name, m in summary.items():
        st = runs[name][0]["settings"]
        print(f"{name:<18}{m['completions_per_s']:>9.2f}{m['completion_tokens_mean'] or float('nan'):>10.1f}{m['step_median_s']:>8.2f}{m['sample_s']:>10.2f}{m['score_s']:>9.2f}"
              f"{m['loss_backward_s']:>11.2f}{m['peak_rss_bytes'] / 2**20:>8.0f}Mi{(m['peak_cuda_bytes'] or 0) / 2**20:>8.0f}Mi  β={st['beta']} gc={st['gradient_checkpointing']} "
              f"bf16={st['bf16']} shared={st['shared_prompt']}")  # fmt: skip
    if "trl" not in summary or "sectune" not in summary:
        print(json.dumps({"failed": failed, **{f"{n.replace('sectune:', 'sectune_')}_completions_per_s": round(m["completions_per_s"], 3)
                                               for n, m in summary.items()}}))
        raise SystemExit(1)
    t, s = summary["trl"], summary["sectune"]
    ratio = s["completions_per_s"] / t["completions_per_s"]
    # completions/s is only comparable when both sides generated (and scored) as many tokens per completion
    length_ratio = (s["completion_tokens_mean"] / t["completion_tokens_mean"]) if t["completion_tokens_mean"] and s["completion_tokens_mean"] else None
    if length_ratio is not None and abs(length_ratio - 1) > 0.02:
        print(f"  WARN  mean completion length differs: sectune {s['completion_tokens_mean']:.1f} vs TRL {t['completion_tokens_mean']:.1f} tokens "
              f"({length_ratio:.3f}x): not the same work; compare completion tokens/s")
    print(f"  {'PASS' if ratio >= TARGET_RATIO else 'MISS'}  completions/s ratio {ratio:.2f} ≥ {TARGET_RATIO}")
    result = {
        "grpo_completions_per_s_ratio_vs_trl": round(ratio, 3),
        "completion_tokens_mean_ratio_vs_trl": round(length_ratio, 4) if length_ratio is not None else None,
        "grpo_completion_tokens_per_s_ratio_vs_trl": round(ratio * length_ratio, 3) if length_ratio is not None else None,
        "sample_speedup_vs_trl": round(t["sample_s"] / s["sample_s"], 3),
        "loss_backward_speedup_vs_trl": round(t["loss_backward_s"] / s["loss_backward_s"], 3),
        "peak_rss_ratio_vs_trl": round(s["peak_rss_bytes"] / t["peak_rss_bytes"], 3),
        "peak_cuda_ratio_vs_trl": round(s["peak_cuda_bytes"] / t["peak_cuda_bytes"], 3) if args.device == "cuda" else None,
        **{f"{n.replace('sectune:', 'sectune_')}_completions_per_s": round(m["completions_per_s"], 3) for n, m in summary.items()},
        "cpu": cpu_model(), "bf16_matmul_peak_gflops": peak_gflops,
        "device": args.device, "model": args.model, "threads": args.threads, "prompts_per_step": args.prompts, "num_generations": G, "max_completion_length": args.max_completion_length,
        "bench_wall_s": round(time.perf_counter() - t_start, 1), "failed": failed or None,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
