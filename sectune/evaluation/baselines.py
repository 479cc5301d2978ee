"""Classic baselines, computed on exactly the rows the model is scored on.

A fine-tuned LM's macro-F1 means little alone: the seeds report none, and on CIC-IoT a random
forest on the raw features is the bar to clear. Each function fits on train, predicts test and
times both, so the report can put quality and throughput side by side. Any choice (e.g. the
LogisticRegression ``C``) is made on a validation split passed in explicitly — never on test.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline


@dataclass
class BaselineResult:
    """Test predictions plus timings; ``rows_per_s`` is prediction throughput (flows/s)."""

    name: str
    predictions: List[str]
    fit_s: float
    predict_s: float
    params: Dict[str, object] = field(default_factory=dict)
    #: ``rows -> p(class)`` per row, columns in ``classes`` order (the fitted classifier; not saved)
    predict_proba: Optional[Callable] = field(default=None, repr=False)
    classes: List[str] = field(default_factory=list)
    #: a fresh, unfitted copy of the classifier (text baseline: vectorizer + C) for out-of-fold probabilities
    unfitted: Optional[Callable] = field(default=None, repr=False)

    @property
    def wall_s(self) -> float:
        return self.fit_s + self.predict_s

    @property
    def rows_per_s(self) -> float:
        return len(self.predictions) / self.predict_s if self.predict_s > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"name": self.name, "fit_s": self.fit_s, "predict_s": self.predict_s,
                "wall_s": self.wall_s, "rows_per_s": self.rows_per_s, "params": self.params}


def _macro_f1(y_true, y_pred) -> float:
    """Macro-F1 over the labels ``y_true`` holds, as every row of the tables is scored (classifier.label_scores): sklearn's
    ``average="macro"`` also averaged in a 0 for a label only predicted, so C was chosen by another number than reported."""
    return float(f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro", zero_division=0))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def majority_baseline(train_y: Sequence, test_y: Sequence) -> BaselineResult:
    """Predict the most frequent TRAIN label for every test row (test_y only gives the count).

    Ties break on the label's sort order so the result is deterministic.
    """
    counts = Counter(map(str, train_y))
    if not counts:
        raise ValueError("majority_baseline: train_y is empty")
    top = max(sorted(counts), key=lambda k: counts[k])
    preds, t = _timed(lambda: [top] * len(test_y))
    return BaselineResult("majority", preds, 0.0, t, {"label": top})


def random_forest_baseline(train_X, train_y: Sequence, test_X, seed: int = 0, *,
                           n_estimators: int = 200, n_jobs: int = 2) -> BaselineResult:
    """RandomForest on the RAW (imputed, unscaled) features: trees need no scaling, and raw
    features are what a deployed IDS would see."""
    clf = RandomForestClassifier(n_estimators=n_estimators, n_jobs=n_jobs, random_state=seed)
    _, fit_s = _timed(lambda: clf.fit(np.asarray(train_X, dtype=float), np.asarray(train_y, dtype=str)))
    preds, pred_s = _timed(lambda: clf.predict(np.asarray(test_X, dtype=float)))
    return BaselineResult("random_forest", [str(p) for p in preds], fit_s, pred_s,
                          {"n_estimators": n_estimators, "n_jobs": n_jobs, "seed": seed},
                          predict_proba=lambda X: clf.predict_proba(np.asarray(X, dtype=float)), classes=[str(c) for c in clf.classes_],
                          unfitted=lambda: RandomForestClassifier(n_estimators=n_estimators, n_jobs=n_jobs, random_state=seed))


def tfidf_logreg_baseline(train_texts: Sequence[str], train_y: Sequence, test_texts: Sequence[str],
                          seed: int = 0, *, val_texts: Optional[Sequence[str]] = None,
                          val_y: Optional[Sequence] = None,
                          c_grid: Sequence[float] = (0.1, 1.0, 10.0),
                          cv_folds: Optional[Sequence[np.ndarray]] = None) -> BaselineResult:
    """Char 1–4-gram TF-IDF + LogisticRegression (class-balanced).

    Char n-grams suit both prompts (German/English mix, obfuscated injections) and rendered
    flows (``Rate=1.2`` tokens). With a validation split, ``C`` is picked by validation
    macro-F1 (the classifier fitted on train with that C is the one kept); without one, by the mean
    macro-F1 over ``cv_folds`` (held-out train-row indices: the model's own ``classify.folds``,
    vectorizer and classifier refitted per fold by scikit-learn), and only without either ``C=1``:
    the model's threshold is tuned on its out-of-fold rows, so the bar gets its C tuned too.
    """
    # the vectorizer depends on the train texts only, not on C: fitted once, the grid refits just the classifier
    # (the same predictions as a pipeline refit per C, in a fraction of the time: char n-grams are the slow part)
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), min_df=2, sublinear_tf=True, max_features=200_000)

    def fit(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed).fit(x_train, train_y)

    train_y = [str(v) for v in train_y]
    c_best, val_scores, fitted = 1.0, {}, {}
    t0 = time.perf_counter()
    x_train = vectorizer.fit_transform(list(train_texts))
    if val_texts is not None and val_y is not None and len(val_texts) > 0:
        x_val = vectorizer.transform(list(val_texts))
        for c in c_grid:
            fitted[c] = fit(c)
            val_scores[c] = _macro_f1([str(v) for v in val_y], fitted[c].predict(x_val))
        c_best = max(c_grid, key=lambda c: (val_scores[c], -c))
    elif cv_folds:
        from sklearn.metrics import make_scorer
        from sklearn.model_selection import cross_val_score

        every = np.arange(len(train_y))
        splits = [(np.setdiff1d(every, held), np.asarray(held)) for held in cv_folds]
        for c in c_grid:
            pipe = make_pipeline(clone(vectorizer), LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed))
            val_scores[c] = float(np.mean(cross_val_score(pipe, list(train_texts), train_y, cv=splits, scoring=make_scorer(_macro_f1))))
        c_best = max(c_grid, key=lambda c: (val_scores[c], -c))
    model = fitted[c_best] if c_best in fitted else fit(c_best)  # lbfgs is deterministic: no refit needed
    fit_s = time.perf_counter() - t0
    preds, pred_s = _timed(lambda: model.predict(vectorizer.transform(list(test_texts))))
    chosen_by = "validation" if fitted else f"{len(cv_folds)}-fold CV on train" if cv_folds else "default (no validation rows)"
    return BaselineResult("tfidf_logreg", [str(p) for p in preds], fit_s, pred_s,
                          {"C": c_best, "val_macro_f1_by_C": val_scores, "C_chosen_by": chosen_by, "seed": seed},
                          predict_proba=lambda texts: model.predict_proba(vectorizer.transform(list(texts))),
                          classes=[str(c) for c in model.classes_],
                          unfitted=lambda: make_pipeline(clone(vectorizer), LogisticRegression(
                              C=c_best, max_iter=2000, class_weight="balanced", random_state=seed)))
