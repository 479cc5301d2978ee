"""sectune's causal-contrastive step vs seed 002's pattern: triplets/s and peak RSS, batched vs separate forwards.

Every side trains the same SmolLM-135M-sized Llama (hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate
1536, vocabulary 49,152, tied embeddings; random init, seed 0) under the same LoRA adapter (r 16 on every
linear, seed 002's), fp32, AdamW, on the same triplets (``sectune.data.injection.triplet_splits`` of the real
auth-log windows, rendered as the analyst's prompts, each prompt cut to a ``--prompt-tokens`` window and each answer to
``--answer-tokens`` tokens with the tiny BPE tokenizer), ``--batch`` triplets per step, the same loss
(``sectune.losses.causal_contrastive_loss``, mean-pooled prompt representations) and the same step loop
(forward, loss, backward, AdamW step). Only the forward pattern differs:

* ``three_forwards`` — seed 002: ``model(...)`` on the benign input (prompt + answer, HF's LM loss on the answer
  tokens), the counterfactual and the injected prompt, each with ``output_hidden_states=True``: LM-head logits
  at every position of all three.
* ``separate`` — ``sectune.training.contrastive_trainer.triplet_forward`` with sectune's defaults (``contrastive.forward``
  = separate, ``contrastive.layer`` = -1, ``contrastive.share_prefix`` = true): the decoder body three times, the
  injected one only from the token prefix it shares with the benign prompt on (on the benign forward's KV cache),
  the LM head on the benign answer positions only. This is the side the target ratio is read from.
* ``separate_full_inj`` — the same with ``share_prefix=false`` (the whole injected prompt through the decoder).
* ``batched`` — the same with ``forward=batched``: one forward of the three inputs padded into one batch.
* ``separate_mid`` — ``separate`` with ``contrastive.layer`` = L/2: the counterfactual and injected forwards
  stop after layer 15 of 30 (what ``contrastive.layer`` buys).

The prompt window: the injected prompt shares its first tokens with the benign one (the instruction is planted in
one log line), about half of it on the full real prompts. Cutting every prompt to its first ``--prompt-tokens``
tokens would leave most injections outside the cut (the injected prompt ~all shared prefix: a saving the real data
does not give), so each triplet's three prompts are cut to the same ``--prompt-tokens`` window placed so that the
shared share of the injected window equals that triplet's share on its full prompts (the bench prints both means).

Each side runs in its own subprocess (its ``VmHWM`` is that side's peak RSS), ``--warmup`` untimed steps then
``--steps`` timed ones (median step time). On a shared CPU run with one thread (OMP_NUM_THREADS=1):

    OMP_NUM_THREADS=1 .venv/bin/python bench/contrastive_throughput.py     # ~4-6 min: 2 interleaved runs per side

The last line of output is one JSON object holding ``triplets_per_s_ratio_vs_three_forwards``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _child import emit, run_child  # noqa: E402
from sectune.run_records import cpu_model  # noqa: E402
MODEL = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
             vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
#: side → (contrastive.forward, contrastive.layer, contrastive.share_prefix); None = seed 002's three full forwards
SIDES = {"three_forwards": None, "separate": ("separate", -1, True), "separate_full_inj": ("separate", -1, False),
         "batched": ("batched", -1, False), "separate_mid": ("separate", 15, True)}
TARGET_RATIO = 1.3


def triplet_rows(args, tokenizer) -> list[dict]:
    from hydra import compose, initialize_config_dir

    from sectune import config
    from sectune.data.injection import triplet_splits
    from sectune.stages.contrastive import triplet_prompts
    from sectune.training.contrastive_trainer import encode_triplets

    config.register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["stage=contrastive", "loss=causal_contrastive", "dataset=injection_triplets", "logger=none"])
    recs = [triplet_prompts(r) for r in triplet_splits(cfg)["train"]]
    rows, _ = encode_triplets(tokenizer, recs, 100_000)
    # the injected prompt's shared-prefix share over every training triplet, beside the bench's few
    split_share = statistics.mean(r["inj_shared"] / len(r["inj_ids"]) for r in rows)
    return [{**cut_row(r, args.prompt_tokens, args.answer_tokens), "split_share": split_share}
            for r in representative_rows(rows, args.batch * (args.warmup + args.steps))]


def representative_rows(rows: list[dict], n: int) -> list[dict]:
    """``n`` triplets whose injected prompts share as much prefix as the training split's do: the rows at the
    n quantile midpoints of the shared share, in split order. The split's first ``n`` rows are not: the share is
    what ``contrastive.share_prefix`` saves, and the first four shared 62% against the split's 48%."""
    share = lambda r: r["inj_shared"] / len(r["inj_ids"])  # noqa: E731
    order = sorted(range(len(rows)), key=lambda i: share(rows[i]))
    picks = sorted({order[min(len(rows) - 1, int((k + 0.5) * len(rows) / n))] for k in range(min(n, len(rows)))})
    return [rows[i] for i in picks]


