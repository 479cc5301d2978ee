"""Flows/s of batched scoring vs one flow at a time (the seeds' loop), same model, same rows, same run.

    .venv/bin/python bench/eval_throughput.py                     # fresh tiny seq_cls model, real CIC sample
    .venv/bin/python bench/eval_throughput.py --run-dir <classify run dir> [--rows 256]
    .venv/bin/python bench/eval_throughput.py --head generative      # + the seeds' generate-and-parse loop

Without ``--run-dir`` a tiny Llama with a fresh (untrained) seq_cls head is built, so F1 is only
meaningful with a trained run; the throughput ratio is the point. The RandomForest baseline is
fitted on the same train split and timed on the same rows. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402


@torch.no_grad()
def seeds_loop_label(model, tok, text: str, labels, max_len: int, max_new: int) -> str:
    """One flow as the seeds do it: tokenize, ``generate``, decode, find a label in the text."""
    enc = tok(text, return_tensors="pt", truncation=True, max_length=max_len).to(model.device)
    out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    hits = [lab for lab in sorted(labels, key=len, reverse=True) if answer.startswith(lab)]
    return hits[0] if hits else labels[0]  # unparseable output: counted as the first label


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default=None, help="a classify run dir (default: a fresh tiny model)")
    ap.add_argument("--rows", type=int, default=256, help="test rows to score")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--head", choices=["seq_cls", "generative"], default="seq_cls", help="head of the fresh model (without --run-dir)")
    ap.add_argument("--autocast", choices=["run", "none", "bf16"], default="run",
                    help="scoring precision: the run's training precision (default), fp32, or bf16 autocast")
    ap.add_argument("--seed-loop-rows", type=int, default=32, help="rows for the seeds' generate-and-parse loop (generative head)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from contrastive_throughput import cpu_model
    from sft_throughput import matmul_peak_flops

    peak_gflops = round(matmul_peak_flops(torch.get_num_threads())["peak_flops"] / 1e9, 1)

    from hydra import compose, initialize_config_dir

    from sectune import config
    from sectune.evaluation import classify_scoring as S
    from sectune.evaluation.baselines import random_forest_baseline
    from sectune.models import modeling
    from sectune.paths import PROJECT_ROOT
    from sectune.predict import Predictor, read_classify_run
    from sectune.training import classification as C
    from sectune.training import classify_encoding as E

    config.register()
    if args.run_dir:
        if not (Path(args.run_dir) / "result.json").is_file():  # the error named evaluate.model_dir (session 36)
            raise SystemExit(f"--run-dir {args.run_dir}: not a classify run dir (no result.json there)")
        cfg, _ = read_classify_run(args.run_dir)
        pred = Predictor.from_run(args.run_dir)
        model, tok, head, labels, max_len = pred.model, pred.tokenizer, pred.meta["head"], pred.labels, pred.meta["max_length"]
        members = pred.members  # a classify.folds run: every member scores every row, as the Predictor does
        threshold, autocast = pred.meta.get("threshold"), pred.meta.get("autocast")
    else:
        with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["stage=classify", "dataset=cic_iot_2023_merged", "dataset.max_samples=4000"])
        model, tok, head, threshold, members = None, None, args.head, None, None
        autocast = S.scoring_autocast(cfg)
    if args.autocast != "run":
        autocast = None if args.autocast == "none" else args.autocast
    data = C.build_labelled_data(cfg)
    if not data.features:
        raise SystemExit(f"bench/eval_throughput.py times flow classifiers; {args.run_dir} is a {cfg.dataset.name} (text) run")
    if model is None:
        labels, max_len = data.labels, cfg.model.max_seq_length
        path = modeling.model_path(cfg)
        tok = modeling.load_tokenizer(cfg, path)
        if head == "seq_cls":
            model = modeling.load_model(cfg, task="seq_cls", num_labels=len(labels), path=path).eval()
        else:
            model = modeling.load_model(cfg, path=path).eval()
        members = [(model, None)]
    # a seeded random subset: the split keeps file order, which is grouped by label
    import random

    test = list(data.splits["test"])
    random.Random(0).shuffle(test)
    test = test[: args.rows]
    texts, y = [r["text"] for r in test], [r["label"] for r in test]

    def timed(bs, repeats=3):
        kw = dict(head=head, labels=labels, batch_size=bs, max_length=max_len, autocast=autocast)
        S.score_members(members, tok, texts[: max(2, bs)], **kw)  # warm-up: at least one full batch of the timed shape
        best = float("inf")
        for _ in range(repeats):  # the best of a few passes: one pass of a fast side lasts well under a second
            t0 = time.perf_counter()
            probs, _ = S.score_members(members, tok, texts, **kw)
            best = min(best, time.perf_counter() - t0)
        return probs, best

    probs_b, t_b = timed(args.batch_size)
    probs_1, t_1 = timed(1)
    pred_b, pred_1 = S.decide(probs_b, labels, threshold), S.decide(probs_1, labels, threshold)
    agree = sum(a == b for a, b in zip(pred_b, pred_1)) / len(y)
    rf = random_forest_baseline([[r["features"][f] for f in data.features] for r in data.splits["train"]],
                                [r["label"] for r in data.splits["train"]],
                                [[r["features"][f] for f in data.features] for r in test], seed=0)
    f1 = lambda p: f1_score(y, p, labels=labels, average="macro", zero_division=0)  # noqa: E731
    rows = [
        ("LLM batched", f1(pred_b), len(y) / t_b),
        ("LLM one-at-a-time", f1(pred_1), len(y) / t_1),
        ("RandomForest", f1(rf.predictions), rf.rows_per_s),
    ]
    seed_loop = None
    if head == "generative":
        # Seeds 001/004's loop: per flow, generate the label text greedily and parse it.
        # F1 over those rows only, so it is not comparable with the rows above.
        n = min(args.seed_loop_rows, len(y))
        max_new = max(len(x) for x in E.label_token_ids(tok, labels))
        t0 = time.perf_counter()
        with S.autocast_context(next(model.parameters()).device, autocast):  # the same precision as the rows above
            seed_pred = [seeds_loop_label(model, tok, t, labels, max_len, max_new) for t in texts[:n]]
        seed_loop = n / (time.perf_counter() - t0)
        rows.append((f"seeds' loop ({n} rows)", f1_score(y[:n], seed_pred, labels=labels, average="macro", zero_division=0), seed_loop))
    print(f"CPU: {cpu_model()} · bf16 matmul peak {peak_gflops} GFLOP/s on {torch.get_num_threads()} thread(s)")
    print(f"model={cfg.model.name} head={head} rows={len(y)} batch_size={args.batch_size} threads={torch.get_num_threads()} autocast={autocast}"
          f" members={len(members)} run_dir={args.run_dir or '(fresh tiny, untrained head)'}")
    print(f"{'system':<20}{'macro F1':>10}{'flows/s':>12}")
    for name, f, r in rows:
        print(f"{name:<20}{f:>10.4f}{r:>12.1f}")
    print(f"batched vs one-at-a-time predictions agree on {agree:.1%} of rows")
    print(json.dumps({
        "flows_per_s_batched": round(rows[0][2], 2), "flows_per_s_one_at_a_time": round(rows[1][2], 2),
        "flows_per_s_ratio_vs_one_at_a_time": round(rows[0][2] / rows[1][2], 2),
        "llm_macro_f1": round(rows[0][1], 4), "rf_macro_f1": round(rows[2][1], 4),
        "rf_flows_per_s": round(rows[2][2], 1), "rows": len(y), "members": len(members), "head": head, "autocast": autocast, "batch_size": args.batch_size, "prediction_agreement": round(agree, 4),
        "cpu": cpu_model(), "bf16_matmul_peak_gflops": peak_gflops,
        **({"flows_per_s_seeds_loop": round(seed_loop, 2), "flows_per_s_ratio_vs_seeds_loop": round(rows[0][2] / seed_loop, 2)}
           if seed_loop else {}),
    }))


if __name__ == "__main__":
    main()
