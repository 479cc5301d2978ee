"""Peak GPU memory of real training steps against ``stage=plan``'s prediction, and step speed (CUDA only).

Each case composes a sectune config (``stage=sft train.device=cuda plan.device=cuda`` plus the
case's overrides), asks the planner for ``predicted_peak_bytes``, and then, in a fresh process,
trains on it: the model is the preset's architecture (``model.arch``) with random weights, saved
once and loaded through ``sectune.models.modeling.load_model`` (the same ``from_pretrained`` with
BitsAndBytesConfig and ``prepare_model_for_kbit_training`` as a run), LoRA from
``modeling.apply_lora``, checkpointing as the SFT stage sets it, the optimizer the config names,
and full-length batches (``train.batch_size`` x ``model.max_seq_length`` random token ids, the
planner's assumption). Measured = ``torch.cuda.max_memory_reserved()`` + what the process holds
outside torch's allocator (CUDA context, cuBLAS workspaces: device used - reserved, at the end).
Random weights change no tensor size, so the memory is the real model's.

    python bench/gpu_memory.py                      # every case, ~6 min on one H200
    python bench/gpu_memory.py --cases seed002

The last line is one JSON object: per case predicted/measured bytes, their ratio, and
real tokens/s; ``bf16_speedup_vs_fp32`` compares the ``smollm_full`` case in bf16 autocast
against fp32 (TF32 off, torch's default) on the same shapes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: seed 002's reference row first (Llama-2-7B, nf4, LoRA r16 all linear, seq 2048, batch 1, paged 8-bit AdamW)
CASES = {
    "seed002": ["model=llama2_7b", "quantization=nf4", "lora=r16_all_linear", "train.batch_size=1",
                "train.gradient_checkpointing=true", "train.optimizer=paged_adamw_8bit"],
    # seed 000's analyst (+experiment=auth_grpo): DeepSeek-R1-Distill-Llama-8B nf4 + double quant, LoRA r4 on attention,
    # batch 1 x 1024, checkpointing, Adafactor; all on the GPU (the preset's max_memory would spill layers to the CPU)
    "auth_grpo": ["model=deepseek_r1_distill_llama_8b", "quantization=nf4", "lora=r4_attention", "train.batch_size=1",
                  "model.max_seq_length=1024", "train.gradient_checkpointing=true", "train.optimizer=adafactor"],
    "llama32_3b_int8": ["model=llama32_3b_instruct", "quantization=int8", "lora=r16_all_linear", "train.batch_size=2",
                        "model.max_seq_length=1024", "train.gradient_checkpointing=true"],
    "llama32_3b_bf16_lora": ["model=llama32_3b_instruct", "quantization=none", "lora=r16_all_linear",
                             "train.batch_size=4", "model.max_seq_length=1024"],
    "smollm_full": ["model=smollm_135m", "quantization=none", "lora=none", "train.batch_size=8", "model.max_seq_length=1024"],
    "smollm_full_fp32": ["model=smollm_135m", "quantization=none", "lora=none", "train.batch_size=8",
                         "model.max_seq_length=1024", "train.precision=fp32", "model.dtype=fp32"],
}  # fmt: skip


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sectune import config

    config.register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=["stage=sft", "train.device=cuda", "plan.device=cuda", "logger=none", *overrides])


def random_weights(cfg, work: Path, device: str = "cuda", shrink: bool = False) -> Path:
    """The preset's architecture with random weights, saved once, with sectune's tiny tokenizer. ``shrink``: 2 layers
    64 wide with the preset's vocabulary, for a dry run of a bench's path on a CPU (its memory says nothing)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sectune.models import modeling

    a = dict(cfg.model.arch)
    if a["family"] != "llama":
        raise SystemExit(f"model={cfg.model.name}: only llama-family presets are built here")
    if shrink:
        a.update(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    out = work / (cfg.model.name + ("_shrunk" if shrink else ""))
    if (out / "config.json").is_file():
        return out
    conf = LlamaConfig(hidden_size=a["hidden_size"], num_hidden_layers=a["num_layers"], num_attention_heads=a["num_heads"],
                       num_key_value_heads=a["num_kv_heads"], intermediate_size=a["intermediate_size"],
                       vocab_size=a["vocab_size"], tie_word_embeddings=bool(a["tie_embeddings"]),
                       max_position_embeddings=max(4096, int(cfg.model.max_seq_length)))  # fmt: skip
    with torch.device(device):
        model = LlamaForCausalLM(conf).to(torch.bfloat16)
    tiny = compose(["model=tiny_llama"])
    tok = modeling.load_tokenizer(tiny)
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def child(name: str, steps: int, work: str) -> dict:
    import torch

    from sectune.models import modeling
    from sectune.stages import plan
    from sectune.training import engine

    cfg = compose(CASES[name])
    budget, info = plan.estimate(cfg)
    path = random_weights(cfg, Path(work))
    cfg = compose([*CASES[name], f"model.name_or_path={path}"])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    assert torch.cuda.memory_reserved() == 0
    model = modeling.load_model(cfg, path=str(path))  # quantized: placed on the GPU while loading
    if cfg.quantization.name == "none":
        model = model.to("cuda")  # as Trainer does
    if cfg.lora.enabled:
        model = modeling.apply_lora(model, cfg)
    model.train()
    loaded = torch.cuda.memory_allocated()  # weights (+ adapters)
    load_peak_reserved = torch.cuda.max_memory_reserved()  # quantizing while loading can peak higher
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        engine.selective_checkpointing(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    elif cfg.train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(params, lr=2e-5, scale_parameter=False, relative_step=False)  # as Trainer builds optim="adafactor"
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)
    bs, seq = info["batch_size"], info["seq_len"]
    vocab = min(int(cfg.model.arch.vocab_size), 2000)
    ids = torch.randint(0, vocab, (bs, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    amp = cfg.train.precision in ("bf16", "fp16")
    times, between_steps, step_peaks = [], [], []
    for _ in range(steps):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss).item())
        # as Trainer does: no reference to this step's graph survives into the next one (bitsandbytes'
        # int8 matmul keeps its inputs on the graph's ctx, so a held loss kept a whole step alive)
        del loss
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        between_steps.append(torch.cuda.memory_allocated())  # weights + adapters + optimizer state
        step_peaks.append((torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()))
    outside = engine.cuda_outside_allocator_bytes()
    max_reserved = max(load_peak_reserved, *(r for _, r in step_peaks))
    measured = max_reserved + outside
    step = sorted(times[1:])[len(times[1:]) // 2]  # median after the first (warm-up) step
    return {
        "predicted": budget.total,
        "measured": measured,
        "ratio_measured_to_predicted": round(measured / budget.total, 3),
        "max_allocated": max(a for a, _ in step_peaks),  # during the training steps
        "allocated_after_load": loaded,
        "allocated_between_steps": between_steps[-1],
        "max_reserved": max_reserved,
        "load_peak_reserved": load_peak_reserved,
        "outside_allocator": outside,
        "predicted_components": {n: b for n, b, _ in budget.rows() if n != "total"},
        "quantized_modules": modeling.quantized_module_count(model),
        "loss_finite": finite,
        "step_s": round(step, 4),
        "tokens_per_s": round(bs * seq / step, 1),
        "gpu": torch.cuda.get_device_name(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--work", default="/tmp/sectune_gpu_memory", help="where the random-weight models are saved")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.work)))
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_memory.py needs a CUDA device (torch.cuda.is_available() is False)")
    results = {}
    unknown = [n for n in args.cases.split(",") if n not in CASES]  # all checked before the first case runs (session 36)
    if unknown:
        raise SystemExit(f"--cases: unknown case(s) {', '.join(map(repr, unknown))}; choose from {', '.join(CASES)}")
    for name in args.cases.split(","):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--work", args.work],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            results[name] = {"error": proc.stderr[-1500:]}
            print(f"{name}: FAILED\n{proc.stderr[-1500:]}", flush=True)
            continue
        r = results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:22s} predicted {r['predicted'] / 2**30:6.2f} GiB  measured {r['measured'] / 2**30:6.2f} GiB "
              f"({r['ratio_measured_to_predicted']:.2f}x)  allocated {r['max_allocated'] / 2**30:6.2f} GiB  "
              f"{r['tokens_per_s']:9.0f} tok/s  [{time.perf_counter() - t0:.0f}s]", flush=True)  # fmt: skip
        print(f"  {json.dumps(r)}", flush=True)
    out = {"cases": results}
    if "tokens_per_s" in results.get("smollm_full", {}) and "tokens_per_s" in results.get("smollm_full_fp32", {}):
        out["bf16_speedup_vs_fp32"] = round(results["smollm_full"]["tokens_per_s"] / results["smollm_full_fp32"]["tokens_per_s"], 2)
    failed = sorted(n for n, r in results.items() if "error" in r)
    out["failed"] = failed or None
    print(json.dumps(out))
    if failed:  # a case that did not run is no measurement: say so in the exit status too
        raise SystemExit(f"bench/gpu_memory.py: {len(failed)} of {len(results)} case(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
