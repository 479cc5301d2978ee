"""The intervals beside the held-out numbers (sectune/evaluation/uncertainty.py) against hand-computed values."""

import math

import pytest

from sectune.evaluation.classifier import label_scores
from sectune.evaluation.uncertainty import paired_bootstrap_diff, proportion_ci

LABELS = ["benign", "suspicious", "malicious"]


def _wilson(k, n, z=1.959964):
    p = k / n
    d = 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def test_wilson_interval_equals_the_formula_and_is_not_the_normal_one():
    # 0 of 43: the normal approximation gives [0, 0]; Wilson's upper end is z²/(n + z²) = 3.8415 / 46.8415
    assert proportion_ci(0, 43) == pytest.approx((0.0, 3.841459 / 46.841459), abs=1e-6)
    # issue 15's best row: 10 attacked of 129 injected windows (3 seeds x 43)
    assert proportion_ci(10, 129) == pytest.approx(_wilson(10, 129), abs=1e-6)
    assert proportion_ci(10, 129) == pytest.approx((0.04265, 0.13682), abs=1e-5)
    assert proportion_ci(43, 43)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k=5, n=4"):
        proportion_ci(5, 4)


def test_paired_bootstrap_of_equal_systems_is_zero_and_of_a_dominant_one_is_above():
    truth = ["malicious"] * 20 + ["suspicious"] * 15 + ["benign"] * 8
    same = paired_bootstrap_diff(truth, truth, truth, LABELS)
    assert (same["diff"], same["ci_low"], same["ci_high"], same["share_not_above"]) == (0.0, 0.0, 0.0, 1.0)
    wrong = ["benign" if t != "benign" else "malicious" for t in truth]
    far = paired_bootstrap_diff(truth, truth, wrong, LABELS)
    assert far["diff"] == pytest.approx(1.0) and far["ci_low"] > 0.9 and far["share_not_above"] == 0.0


def test_paired_bootstrap_diff_is_the_tables_macro_f1_difference_with_its_noise():
    truth = ["malicious"] * 20 + ["suspicious"] * 15 + ["benign"] * 8
    a = list(truth); a[0] = "suspicious"; a[21] = "malicious"   # 2 windows wrong
    b = list(truth); b[:6] = ["suspicious"] * 6                  # 6 windows wrong
    r = paired_bootstrap_diff(truth, a, b, LABELS, seed=3)
    exact = label_scores(truth, a, LABELS)["macro_f1"] - label_scores(truth, b, LABELS)["macro_f1"]
    assert r["diff"] == pytest.approx(exact) and r["diff"] > 0
    assert r["ci_low"] < r["diff"] < r["ci_high"] and r["ci_high"] - r["ci_low"] < 0.4
    # 4 windows' difference on 43 windows is not beyond doubt: some resamples have a not above b
    assert 0 < r["share_not_above"] < 0.2
    assert paired_bootstrap_diff(truth, a, b, LABELS, seed=3) == r  # seeded: the same interval twice
    # an unparseable answer (None) is a wrong answer, as in the table
    assert paired_bootstrap_diff(truth, [None] * len(truth), truth, LABELS)["diff"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="43 truths, 42"):
        paired_bootstrap_diff(truth, a[:-1], b, LABELS)


def test_the_vectorised_macro_f1_equals_sklearns_on_every_resample():
    """One pass over all resamples must be the table's macro-F1 (labels present in the resample's truth; a label never
    predicted scores 0; an unparseable answer is wrong) on each of them, small resamples lacking a class included."""
    import numpy as np

    from sectune.evaluation.uncertainty import resampled_macro_f1

    rng = np.random.default_rng(7)
    truth = list(rng.choice(LABELS, 30))
    pred = list(rng.choice(LABELS + ["None", "benign "], 30))
    idx = np.concatenate([rng.integers(0, 30, (50, 30)), np.tile(np.flatnonzero(np.asarray(truth) == "benign")[:1], (1, 30))])
    got = resampled_macro_f1(truth, pred, idx, LABELS)
    want = [label_scores([truth[j] for j in row], [pred[j] for j in row], LABELS)["macro_f1"] for row in idx]
    assert got.shape == (51,) and np.allclose(got, want, atol=1e-12)
    assert got[-1] == want[-1] and len({truth[j] for j in idx[-1]}) == 1  # a resample of one class: F1 of that class alone


def test_one_window_has_no_interval_instead_of_a_scipy_error():
    """An audit (session 25): a pipeline with one test window ran every step, then failed at the table (scipy's
    bootstrap needs two observations)."""
    got = paired_bootstrap_diff(["malicious"], ["malicious"], ["benign"], ["benign", "malicious"])
    assert got["diff"] == 1.0 and math.isnan(got["ci_low"]) and math.isnan(got["ci_high"]) and got["resamples"] == 0


def test_confidence_sets_the_intervals_width():
    """Every call used the default 0.95: a confidence passed in was never checked to be used."""
    assert proportion_ci(10, 129, confidence=0.90) == pytest.approx(_wilson(10, 129, z=1.644854), abs=1e-6)
    assert proportion_ci(10, 129, confidence=0.99) == pytest.approx(_wilson(10, 129, z=2.575829), abs=1e-6)
    truth = ["malicious"] * 20 + ["suspicious"] * 15 + ["benign"] * 8
    a = list(truth); a[0] = "suspicious"
    b = list(truth); b[:6] = ["suspicious"] * 6
    wide, narrow = (paired_bootstrap_diff(truth, a, b, LABELS, seed=3, confidence=c) for c in (0.99, 0.5))
    assert wide["confidence"] == 0.99 and narrow["confidence"] == 0.5
    assert wide["ci_low"] < narrow["ci_low"] <= narrow["ci_high"] < wide["ci_high"]
