"""How far a held-out number can be trusted: the analyst's test split is 43 windows, so one window moves a rate by
2.3 points and a macro-F1 by about as much. Two intervals, both from scipy (no statistics written here):

* :func:`proportion_ci`: a Wilson score interval for a share of windows (attack success: k of n injected windows);
* :func:`paired_bootstrap_diff`: macro-F1(a) − macro-F1(b) of two systems on the same windows, with a percentile
  bootstrap interval over the windows (``scipy.stats.bootstrap`` resampling window indices, so a window's truth and
  both systems' answers move together: the paired comparison the held-out table's "vs TF-IDF + LR" column makes).
  The statistic is :func:`sectune.evaluation.label_scores`' macro-F1 (the labels present in each resample).
"""

from __future__ import annotations

from typing import Sequence

#: resamples of the paired bootstrap: ~1-3 s for one comparison of 43 windows on 2 CPU cores
N_RESAMPLES = 1000


def proportion_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the share k/n (scipy's ``binomtest(...).proportion_ci(method="wilson")``)."""
    from scipy.stats import binomtest

    if not 0 <= k <= n or n <= 0:
        raise ValueError(f"proportion_ci: k={k}, n={n}: need 0 <= k <= n and n > 0")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def paired_bootstrap_diff(truth: Sequence[str], pred_a: Sequence[str], pred_b: Sequence[str], labels: Sequence[str], *,
                          n_resamples: int = N_RESAMPLES, seed: int = 0, confidence: float = 0.95) -> dict:
    """``{"diff", "ci_low", "ci_high", "share_not_above", "resamples", "confidence"}``: macro-F1 of ``pred_a`` minus
    that of ``pred_b`` on these windows, its percentile bootstrap interval, and the share of resamples in which a
    does not score above b (a one-sided bootstrap p-value for "a beats b")."""
    import numpy as np
    from scipy.stats import bootstrap
    from sklearn.metrics import f1_score

    from sectune.evaluation import label_scores, scored_labels

    if not (len(truth) == len(pred_a) == len(pred_b)) or not truth:
        raise ValueError(f"paired_bootstrap_diff: {len(truth)} truths, {len(pred_a)} and {len(pred_b)} predictions")
    t, a, b = (np.asarray([str(x) for x in v], dtype=object) for v in (truth, pred_a, pred_b))
    labels = list(labels)

    def macro_f1(y, p):
        return f1_score(y, p, labels=scored_labels(list(y), labels), average="macro", zero_division=0)

    def stat(i):
        i = np.asarray(i, dtype=int)
        return macro_f1(t[i], a[i]) - macro_f1(t[i], b[i])

    diff = label_scores(list(t), list(a), labels)["macro_f1"] - label_scores(list(t), list(b), labels)["macro_f1"]
    res = bootstrap((np.arange(len(t)),), stat, vectorized=False, n_resamples=int(n_resamples), method="percentile",
                    confidence_level=confidence, random_state=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution)
    return {"diff": float(diff), "ci_low": float(res.confidence_interval.low), "ci_high": float(res.confidence_interval.high),
            "share_not_above": float(np.mean(dist <= 1e-12)), "resamples": int(n_resamples), "confidence": float(confidence)}
