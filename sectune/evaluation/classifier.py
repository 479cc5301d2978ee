"""Test-set evaluation: metrics, report, per-row results and plots, written atomically.

Reproduces seed 004's ``evaluation_results/`` folder (confusion_matrix.png,
class_performance.png, inference_times.png, evaluation_report.txt, detailed_results.json) but
puts the classic baselines beside the model in the same report, and computes every number with
scikit-learn from the same ``y_true`` so they are comparable. Predictions outside ``labels``
(a generative model's free text) count as wrong and appear as an ``<other>`` column.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import (accuracy_score, classification_report, confusion_matrix,  # noqa: E402
                             f1_score, precision_recall_fscore_support)

from sectune.files import write_bytes_atomic  # noqa: E402

OTHER = "<other>"

log = logging.getLogger(__name__)


def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def scored_labels(y_true: List[str], labels: List[str]) -> List[str]:
    """The labels a macro mean runs over: those of ``labels`` that occur in ``y_true``. One set per split, the same
    for every row scored on it: with the labels a row predicted counted in too, a row that once predicted a class the
    split lacks (benign on OpenSSH, which has none) averaged in an extra F1 of 0 that the baseline's row did not
    (0.649 against 0.950 at equal accuracy). Such a wrong prediction still costs the true class its recall."""
    present = set(y_true)
    return [lab for lab in labels if lab in present] or list(labels)


def label_scores(y_true: List[str], y_pred: List[str], labels: List[str]) -> Dict[str, float]:
    """Accuracy, macro-F1 and weighted-F1 (a label never predicted counts as F1 0); the macro mean over
    :func:`scored_labels` (a label absent from ``y_true`` has no F1: a test split of benign rows alone scored
    macro-F1 0.5 for a perfect classifier)."""
    scored = scored_labels(y_true, labels)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=scored, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted",
                                      zero_division=0)),
    }


def _plot_confusion(y_true, y_pred, labels, path: Path) -> None:
    cols = labels + ([OTHER] if any(p not in set(labels) for p in y_pred) else [])
    mapped = [p if p in set(labels) else OTHER for p in y_pred]
    cm = confusion_matrix(y_true, mapped, labels=cols)[: len(labels)]
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = max(5.0, 0.45 * len(cols) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    if len(cols) <= 16:
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (counts; colour = row share)")
    _save_fig(fig, path)


def _plot_class_performance(p, r, f, labels, path: Path, split: str = "test") -> None:
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(labels) + 2), 4.5))
    for k, (vals, name) in enumerate(((p, "precision"), (r, "recall"), (f, "F1"))):
        ax.bar(x + (k - 1) * 0.27, vals, width=0.27, label=name)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.legend(loc="lower right")
    ax.set_title(f"Per-class precision / recall / F1 ({split})")
    _save_fig(fig, path)


def _plot_latencies(lat: np.ndarray, path: Path) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    if lat.size:
        ms = lat * 1000.0
        a1.hist(ms, bins=min(50, max(5, lat.size // 5)))
        a1.axvline(np.median(ms), color="k", ls="--", label=f"median {np.median(ms):.2f} ms")
        a1.legend()
        a2.plot(np.arange(lat.size), ms, lw=0.8)
    else:
        for a in (a1, a2):
            a.text(0.5, 0.5, "no latencies recorded", ha="center", va="center")
    a1.set_xlabel("latency (ms)")
    a1.set_ylabel("count")
    a1.set_title("Inference latency")
    a2.set_xlabel("call (row or batch) index")
    a2.set_ylabel("latency (ms)")
    a2.set_title("Latency per call")
    _save_fig(fig, path)


def write_evaluation(out_dir, *, y_true: Sequence, y_pred: Sequence, labels: Sequence[str],
                     latencies_s: Sequence[float] = (), scores: Optional[Sequence] = None,
                     baselines: Optional[Mapping[str, Sequence]] = None,
                     extra: Optional[Mapping] = None, generated: Sequence[str] = (), split: str = "test") -> Dict[str, float]:
    """Score ``y_pred`` against ``y_true`` and write the five evaluation files into ``out_dir``.

    ``latencies_s`` holds one entry per row (then stored per row) or per batch. ``scores`` is
    optional per-row confidence (a number, or a list/dict of class scores). ``baselines`` maps a
    name to its test predictions; the first one other than ``majority`` is the primary
    baseline (``baseline_test_macro_f1``), ``majority`` gives ``majority_test_macro_f1``. ``extra`` is
    copied into the summary (e.g. the split and the baselines' timings). ``generated``: the stand-ins sectune generated
    for missing real data that the rows come from; the report says so under its header (the console and result.json did).
    ``split``: which rows these are (``validation``, ``external``): the metric names, the report and the figure say it
    (validation rows were written up as ``test_*``, "same test rows" and "(test)": an audit, session 39).
    """
    y_true = [str(v) for v in y_true]
    y_pred = [str(v) for v in y_pred]
    labels = [str(v) for v in labels]
    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError(f"y_true ({len(y_true)}) and y_pred ({len(y_pred)}) must be equal, non-empty")
    if scores is not None and len(scores) != len(y_true):
        raise ValueError(f"scores has {len(scores)} entries for {len(y_true)} rows")
    unknown_true = sorted(set(y_true) - set(labels))
    if unknown_true:
        raise ValueError(f"y_true holds labels not in `labels`: {unknown_true[:10]}")
    baselines = dict(baselines or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lat = np.asarray(list(latencies_s), dtype=float)

    s = label_scores(y_true, y_pred, labels)
    metrics: Dict[str, float] = {f"test_{k}": v for k, v in s.items()}
    metrics["test_invalid_predictions"] = float(sum(p not in set(labels) for p in y_pred))
    metrics["test_rows"] = float(len(y_true))
    present = sorted(set(y_true))
    metrics["test_classes_present"] = float(len(present))
    if lat.size:
        metrics.update(latency_mean_s=float(lat.mean()), latency_p50_s=float(np.median(lat)),
                       latency_p95_s=float(np.percentile(lat, 95)))
        if lat.size == len(y_true) and lat.sum() > 0:
            metrics["rows_per_s"] = float(len(y_true) / lat.sum())
    base_scores: Dict[str, Dict[str, float]] = {}
    for name, preds in baselines.items():
        preds = [str(v) for v in preds]
        if len(preds) != len(y_true):
            raise ValueError(f"baseline {name!r} has {len(preds)} predictions for {len(y_true)} rows")
        base_scores[name] = label_scores(y_true, preds, labels)
        metrics[f"{name}_test_macro_f1"] = base_scores[name]["macro_f1"]
        metrics[f"{name}_test_accuracy"] = base_scores[name]["accuracy"]
    primary = next((n for n in baselines if n != "majority"), None)  # majority is a floor, not the bar
    if primary is not None:
        metrics["baseline_test_macro_f1"] = base_scores[primary]["macro_f1"]
        # the model's gap to the bar with its noise: a paired bootstrap over the same rows (sectune/evaluation/uncertainty.py)
        from sectune.evaluation.uncertainty import paired_bootstrap_diff

        gap = paired_bootstrap_diff(y_true, y_pred, [str(v) for v in baselines[primary]], labels)
        metrics.update(test_macro_f1_vs_baseline=gap["diff"], test_macro_f1_vs_baseline_ci95_low=gap["ci_low"],
                       test_macro_f1_vs_baseline_ci95_high=gap["ci_high"])

    # its "macro avg" line over the same labels as the summary's macro F1 below (over all labels it disagreed)
    report = classification_report(y_true, y_pred, labels=scored_labels(y_true, labels), digits=4, zero_division=0)
    lines = [
        "sectune evaluation report", "=" * 25, f"rows: {len(y_true)} ({split})   classes: {len(labels)}",
        *([f"data: GENERATED by sectune, not real ({', '.join(map(str, generated))}): the real data were not found, so "
           "these numbers describe the pipeline, not real data"] if generated else []), "",
        report, f"accuracy:     {s['accuracy']:.4f}", f"macro F1:     {s['macro_f1']:.4f}",
        f"weighted F1:  {s['weighted_f1']:.4f}",
        f"invalid predictions (not a label): {int(metrics['test_invalid_predictions'])}"]
    if len(present) == 1 and len(labels) > 1:  # a macro mean over one class is no comparison of classes
        lines.append(f"note: only one class occurs in these rows ({present[0]}): macro F1 is that class's F1 alone, "
                     f"and accuracy is the share of rows predicted {present[0]}; no other class is measured here")
        log.warning("evaluation: only one class (%s) occurs in the %d rows scored: macro F1 is that class's F1 alone "
                    "(%s/evaluation_report.txt)", present[0], len(y_true), out)
    if lat.size:
        lines.append(f"latency: mean {lat.mean() * 1000:.2f} ms, p50 {np.median(lat) * 1000:.2f} ms, "
                     f"p95 {np.percentile(lat, 95) * 1000:.2f} ms over {lat.size} calls")
    if base_scores:
        lines += ["", f"Model vs baselines (same {split} rows)",
                  f"{'system':<24}{'accuracy':>10}{'macro F1':>10}{'weighted F1':>13}",
                  f"{'model':<24}{s['accuracy']:>10.4f}{s['macro_f1']:>10.4f}{s['weighted_f1']:>13.4f}"]
        lines += [f"{n + (' (primary)' if n == primary else ''):<24}{b['accuracy']:>10.4f}"
                  f"{b['macro_f1']:>10.4f}{b['weighted_f1']:>13.4f}" for n, b in base_scores.items()]
        if primary is not None:
            lo, hi = metrics["test_macro_f1_vs_baseline_ci95_low"], metrics["test_macro_f1_vs_baseline_ci95_high"]
            lines.append(f"model - {primary}: macro F1 {metrics['test_macro_f1_vs_baseline']:+.4f}, 95% CI {lo:+.4f} to {hi:+.4f} "
                         f"(paired bootstrap over these {len(y_true)} rows): "
                         + ("above it beyond the noise" if lo > 0 else "below it beyond the noise" if hi < 0 else "within the noise"))
    write_bytes_atomic(out / "evaluation_report.txt", ("\n".join(lines) + "\n").encode("utf-8"))
    if split != "test":  # named for the rows they were computed on: validation scores are no test scores
        metrics = {k.replace("test_", f"{split}_"): v for k, v in metrics.items()}

    per_row_lat = lat.size == len(y_true)
    rows = []
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        row = {"index": i, "true": t, "pred": p, "correct": t == p}
        if scores is not None:
            sc = scores[i]
            row["score"] = sc.tolist() if hasattr(sc, "tolist") else sc
        if per_row_lat:
            row["latency_s"] = float(lat[i])
        rows.append(row)
    p, r, f, sup = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    summary = {
        "metrics": metrics, "labels": labels,
        "per_class": {lab: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]),
                            "support": int(sup[k])} for k, lab in enumerate(labels)},
        "baselines": base_scores, "primary_baseline": primary,
        "latencies_s": None if per_row_lat else lat.tolist(), "extra": dict(extra or {}),
    }
    detailed = {"summary": summary, "rows": rows,
                "baseline_predictions": {n: [str(v) for v in b] for n, b in baselines.items()}}
    write_bytes_atomic(out / "detailed_results.json",
                  json.dumps(detailed, ensure_ascii=False, default=str).encode("utf-8"))

    _plot_confusion(y_true, y_pred, labels, out / "confusion_matrix.png")
    _plot_class_performance(p, r, f, labels, out / "class_performance.png", split)
    _plot_latencies(lat, out / "inference_times.png")
    return metrics
