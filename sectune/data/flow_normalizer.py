"""A flow table's train-split statistics (imputation medians, per-feature scaling or quantile bins), fitted on the
training rows only and saved with a classify run as ``normalizer.json`` (its predictor and stage=evaluate read them back)."""

from __future__ import annotations

from typing import Dict, List, Mapping

import numpy as np
import pandas as pd

from sectune.errors import ConfigError, DataError


class FlowNormalizer:
    """Train-split imputation medians and per-feature scaling, serialisable to JSON.

    ``robust_log`` (default): ``z = (slog(x) - median) / spread`` with ``slog(x) =
    sign(x)·log1p(|x|)``. CIC features are extremely heavy-tailed (Rate, Tot sum, Variance span
    0..1e7); plain mean/std squeezes almost every row to ~0.00 and leaves a few at 100+, which is
    both uninformative and token-hungry once rendered. The log keeps order and the median/IQR
    centre makes ordinary rows land in roughly [-3, 3]. ``standard`` (mean/std) is kept for
    comparison. Zero spread (IQR and std both 0, e.g. a constant flag) → scale 1, so the column
    becomes 0 on train and a non-zero value elsewhere stays visible instead of dividing by 0.
    ``quantile``: the value's decile bin among the train values (0..9; fewer bins where values
    repeat; a minimum held by a tenth of the rows or more is a bin of its own, so a flag set in 1% of rows has 2):
    one short integer per feature, which a small model reads far more
    easily than signed decimals, and a prompt about half as long.
    """

    METHODS = ("robust_log", "standard", "quantile")
    #: how ``quantile`` places its edges: 2 since session 42 (a heavy minimum is a bin of its own); normalizer.json files
    #: without the key are rule 1's. A resume across the change is refused (checkpoints.training_settings).
    QUANTILE_RULE = 2

    def __init__(self, method: str = "robust_log", bins: int = 10):
        if method not in self.METHODS:
            raise ConfigError(f"normalizer method {method!r}: expected one of {self.METHODS}")
        if method == "quantile" and not 2 <= int(bins) <= 1000:
            raise ConfigError(f"dataset.quantile_bins={bins}: expected 2..1000")
        self.method = method
        self.bins = int(bins)
        self.features: List[str] = []
        self.medians: Dict[str, float] = {}
        self.center: Dict[str, float] = {}
        self.scale: Dict[str, float] = {}
        self.edges: Dict[str, List[float]] = {}

    def fit(self, X: pd.DataFrame) -> "FlowNormalizer":
        """Fit on the training rows only; NaN cells are ignored for the medians."""
        self.features = list(X.columns)
        med = X.median(skipna=True).fillna(0.0)  # an all-NaN column imputes to 0
        self.medians = {c: float(med[c]) for c in self.features}
        Z = self._pre(self.impute(X))
        if self.method == "quantile":
            qs = np.linspace(0, 1, self.bins + 1)[1:-1]
            # a bin edge is kept only if it is not the column minimum, so the lowest value is bin 0
            self.edges = {c: sorted({float(e) for e in np.quantile(Z[c], qs) if e > Z[c].min()}) for c in self.features}
            for c in self.features:
                # a minimum held by a decile of the rows or more (a flag, a port count mostly 0) swallowed every value
                # below the next decile: set in under 10% of rows, SSH or rst_count rendered 0 for every flow, BruteForce's
                # included (10 of the 39 CIC features; an audit, session 42). Above the minimum is a bin of its own.
                z = Z[c].to_numpy()
                above = z[z > z.min()] if len(z) else z
                if len(above) and np.mean(z == z.min()) >= 1.0 / self.bins and not (self.edges[c] and self.edges[c][0] <= above.min()):
                    self.edges[c] = sorted(set(self.edges[c]) | {float(above.min())})
            self.center = {c: 0.0 for c in self.features}
            self.scale = {c: 1.0 for c in self.features}
            return self
        if self.method == "standard":
            center, spread = Z.mean(), Z.std(ddof=0)
        else:
            center = Z.median()
            spread = (Z.quantile(0.75) - Z.quantile(0.25)) / 1.349  # IQR of N(0,1) = 1.349
            spread = spread.where(spread > 0, Z.std(ddof=0))
        # values past ~1e154 overflow a mean or a variance: the centre came out NaN, every value of the column rendered
        # as "0" and normalizer.json held NaN, with no word (an audit, session 36)
        bad = [c for c in self.features if not (np.isfinite(center[c]) and np.isfinite(spread[c]))]
        if bad:
            raise DataError(f"dataset.normalizer={self.method}: column {bad[0]!r} (max |value| {float(Z[bad[0]].abs().max()):.3g}) "
                            f"overflows its {'mean or standard deviation' if self.method == 'standard' else 'spread'}"
                            f"{f'; also {bad[1:]}' if len(bad) > 1 else ''}: use dataset.normalizer=robust_log or quantile")
        spread = spread.where(spread > 1e-12, 1.0).fillna(1.0)
        self.center = {c: float(center[c]) for c in self.features}
        self.scale = {c: float(spread[c]) for c in self.features}
        return self

    def _pre(self, X: pd.DataFrame) -> pd.DataFrame:
        return np.sign(X) * np.log1p(np.abs(X)) if self.method == "robust_log" else X

    def impute(self, X: pd.DataFrame) -> pd.DataFrame:
        """Fill NaN with the train medians (the raw-value view used by RF and the JSON)."""
        self._check(X)
        return X[self.features].fillna(value=self.medians).astype("float64")

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        """Impute, then scale with the train statistics."""
        Z = self._pre(self.impute(X))
        if self.method == "quantile":
            return pd.DataFrame({c: np.searchsorted(self.edges[c], Z[c].to_numpy(), side="right").astype("float64")
                                 for c in self.features}, index=Z.index)
        return (Z - pd.Series(self.center)) / pd.Series(self.scale)

    def _check(self, X: pd.DataFrame) -> None:
        if not self.features:
            raise RuntimeError("FlowNormalizer.fit must run before impute/transform")
        missing = [c for c in self.features if c not in X.columns]
        if missing:
            raise DataError(f"flow rows lack feature column(s) the normalizer was fitted on: "
                            f"{missing}")

    def to_dict(self) -> dict:
        return {"method": self.method, "bins": self.bins, "features": self.features, "medians": self.medians,
                "center": self.center, "scale": self.scale, "edges": self.edges, "quantile_rule": self.QUANTILE_RULE}

    @classmethod
    def from_dict(cls, d: Mapping) -> "FlowNormalizer":
        try:
            norm = cls(d["method"], d.get("bins", 10))
            norm.features = list(d["features"])
            norm.medians, norm.center, norm.scale = (
                {k: float(v) for k, v in d[key].items()} for key in ("medians", "center", "scale"))
            norm.edges = {k: [float(e) for e in v] for k, v in d.get("edges", {}).items()}
            if norm.method == "quantile" and set(norm.edges) != set(norm.features):
                raise KeyError("edges")
        except (KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"normalizer state is malformed (missing/bad {exc})") from None
        return norm


# --------------------------------------------------------------------------- prompts
