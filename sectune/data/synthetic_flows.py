"""Synthetic flows in the 46-column CIC-IoT-2023 schema, with the 34 fine labels.

There is no real 46-column sample in the shared data (only the 39-column merged release with
family labels), so tests and offline default runs of the ``cic_iot_2023`` dataset use this.
It is NOT CIC-IoT-2023: distributions are invented. Each class gets a seeded signature (a log-
scale centre per feature, shared within a family plus a per-label offset; protocol/flag shares
drawn per class), so a classifier can learn families easily and fine labels less easily — enough
to exercise the pipeline end to end, nothing to report numbers on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sectune.data import check_count, check_split_seed
from sectune.data.flows import CIC_IOT_46_FEATURES, FINE_TO_FAMILY
from sectune.files import write_text_atomic

#: Columns holding a share in [0, 1] (flags and protocol indicators averaged over a window).
_SHARE_COLUMNS = [c for c in CIC_IOT_46_FEATURES if c.endswith("_flag_number")] + [
    "HTTP", "HTTPS", "DNS", "Telnet", "SMTP", "SSH", "IRC", "TCP", "UDP", "DHCP", "ARP", "ICMP",
    "IPv", "LLC"]
#: Signature seed, independent of the row seed so every file shares the same class signatures.
_SIGNATURE_SEED = 2023


def _signatures(labels):
    """Per-label (log-centre per continuous column, share per share column)."""
    rng = np.random.default_rng(_SIGNATURE_SEED)
    cont = [c for c in CIC_IOT_46_FEATURES if c not in _SHARE_COLUMNS]
    fam_centre = {f: rng.uniform(2.0, 6.0, len(cont)) for f in sorted(set(FINE_TO_FAMILY.values()))}
    fam_share = {f: rng.beta(0.6, 0.6, len(_SHARE_COLUMNS)) for f in fam_centre}
    sig = {}
    for lab in labels:
        fam = FINE_TO_FAMILY[lab]
        centre = fam_centre[fam] + rng.normal(0.0, 0.25, len(cont))
        share = np.clip(fam_share[fam] + rng.normal(0.0, 0.05, len(_SHARE_COLUMNS)), 0.0, 1.0)
        sig[lab] = (centre, share)
    return cont, sig


def generate_cic_iot_46(n_rows: int, seed: int, path) -> Path:
    """Write ``n_rows`` synthetic flows (about equal rows per label) to ``path``; return it."""
    check_count(n_rows, "dataset.synthetic_rows", "flows to generate (or set dataset.path to a real flow CSV)", optional=False)
    check_split_seed(seed)
    labels = sorted(FINE_TO_FAMILY)
    cont, sig = _signatures(labels)
    rng = np.random.default_rng(seed)
    y = np.array([labels[i % len(labels)] for i in range(n_rows)])
    rng.shuffle(y)
    data = {c: np.empty(n_rows) for c in CIC_IOT_46_FEATURES}
    for lab in labels:
        rows = np.flatnonzero(y == lab)
        if rows.size == 0:
            continue
        centre, share = sig[lab]
        logs = centre + rng.normal(0.0, 1.5, (rows.size, len(cont)))
        for j, c in enumerate(cont):
            data[c][rows] = np.round(np.expm1(np.clip(logs[:, j], 0.0, None)), 4)
        # a share observed over a 10-packet window, like the real averaged flag columns
        counts = rng.binomial(10, share, (rows.size, len(_SHARE_COLUMNS))) / 10.0
        for j, c in enumerate(_SHARE_COLUMNS):
            data[c][rows] = counts[:, j]
    df = pd.DataFrame(data, columns=CIC_IOT_46_FEATURES)
    df["label"] = y
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, df.to_csv(index=False))  # not mkstemp's owner-only 0600: the modes any new file gets
    return path