def cut_row(r: dict, p: int, a: int) -> dict:
    """The triplet's prompts cut to one ``p``-token window, placed so that the injected window's shared-prefix share
    is its full prompt's (``inj_shared`` / its length); the benign answer cut to ``a`` tokens."""
    from sectune.training.contrastive_trainer import shared_prefix

    full_share = r["inj_shared"] / len(r["inj_ids"])
    start = max(0, min(r["inj_shared"] - round(p * full_share), min(r["b_prompt_len"], len(r["cf_ids"]), len(r["inj_ids"])) - p))
    prompt = r["b_ids"][: r["b_prompt_len"]][start : start + p]
    cut = {"b_ids": prompt + r["b_ids"][r["b_prompt_len"] : r["b_prompt_len"] + a], "b_prompt_len": len(prompt),
           "cf_ids": r["cf_ids"][start : start + p], "inj_ids": r["inj_ids"][start : start + p], "full_share": full_share}
    cut["inj_shared"] = shared_prefix(prompt, cut["inj_ids"])
    return cut


def child(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from sectune.losses import causal_contrastive_loss
    from sectune.models.modeling import load_tokenizer
    from sectune.training import contrastive_trainer as CT
    from sectune.training.engine import peak_rss_bytes

    torch.set_num_threads(args.threads)
    from hydra import compose, initialize_config_dir

    from sectune import config

    config.register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none"])
    tokenizer = load_tokenizer(cfg)
    rows = triplet_rows(args, tokenizer)
    collate = CT.TripletCollator(tokenizer.pad_token_id)
    batches = [collate(rows[i : i + args.batch]) for i in range(0, len(rows), args.batch)]

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, pad_token_id=tokenizer.pad_token_id))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    head_rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[:-1].numel()))

    def three_forwards(batch):
        out_b = model(input_ids=batch["b_input_ids"], attention_mask=batch["b_attention_mask"], labels=batch["b_labels"], output_hidden_states=True)
        reps = [CT.pool(out_b.hidden_states[-1], batch["b_prompt_lens"], "mean")]
        for g in ("cf", "inj"):
            out = model(input_ids=batch[f"{g}_input_ids"], attention_mask=batch[f"{g}_attention_mask"], output_hidden_states=True)
            reps.append(CT.pool(out.hidden_states[-1], batch[f"{g}_attention_mask"].sum(1), "mean"))
        return (*reps, out_b.loss)

    side = SIDES[args.child]
    fwd = three_forwards if side is None else (
        lambda b: CT.triplet_forward(model, b, layer=side[1], pooling="mean", forward=side[0], share_prefix=side[2]))
    times, losses = [], []
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        r_b, r_cf, r_inj, task = fwd(batch)
        loss, _ = causal_contrastive_loss(r_b, r_cf, r_inj, task)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    step = statistics.median(times)
    tokens = sum(int(b[f"{g}_attention_mask"].sum()) for b in batches for g in CT.GROUPS) / len(batches)
    return {"triplets_per_s": args.batch / step, "step_median_s": step, "peak_rss_bytes": peak_rss_bytes(),
            "lm_head_rows_per_step": sum(head_rows) / len(batches), "tokens_per_step": tokens, "first_loss": losses[0],
            "inj_shared_share": statistics.mean(r["inj_shared"] / len(r["inj_ids"]) for r in rows),
            "inj_shared_share_full_prompts": statistics.mean(r["full_share"] for r in rows),
            "inj_shared_share_train_split": rows[0]["split_share"],
            "params": sum(p.numel() for p in model.parameters())}


