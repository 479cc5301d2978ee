"""Round twenty-three: the 43 test windows cannot tell the analyst from TF-IDF + LR (every gap's 95% interval spans
zero). More decisions from the same held-out lines: each test window and up to K spans cut from it (`dataset.subwindows`'
cutter, annotated by the rule engine: a cut moves counts across the rules' thresholds, the decision the analyst gets
wrong), scored for the SFT policy, the pipeline's SFT+GRPO policy, TF-IDF + LR (trained as the held-out table trains
it) and the majority class. The spans of one window are not independent, so every interval is a paired bootstrap over
the 43 parent windows (a resample draws windows with all their spans). No line outside the test split is read.

    python experiments/auth_grpo/dense_test.py <pipeline dir> [more pipeline dirs]   # K=8 (env DENSE_K)

A pipeline dir is `sectune +experiment=auth_grpo_tiny train.seed=S`'s run dir (sft/model, rl/adapter).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from sectune.data import auth_logs
from sectune.data.auth_rewards import field_f1
from sectune.evaluation import analyst_eval as ae
from sectune.evaluation.analyst_scoring import score
from sectune.evaluation.classifier import label_scores
from sectune.stages.pipeline import compose

LABELS = ["benign", "suspicious", "malicious"]
K = int(os.environ.get("DENSE_K", "8"))


def dense_windows(test: list[ae.Window], min_lines: int) -> tuple[list[ae.Window], np.ndarray]:
    """Each test window, then up to K spans of it; and each item's parent index."""
    rng = random.Random("dense-test")
    items, parent = [], []
    for p, w in enumerate(test):
        items.append(w)
        parent.append(p)
        for j, text in enumerate(auth_logs.subwindows(w.log_text, K, rng, min_lines)):
            items.append(ae.Window(f"{w.id}~{j}", w.source, auth_logs.render_prompt(text), text,
                                   auth_logs.analyze_auth_log(text.splitlines())))
            parent.append(p)
    return items, np.asarray(parent)


def cluster_bootstrap(stat, parent: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, 2.5%, 97.5%) with the parent windows resampled, each with all its items."""
    groups = [np.flatnonzero(parent == p) for p in range(parent.max() + 1)]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        idx = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
        draws.append(stat(idx))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return stat(np.arange(len(parent))), float(lo), float(hi)


def main(dirs: list[str]) -> None:
    out, pooled = {}, []
    for d in map(Path, dirs):
        seed = int(OmegaConf.load(d / ".hydra" / "config.yaml").train.seed)
        cfg = compose(["+experiment=auth_grpo_tiny", "dataset.subwindows=1", f"train.seed={seed}"])
        windows = ae.load_windows(cfg)
        items, parent = dense_windows(windows["test"], int(cfg.dataset.min_lines))
        truth = np.asarray([w.label for w in items])
        rows = {}
        for name, kind, path in (("SFT", "model", d / "sft" / "model"), ("SFT+GRPO", "adapter", d / "rl" / "adapter")):
            model, tok = ae.load_policy(cfg, kind, path)
            rows[name] = ae.generate_row(name, model, tok, items, cfg, 16)
        rows["TF-IDF + LR"] = ae.tfidf_row(windows["train"], windows["validation"], items, seed)
        rows["majority"] = ae.majority_row(windows["train"], items)
        pred = {k: np.asarray(r.verdicts) for k, r in rows.items()}
        fields = {k: np.asarray([field_f1(a, w.annotation) if a is not None else 0.0 for a, w in zip(r.analyses, items)])
                  for k, r in rows.items() if r.analyses is not None}

        def f1(k):
            return lambda i: label_scores(list(truth[i]), list(pred[k][i]), LABELS)["macro_f1"]

        res = {"seed": seed, "items": len(items), "windows": int(parent.max() + 1),
               "verdicts": {v: int((truth == v).sum()) for v in LABELS}}
        for k, r in rows.items():
            s = score(r, items)
            res[k] = {"verdict_macro_f1": s["verdict_macro_f1"], "verdict_accuracy": s["verdict_accuracy"], "field_f1": s["field_f1"],
                      "schema_valid_rate": s["schema_valid_rate"]}
        for a, b in (("SFT", "TF-IDF + LR"), ("SFT+GRPO", "TF-IDF + LR"), ("SFT+GRPO", "SFT")):
            fa, fb = f1(a), f1(b)
            res[f"{a} - {b} verdict macro-F1"] = cluster_bootstrap(lambda i: fa(i) - fb(i), parent)
        res["SFT+GRPO - SFT field F1"] = cluster_bootstrap(lambda i: float(fields["SFT+GRPO"][i].mean() - fields["SFT"][i].mean()), parent)
        # the 43 windows alone, the same way, for comparison with the held-out table
        whole = np.flatnonzero([w is windows["test"][p] for w, p in zip(items, parent)])
        res["windows only: SFT - TF-IDF + LR verdict macro-F1"] = f1("SFT")(whole) - f1("TF-IDF + LR")(whole)
        out[str(d)] = res
        print(json.dumps(res, indent=1), flush=True)
        pooled.append((truth, pred, parent))
    if len(pooled) > 1:  # the recipe over its seeds: each resample's gap averaged over the seeds (same windows each)
        truth, _, parent = pooled[0]
        for a, b in (("SFT", "TF-IDF + LR"), ("SFT+GRPO", "SFT")):
            def gap(i, a=a, b=b):
                return float(np.mean([label_scores(list(t[i]), list(p[a][i]), LABELS)["macro_f1"]
                                      - label_scores(list(t[i]), list(p[b][i]), LABELS)["macro_f1"] for t, p, _ in pooled]))
            out[f"mean over {len(pooled)} seeds: {a} - {b} verdict macro-F1"] = cluster_bootstrap(gap, parent)
            print(f"mean over {len(pooled)} seeds: {a} - {b} verdict macro-F1", out[f"mean over {len(pooled)} seeds: {a} - {b} verdict macro-F1"])
    Path(os.environ.get("DENSE_OUT", "dense_test.json")).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    if not sys.argv[1:]:  # it wrote {} over the last result (session 36)
        sys.exit("usage: dense_test.py <pipeline dir> [<pipeline dir> ...]  (DENSE_OUT=<file>, default dense_test.json)")
    main(sys.argv[1:])
