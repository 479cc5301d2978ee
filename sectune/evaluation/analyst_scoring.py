"""The analyst table's numbers (:mod:`sectune.evaluation.analyst_eval` builds the rows): each row's scores on a set of windows,
per source, which trained policy is best (chosen on the validation windows), each row against TF-IDF + LR and against
SFT (with paired bootstrap intervals: :mod:`sectune.evaluation.uncertainty`), and the metrics a pipeline's result.json carries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sectune.data.auth_rules import CLASSES
from sectune.evaluation.uncertainty import paired_bootstrap_diff

if TYPE_CHECKING:  # the types of the rows and windows analyst_eval builds
    from sectune.evaluation.analyst_eval import Row, Window


def verdict_scores(truth: list[str], pred: list[str]) -> dict:
    """Accuracy and macro-F1 over the verdicts that occur in the truth (evaluation.scored_labels: the same for
    every row of a subset; OpenSSH has no benign window, so a benign answer there is a wrong answer, not an
    extra F1 of 0 in one row's mean); an unparseable or unknown prediction is simply wrong."""
    from sectune.evaluation.classifier import label_scores

    return label_scores(truth, pred, list(CLASSES))


def score(row: Row, windows: list[Window]) -> dict:
    """Overall numbers of one row (rates in [0, 1]; None where the row has no such output)."""
    from sectune.data.auth_rewards import field_f1
    from sectune.infer_inputs import absent_names

    truth = [w.label for w in windows]
    s = verdict_scores(truth, row.verdicts)
    out = {"windows": len(windows), "verdict_accuracy": s["accuracy"], "verdict_macro_f1": s["macro_f1"],
           "json_valid_rate": None, "schema_valid_rate": None, "field_f1": None, "invented_names_rate": None,
           "analyses_per_s": (len(windows) / row.seconds) if row.seconds else None}
    if row.analyses is not None:
        out["json_valid_rate"] = sum(a is not None for a in row.analyses) / len(windows)
        out["schema_valid_rate"] = sum(row.schema_valid) / len(windows)
        out["field_f1"] = sum(field_f1(a, w.annotation) if a is not None else 0.0 for a, w in zip(row.analyses, windows)) / len(windows)
        # an analysis naming an address, host or user its window does not hold (stage=infer's absent_names)
        out["invented_names_rate"] = sum(bool(absent_names(a, w.log_text)) for a, w in zip(row.analyses, windows)) / len(windows)
    return out


def score_by_source(row: Row, windows: list[Window]) -> dict[str, dict]:
    """Per source: verdict numbers plus the host-name check (true / predicted benign shares, and
    the share of non-benign windows called benign)."""
    out = {}
    for src in sorted({w.source for w in windows}):
        idx = [i for i, w in enumerate(windows) if w.source == src]
        truth = [windows[i].label for i in idx]
        pred = [row.verdicts[i] for i in idx]
        s = verdict_scores(truth, pred)
        non_benign = [p for t, p in zip(truth, pred) if t != "benign"]
        d = {"windows": len(idx), "verdict_accuracy": s["accuracy"], "verdict_macro_f1": s["macro_f1"],
             "true_benign_rate": truth.count("benign") / len(idx), "pred_benign_rate": pred.count("benign") / len(idx),
             "non_benign_called_benign_rate": (non_benign.count("benign") / len(non_benign)) if non_benign else None}
        if row.analyses is not None:
            from sectune.data.auth_rewards import field_f1

            d["field_f1"] = sum(field_f1(row.analyses[i], windows[i].annotation) if row.analyses[i] is not None else 0.0 for i in idx) / len(idx)
            d["json_valid_rate"] = sum(row.analyses[i] is not None for i in idx) / len(idx)
        out[src] = d
    return out


def is_trained_policy(row: Row) -> bool:
    return row.kind == "policy" and row.step not in (None, "base") and not row.constrained


def best_policy(rows: list[Row], val_scores: dict[str, dict]) -> Row | None:
    """The trained policy (not base, not constrained) with the highest verdict macro-F1 on the VALIDATION windows,
    then field F1, then the later step: ``val_scores`` are those windows' scores, never the test table's (the
    best of k rows on test is an optimistic row, ~+0.06 macro-F1 for 3 equal policies on 43 windows). Without
    validation scores: the last trained step."""
    trained = [(i, r) for i, r in enumerate(rows) if is_trained_policy(r)]
    if not trained:
        return None
    if not all(r.name in val_scores for _, r in trained):
        return trained[-1][1]
    return max(trained, key=lambda ir: (val_scores[ir[1].name]["verdict_macro_f1"], val_scores[ir[1].name]["field_f1"] or 0.0, ir[0]))[1]


def compare(rows: list, scores: dict, truth: list[str], baseline, best, seed: int) -> None:
    """Into ``scores``: every row against TF-IDF + LR (beats / ties / loses and the difference), the best policy (and its
    constrained row) with a 95% paired bootstrap interval of that difference, and each trained policy against SFT."""
    bar = scores[baseline.name]["verdict_macro_f1"]
    sft = next((p for p in rows if p.step == "sft" and is_trained_policy(p)), None)
    for r in rows:
        if r is not baseline and r.kind != "rules":
            diff = scores[r.name]["verdict_macro_f1"] - bar
            scores[r.name]["vs_tfidf_lr"] = "loses" if diff < -1e-9 else "beats" if diff > 1e-9 else "ties"
            scores[r.name]["vs_tfidf_lr_diff"] = diff
        if best is not None and r.kind == "policy" and r.step == best.step:  # the bar's claim with its noise
            ci = paired_bootstrap_diff(truth, r.verdicts, baseline.verdicts, CLASSES, seed=seed)
            scores[r.name].update(vs_tfidf_lr_ci95=[ci["ci_low"], ci["ci_high"]], vs_tfidf_lr_share_not_above=ci["share_not_above"])
        # what GRPO / DPO added to the SFT policy, with its noise: for a policy that started from it (pipeline_heldout names
        # those "SFT+..."; one from a fresh adapter on the base model was compared as SFT's continuation: session 42)
        if sft is not None and is_trained_policy(r) and r is not sft and r.name.startswith("SFT+"):
            ci = paired_bootstrap_diff(truth, r.verdicts, sft.verdicts, CLASSES, seed=seed)
            scores[r.name].update(vs_sft_diff=ci["diff"], vs_sft_ci95=[ci["ci_low"], ci["ci_high"]])


def table_metrics(rows: list[Row], scores: dict, best: Row | None, baseline: Row, val_scores: dict | None = None) -> dict:
    """The numbers the pipeline's result.json carries (names the checks rely on, plus per step); the chosen policy's
    validation verdict macro-F1 too (``heldout_val_verdict_macro_f1``): what a sweep of pipelines is ranked by, never
    the test table's."""
    m: dict = {"heldout_windows": scores[baseline.name]["windows"], "baseline_verdict_macro_f1": scores[baseline.name]["verdict_macro_f1"]}
    if best is not None and best.name in (val_scores or {}):
        m["heldout_val_verdict_macro_f1"] = val_scores[best.name]["verdict_macro_f1"]
    if best is not None:
        b = scores[best.name]
        m.update(heldout_json_valid_rate=b["json_valid_rate"], heldout_schema_valid_rate=b["schema_valid_rate"],
                 heldout_verdict_macro_f1=b["verdict_macro_f1"], heldout_verdict_accuracy=b["verdict_accuracy"],
                 heldout_field_f1=b["field_f1"], heldout_invented_names_rate=b["invented_names_rate"])
        if "vs_tfidf_lr_ci95" in b:
            m.update(heldout_vs_baseline_ci95_low=b["vs_tfidf_lr_ci95"][0], heldout_vs_baseline_ci95_high=b["vs_tfidf_lr_ci95"][1])
    for r in rows:
        if r.kind == "policy" and r.step:
            prefix = f"{r.step}_grounded" if r.grounded else f"{r.step}_constrained" if r.constrained else r.step
            s = scores[r.name]
            for k in ("verdict_macro_f1", "verdict_accuracy", "field_f1", "json_valid_rate", "schema_valid_rate", "invented_names_rate",
                      "analyses_per_s"):
                m[f"{prefix}_{k}"] = s[k]
            if "vs_sft_ci95" in s:  # e.g. rl_vs_sft_verdict_macro_f1 and its 95% interval
                m[f"{prefix}_vs_sft_verdict_macro_f1"] = s["vs_sft_diff"]
                m[f"{prefix}_vs_sft_ci95_low"], m[f"{prefix}_vs_sft_ci95_high"] = s["vs_sft_ci95"]
        elif r.kind == "rules":
            m["rules_verdict_macro_f1"] = scores[r.name]["verdict_macro_f1"]
        elif r is not baseline:
            m["majority_verdict_macro_f1"] = scores[r.name]["verdict_macro_f1"]
    return m