def run_side(name: str, args) -> dict:
    return run_child(__file__, [name, "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                                "--prompt-tokens", str(args.prompt_tokens), "--answer-tokens", str(args.answer_tokens),
                                "--threads", str(args.threads)], name, threads=args.threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=1, help="triplets per step (seed 002: 1)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="each prompt cut to this many tokens")
    ap.add_argument("--answer-tokens", type=int, default=48, help="each benign answer cut to this many tokens")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))  # an empty export: 1
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per side (order reversed every other repeat); medians")
    ap.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        emit(child(args))
        return

    from sft_throughput import matmul_peak_flops

    t0 = time.perf_counter()
    peaks = [matmul_peak_flops(args.threads)]
    runs: dict[str, list[dict]] = {}
    # sides interleaved (A B C …, … C B A): the baseline is measured beside every side, not once at the start,
    # so a shared machine's changing load does not land on one side only
    for rep in range(args.repeats):
        for name in (list(SIDES) if rep % 2 == 0 else list(SIDES)[::-1]):
            runs.setdefault(name, []).append(r := run_side(name, args))
            print(f"  run {rep + 1}/{args.repeats} {name:<17} {r['triplets_per_s']:.3f} triplets/s  step {r['step_median_s']:.2f}s  "
                  f"RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    res = {name: {**rs[0], **{k: statistics.median(r[k] for r in rs) for k in ("triplets_per_s", "step_median_s", "peak_rss_bytes")}}
           for name, rs in runs.items()}
    peaks.append(matmul_peak_flops(args.threads))
    peak_gflops = round(max(p["peak_flops"] for p in peaks) / 1e9, 1)
    base = res["three_forwards"]
    print(f"\nbf16 matmul peak (best of 1024/2048/3072², start/end): {peak_gflops} GFLOP/s on {args.threads} thread(s)")
    print(f"causal-contrastive step · {cpu_model()} · {args.threads} thread(s) · Llama {base['params'] / 1e6:.1f}M params "
          f"(SmolLM-135M shape, vocab 49,152), LoRA r16 all-linear, fp32 · batch {args.batch} triplet(s) · ~{base['tokens_per_step']:.0f} "
          f"tokens/step · {args.warmup}+{args.steps} steps × {args.repeats} interleaved runs (medians)")
    print(f"{'':<16}{'triplets/s':>11}{'s/step':>8}{'vs 3 fwd':>9}{'LM-head rows':>13}{'peak RSS':>10}")
    for name, r in res.items():
        print(f"{name:<16}{r['triplets_per_s']:>11.3f}{r['step_median_s']:>8.2f}{r['triplets_per_s'] / base['triplets_per_s']:>8.2f}x"
              f"{r['lm_head_rows_per_step']:>13.0f}{r['peak_rss_bytes'] / 2**20:>8.0f}Mi")
    from sectune.config import ContrastiveConfig

    # what a run uses unless told otherwise; the bench has a side for sectune's default config and says so
    defaults = (ContrastiveConfig.forward, ContrastiveConfig.layer, ContrastiveConfig.share_prefix)
    default_name = next((n for n, v in SIDES.items() if v is not None and v[:2] == defaults[:2] and (v[0] == "batched" or v[2] == defaults[2])), None)
    if default_name is None:
        raise SystemExit(f"no bench side runs sectune's default contrastive config {defaults}")
    default = res[default_name]
    ratio = default["triplets_per_s"] / base["triplets_per_s"]
    faster = max(("separate", "separate_full_inj", "batched"), key=lambda n: res[n]["triplets_per_s"])
    print(f"injected prompt's prefix shared with the benign prompt: {base['inj_shared_share']:.1%} of its tokens in the bench's windows, "
          f"{base['inj_shared_share_full_prompts']:.1%} on their full prompts, {base['inj_shared_share_train_split']:.1%} over all "
          "training triplets' full prompts")
    print(f"  {'PASS' if ratio >= TARGET_RATIO else 'MISS'}  triplets/s ratio (default: {default_name}, last layer) {ratio:.2f} vs target {TARGET_RATIO}; "
          f"faster forward here: {faster}; measured peak RSS {default['peak_rss_bytes'] / 2**20:.0f} MiB vs {base['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(json.dumps({
        "triplets_per_s_ratio_vs_three_forwards": round(ratio, 3),
        "batched_ratio_vs_three_forwards": round(res["batched"]["triplets_per_s"] / base["triplets_per_s"], 3),
        "separate_mid_layer_ratio_vs_three_forwards": round(res["separate_mid"]["triplets_per_s"] / base["triplets_per_s"], 3),
        "separate_full_inj_ratio_vs_three_forwards": round(res["separate_full_inj"]["triplets_per_s"] / base["triplets_per_s"], 3),
        "inj_shared_share": round(base["inj_shared_share"], 3), "inj_shared_share_full_prompts": round(base["inj_shared_share_full_prompts"], 3),
        "inj_shared_share_train_split": round(base["inj_shared_share_train_split"], 3),
        "default_forward": default_name, "faster_forward": faster,
        "peak_rss_ratio_vs_three_forwards": round(default["peak_rss_bytes"] / base["peak_rss_bytes"], 3),
        **{f"{n}_triplets_per_s": round(r["triplets_per_s"], 4) for n, r in res.items()},
        **{f"{n}_peak_rss_bytes": r["peak_rss_bytes"] for n, r in res.items()},
        "threads": args.threads, "batch": args.batch, "repeats": args.repeats, "cpu": cpu_model(), "bf16_matmul_peak_gflops": peak_gflops,
        "bench_wall_s": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
