"""The classic baseline beside every attack success rate: TF-IDF + logistic regression on the window text (the held-out
table's, :func:`sectune.evaluation.baselines.tfidf_logreg_baseline`), scored on the same injected and clean windows as
the analyst, in the same run.

It is fitted on the training split's windows, each clean once and every injected one, each with its expected verdict:
the adversarial training a defended analyst gets (an injected window is labelled with the rules' analysis of the
injected window, as the analyst's answer is scored). ``C`` is picked on the validation split's windows; when validation
is the split being scored, by 5-fold cross-validation over the training windows instead (a window's clean and injected
copies in one fold). It follows no instruction: an injection reaches it only as text. Not computed, with the reason,
for prompt/answer triplets (no verdict), without training triplets (a file of held-out triplets alone) and when the
training windows hold one verdict only.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from sectune.evaluation.injection_eval import outcome_metrics, rate, verdict_outcome

#: what the baseline's rows say about how it was fitted (injection_eval.json's ``baseline``)
FITTED_ON = "the training split's windows, clean and injected, with their expected verdicts"


def _verdict(answer: str) -> str:
    return json.loads(answer)["verdict"]


def _rows(records: Sequence[dict]) -> tuple[list[str], list[str], list[str]]:
    """(texts, verdicts, window ids): each window clean once, then every injected window."""
    clean: dict[str, tuple[str, str]] = {}
    for r in records:
        clean.setdefault(str(r.get("window_id", r["id"])), (r["benign"], _verdict(r["output"])))
    texts = [t for t, _ in clean.values()] + [r["injection"] for r in records]
    labels = [y for _, y in clean.values()] + [_verdict(r["injection_output"]) for r in records]
    windows = list(clean) + [str(r.get("window_id", r["id"])) for r in records]
    return texts, labels, windows


def _grouped_folds(windows: Sequence[str], k: int = 5) -> list[np.ndarray]:
    """Held-out row indices of k folds, every row of a window in the same fold."""
    order = {w: i % k for i, w in enumerate(sorted(set(windows)))}
    folds = [np.flatnonzero([order[w] == f for w in windows]) for f in range(k)]
    return [f for f in folds if len(f)]


def baseline_attack_metrics(splits: dict[str, list[dict]], records: Sequence[dict], split: str,
                            seed: int = 0) -> tuple[dict | None, str]:
    """(``{"metrics": baseline_* metrics, "verdicts": [(injected, clean) per record], "params": …}``, "") for the
    records of ``split``; (None, why) where there is no such baseline."""
    from sectune.evaluation.baselines import tfidf_logreg_baseline

    if not records or any(r.get("format", "auth_log") != "auth_log" for r in records):
        return None, "prompt/answer triplets have no verdict to classify"
    if split == "train":
        return None, "it would be scored on the windows it is fitted on"
    train = splits.get("train") or []
    if not train:
        return None, "no training triplets to fit it on (a file of held-out triplets alone)"
    texts, labels, windows = _rows(train)
    if len(set(labels)) < 2:
        return None, f"the training windows hold one verdict only ({labels[0]})"
    val = (splits.get("validation") or []) if split != "validation" else []
    if val:
        val_texts, val_labels, _ = _rows(val)
        choice = {"val_texts": val_texts, "val_y": val_labels}
    else:  # folds whose training part holds one verdict only cannot fit a classifier: left out (C=1 without two)
        folds = [f for f in _grouped_folds(windows) if len(set(np.delete(np.asarray(labels), f))) > 1]
        choice = {"cv_folds": folds} if len(folds) > 1 else {}
    n = len(records)
    res = tfidf_logreg_baseline(texts, labels, [r["injection"] for r in records] + [r["benign"] for r in records],
                                seed=seed, **choice)
    verdicts = list(zip(res.predictions[:n], res.predictions[n:]))
    rows = [verdict_outcome(r, True, inj, clean) for r, (inj, clean) in zip(records, verdicts)]
    metrics = {f"baseline_{k}": v for k, v in outcome_metrics(rows).items()
               if k not in ("injected_windows", "targeted_windows", "demanded_windows", "injected_schema_valid_rate")}
    return {"metrics": metrics, "verdicts": verdicts,
            "params": {"name": res.name, **res.params, "fitted_on": FITTED_ON, "train_rows": len(texts),
                       "fit_s": round(res.fit_s, 3)}}, ""


def baseline_beside(splits: dict[str, list[dict]], records: Sequence[dict], split: str) -> tuple[dict, dict]:
    """(the ``baseline_*`` metrics, what injection_eval.json keeps of the baseline: its settings and per-window verdicts,
    or why there is none), said on the console as the analyst's numbers are."""
    out, why = baseline_attack_metrics(splits, records, split)
    if out is None:
        print(f"sectune: no classic baseline beside the attack: {why}")
        return {}, {"skipped": why}
    m, p = out["metrics"], out["params"]
    print(f"sectune: classic baseline (TF-IDF + LR on the window text, fitted on {FITTED_ON}, C={p['C']:g} by "
          f"{p['C_chosen_by']}): attack success {m['baseline_attack_success_rate']:.3f} (95% CI "
          f"{m['baseline_attack_success_rate_ci95_low']:.3f}-{m['baseline_attack_success_rate_ci95_high']:.3f}) · targeted "
          f"{rate(m['baseline_targeted_attack_success_rate'])} · clean verdict accuracy {m['baseline_clean_verdict_accuracy']:.3f}")
    return m, {**p, "verdicts": [{"id": r.get("id"), "verdict": inj, "clean_verdict": clean}
                                 for r, (inj, clean) in zip(records, out["verdicts"])]}
