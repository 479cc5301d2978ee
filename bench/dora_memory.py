"""DoRA's memory on top of LoRA's: the planner's predicted extra (``lora.use_dora``) against one measured training step.

Each variant runs in a process of its own (peak RSS is per process): a random Llama-shaped model (hidden 1024, 4 layers,
intermediate 2816, vocabulary 2048, fp32), LoRA r16 on every linear, with and without DoRA, one forward and backward
on batch 8 x 512 tokens. Measured: peak RSS less the RSS after the model and adapter are built. Predicted: the
planner's (sectune/training/planner.py, device cpu, fp32) adapters + gradients + activations. The figure that
matters is DoRA's extra, measured against predicted, in the same run. Ends with one JSON line. ``--selective``: with
``train.selective_checkpointing``'s policy (sectune/training/engine.py), the real presets' default, whose matmul cache
keeps DoRA's BA (fin x fout per adapted linear) until each layer's backward; ``--dropout 0.05``: lora_dropout, with
which DoRA recomputes the base output (one more matmul kept per token).

    python bench/dora_memory.py [--selective] [--dropout 0.05]
"""

from __future__ import annotations

import json
import subprocess
import sys

ARCH = {"family": "llama", "hidden_size": 1024, "num_layers": 4, "num_heads": 16, "num_kv_heads": 4,
        "intermediate_size": 2816, "vocab_size": 2048, "tie_embeddings": True}
BATCH, SEQ, R = 8, 512, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CHILD = r"""
import functools, json, resource, sys, torch
from transformers import LlamaConfig, AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
a = json.loads(sys.argv[1]); dora = sys.argv[2] == "1"; selective = sys.argv[3] == "1"; dropout = float(sys.argv[4])
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=a["hidden_size"], num_hidden_layers=a["num_layers"], num_attention_heads=a["num_heads"],
                  num_key_value_heads=a["num_kv_heads"], intermediate_size=a["intermediate_size"], vocab_size=a["vocab_size"],
                  tie_word_embeddings=True, attn_implementation="sdpa")
model = AutoModelForCausalLM.from_config(cfg)
if selective:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    from sectune.training.engine import _keep_matmuls
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False,
        "context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)})
model = get_peft_model(model, LoraConfig(r=%d, lora_alpha=32, lora_dropout=dropout, target_modules=%r, use_dora=dora))
model.train()
ids = torch.randint(0, a["vocab_size"], (%d, %d))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model(input_ids=ids, labels=ids).loss.backward()
print(json.dumps({"peak_extra_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024}))
""" % (R, TARGETS, BATCH, SEQ)


def measured(dora: bool, selective: bool = False, dropout: float = 0.0) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(ARCH), "1" if dora else "0", "1" if selective else "0", str(dropout)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def predicted(dora: bool, selective: bool = False, dropout: float = 0.0) -> int:
    from sectune.training.planner import estimate_memory

    b = estimate_memory(ARCH, lora_r=R, lora_targets=TARGETS, dtype="fp32", device="cpu", seq_len=SEQ, batch_size=BATCH,
                        lora_dropout=dropout, lora_dora=dora, selective_checkpointing=selective)
    return b.adapters + b.gradients + b.activations


def main() -> None:
    import os

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from contrastive_throughput import cpu_model
    from sft_throughput import matmul_peak_flops

    peak_gflops = round(matmul_peak_flops(torch.get_num_threads())["peak_flops"] / 1e9, 1)
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--selective", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0)
    args = ap.parse_args()
    m = {d: measured(d, args.selective, args.dropout) for d in (False, True)}
    p = {d: predicted(d, args.selective, args.dropout) for d in (False, True)}
    gib = 2**30
    print(f"CPU: {cpu_model()} · bf16 matmul peak {peak_gflops} GFLOP/s on {torch.get_num_threads()} thread(s); "
          f"batch {BATCH} x {SEQ}, LoRA r{R} on all linears, fp32, lora_dropout {args.dropout}"
          + (", selective checkpointing" if args.selective else ""))
    for d in (False, True):
        print(f"{'DoRA' if d else 'LoRA'}: measured {m[d] / gib:.2f} GiB, predicted {p[d] / gib:.2f} GiB ({m[d] / p[d]:.2f}x)")
    extra_m, extra_p = m[True] - m[False], p[True] - p[False]
    print(f"DoRA's extra: measured {extra_m / gib:.2f} GiB, predicted {extra_p / gib:.2f} GiB")
    print(json.dumps({"cpu": cpu_model(), "bf16_matmul_peak_gflops": peak_gflops, "selective": args.selective, "dropout": args.dropout,
                      "dora_extra_measured_over_predicted": round(extra_m / extra_p, 3),
                      "lora_measured_over_predicted": round(m[False] / p[False], 3),
                      "dora_measured_over_predicted": round(m[True] / p[True], 3)}))


if __name__ == "__main__":
    main()
