"""CIC-IoT-2023 network flows: load, clean, split, normalise and render as prompts.

Replaces seed 004's ``data_preprocessing.py``. Two things differ on purpose:

* every statistic (imputation medians, scaling) is fitted on the TRAIN split only, after
  splitting, so nothing from validation/test leaks into the prompts the model sees;
* bad input (missing columns, unknown labels, unusable cells) is a ``DataError`` naming the
  file and column, and what was cleaned is counted in a ``cleaning`` report, never silent.

The schemas are plain data so the config layer can carry them as ``dataset.features`` and
``dataset.label_column``.
"""

from __future__ import annotations

import sys
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from sectune.data import check_count, check_split_seed, warn_case_variants
from sectune.data.csv_files import delimiter_hint, read_csv_checked
from sectune.errors import ConfigError, DataError
from sectune.files import write_text_atomic
from sectune.data.flow_normalizer import FlowNormalizer  # noqa: F401 (re-exported: its home was here)

# --------------------------------------------------------------------------- schemas

#: The 46 numeric columns of the original CIC-IoT-2023 CSVs (label column ``label``).
CIC_IOT_46_FEATURES: List[str] = [
    "flow_duration", "Header_Length", "Protocol Type", "Duration", "Rate", "Srate", "Drate",
    "fin_flag_number", "syn_flag_number", "rst_flag_number", "psh_flag_number",
    "ack_flag_number", "ece_flag_number", "cwr_flag_number", "ack_count", "syn_count",
    "fin_count", "urg_count", "rst_count", "HTTP", "HTTPS", "DNS", "Telnet", "SMTP", "SSH",
    "IRC", "TCP", "UDP", "DHCP", "ARP", "ICMP", "IPv", "LLC", "Tot sum", "Min", "Max", "AVG",
    "Std", "Tot size", "IAT", "Number", "Magnitue", "Radius", "Covariance", "Variance", "Weight",
]
CIC_IOT_46_LABEL_COLUMN = "label"

#: The 39 features of the later "merged" CICIoT2023 release, as in the shared sample
#: (``Time_To_Live`` instead of ``Duration``, plus ``IGMP``; 9 of the 46 are absent).
CIC_IOT_MERGED_39_FEATURES: List[str] = [
    "Header_Length", "Protocol Type", "Time_To_Live", "Rate", "fin_flag_number",
    "syn_flag_number", "rst_flag_number", "psh_flag_number", "ack_flag_number",
    "ece_flag_number", "cwr_flag_number", "ack_count", "syn_count", "fin_count", "rst_count",
    "HTTP", "HTTPS", "DNS", "Telnet", "SMTP", "SSH", "IRC", "TCP", "UDP", "DHCP", "ARP", "ICMP",
    "IGMP", "IPv", "LLC", "Tot sum", "Min", "Max", "AVG", "Std", "Tot size", "IAT", "Number",
    "Variance",
]
CIC_IOT_MERGED_LABEL_COLUMN = "label_multiclass"

_FAMILY_MEMBERS: Dict[str, List[str]] = {
    "DDoS": ["DDoS-RSTFINFlood", "DDoS-PSHACK_Flood", "DDoS-SYN_Flood", "DDoS-UDP_Flood",
             "DDoS-TCP_Flood", "DDoS-ICMP_Flood", "DDoS-SynonymousIP_Flood",
             "DDoS-ACK_Fragmentation", "DDoS-UDP_Fragmentation", "DDoS-ICMP_Fragmentation",
             "DDoS-SlowLoris", "DDoS-HTTP_Flood"],
    "DoS": ["DoS-UDP_Flood", "DoS-SYN_Flood", "DoS-TCP_Flood", "DoS-HTTP_Flood"],
    "Mirai": ["Mirai-greeth_flood", "Mirai-greip_flood", "Mirai-udpplain"],
    "Recon": ["Recon-PingSweep", "Recon-OSScan", "Recon-PortScan", "VulnerabilityScan",
              "Recon-HostDiscovery"],
    "Spoofing": ["DNS_Spoofing", "MITM-ArpSpoofing"],
    "Web": ["BrowserHijacking", "Backdoor_Malware", "XSS", "Uploading_Attack", "SqlInjection",
            "CommandInjection"],
    "BruteForce": ["DictionaryBruteForce"],
    "Benign": ["BenignTraffic"],
}
#: The 34 fine CIC-IoT-2023 labels → the paper's 8 families.
FINE_TO_FAMILY: Dict[str, str] = {f: fam for fam, fs in _FAMILY_MEMBERS.items() for f in fs}
#: Family names that may appear directly as labels (ours plus the merged release's 10).
KNOWN_FAMILIES = frozenset(_FAMILY_MEMBERS) | {"WebAttack", "Malware", "Uploading"}
BENIGN_NAMES = frozenset({"BenignTraffic", "Benign"})
GRANULARITIES = ("fine", "family", "binary", "raw")
DEFAULT_TEMPLATE = "Classify this IoT network flow.\n{features}\nLabel:"


def to_granularity(labels: Iterable[str], granularity: str, *, source: str = "labels") -> List[str]:
    """Map raw labels to ``fine`` | ``family`` | ``binary`` (``benign``/``attack``), or keep them as the file has them
    (``raw``: another dataset's own labels, CIC-IDS2017's BENIGN/DDoS/PortScan say).

    For the others raw labels are either all fine (the 46-column release) or all families (the merged release);
    a mix or an unknown name is a DataError, because silently bucketing it would mislabel rows.
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"dataset.granularity={granularity!r}: expected one of {GRANULARITIES}")
    labels = [str(x) for x in labels]
    if granularity == "raw":
        return labels
    present = set(labels)
    if present <= set(FINE_TO_FAMILY):
        if granularity == "fine":
            return labels
        if granularity == "family":
            return [FINE_TO_FAMILY[x] for x in labels]
    elif present <= KNOWN_FAMILIES:
        if granularity == "fine":
            raise DataError(f"{source}: holds family labels ({', '.join(sorted(present))}); "
                            "granularity 'fine' needs the 34 fine CIC-IoT-2023 labels — use "
                            "'family' or 'binary'")
        if granularity == "family":
            return labels
    else:
        unknown = sorted(present - set(FINE_TO_FAMILY) - KNOWN_FAMILIES)
        raise DataError(f"{source}: unknown label(s) {unknown[:10]}; expected CIC-IoT-2023 fine "
                        "labels or family names (dataset.granularity=raw keeps a file's own labels)")
    return ["benign" if x in BENIGN_NAMES else "attack" for x in labels]


# --------------------------------------------------------------------------- loading

@dataclass
class FlowTable:
    """Numeric features (NaN where a cell was unusable and the policy is impute) + labels."""

    X: pd.DataFrame
    y: pd.Series
    features: List[str]
    label_column: str
    source: str
    cleaning: Dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)


def load_flows(path, features: Sequence[str], label_column: str, granularity: str = "family", *,
               nan_policy: str = "impute", max_rows: Optional[int] = None,
               seed: int = 0) -> FlowTable:
    """Read a flow CSV, check its schema, count unusable cells and map labels.

    Non-numeric, NaN and ±inf cells become NaN and are either kept for train-median imputation
    later (``impute``: the median is only known after splitting) or their rows dropped
    (``drop``). ``max_rows`` takes a stratified, seeded subsample so small runs keep every class.
    """
    if nan_policy not in ("impute", "drop"):
        raise ConfigError(f"dataset.nan_policy={nan_policy!r}: expected 'impute' or 'drop'")
    check_count(max_rows, "dataset.max_samples", "rows, or null for every row")
    check_split_seed(seed)
    df = read_csv_checked(Path(path), "flow CSV", "dataset.path")
    features = list(features)
    if not features:
        raise ConfigError("dataset.features is empty: name the numeric feature columns")
    missing = [c for c in [*features, label_column] if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing required column(s): {', '.join(map(repr, missing))}{delimiter_hint(df.columns)}")
    if df.empty:
        raise DataError(f"{path}: has a header but no rows")

    raw_labels = df[label_column]
    no_label = raw_labels.isna() | (raw_labels.astype(str).str.strip() == "")
    df = df.loc[~no_label]
    rows_read = int(len(df) + no_label.sum())
    if max_rows is not None and len(df) > max_rows:
        df = _stratified_sample(df, label_column, max_rows, seed)

    X = pd.DataFrame(index=df.index)
    non_numeric = nan = inf = 0
    per_column: Dict[str, int] = {}
    for col in features:
        orig = df[col]
        try:
            num = pd.to_numeric(orig, errors="coerce").astype("float64")
        except OverflowError:  # a Python int past a float's range (pandas keeps a 310-digit cell as one): its text reads as inf
            num = pd.to_numeric(orig.where(orig.isna(), orig.astype(str)), errors="coerce").astype("float64")
        bad_text = int((num.isna() & orig.notna()).sum())
        n_nan = int(orig.isna().sum())
        n_inf = int(np.isinf(num).sum())
        num = num.where(np.isfinite(num))
        non_numeric, nan, inf = non_numeric + bad_text, nan + n_nan, inf + n_inf
        if bad_text + n_nan + n_inf:
            per_column[col] = bad_text + n_nan + n_inf
        X[col] = num
    empty = [c for c in features if len(X) and X[c].isna().all()]
    if empty:  # imputed to one value everywhere, the column trained as if it held data (a text or mis-mapped column)
        raise DataError(f"{path}: feature column {empty[0]!r} holds no finite number in any of its {len(X)} rows (first value: "
                        f"{df[empty[0]].iloc[0]!r}){f'; also {empty[1:]}' if len(empty) > 1 else ''}: a text or mis-mapped column? "
                        "(dataset.features)")
    bad_rows = X.isna().any(axis=1)
    cleaning: Dict[str, object] = {
        "policy": nan_policy, "rows_read": rows_read, "rows_without_label": int(no_label.sum()),
        "non_numeric_cells": non_numeric, "nan_cells": nan, "inf_cells": inf,
        "bad_cells_by_column": per_column, "rows_with_bad_cells": int(bad_rows.sum()),
        "rows_dropped": 0, "cells_imputed": 0,
    }
    if nan_policy == "drop":
        cleaning["rows_dropped"] = int(bad_rows.sum())
        X, df = X.loc[~bad_rows], df.loc[~bad_rows]
    if X.empty:
        raise DataError(f"{path}: no usable rows left after cleaning ({cleaning})")
    col = df[label_column]
    whole = col.dropna()
    if pd.api.types.is_float_dtype(col) and len(whole) and bool((whole == whole.round()).all()):
        # an integer label column with one empty cell is read as floats: every label became "0.0"/"1.0", which a run and
        # a new file of the same labels then disagreed on (an audit, session 36)
        col = col.astype("Int64")
    labels = to_granularity(col.astype(str).str.strip(), granularity,
                            source=f"{path} column {label_column!r}")
    warn_case_variants(labels, f"{path} column {label_column!r}")
    X = X.reset_index(drop=True)
    y = pd.Series(labels, name="label", dtype=object)
    cleaning["rows_kept"] = len(y)
    return FlowTable(X, y, features, label_column, str(path), cleaning)


def _stratified_sample(df: pd.DataFrame, label_column: str, n: int, seed: int) -> pd.DataFrame:
    """A seeded subsample keeping class shares; plain random if a class is too small (said: :func:`warn_unstratified`)."""
    try:
        kept, _ = train_test_split(df, train_size=n, random_state=seed, stratify=df[label_column])
        kept, stratified = kept.sort_index(), True
    except ValueError:
        kept, stratified = df.sample(n=n, random_state=seed).sort_index(), False
    warn_unstratified(df[label_column].astype(str).str.strip(), kept[label_column].astype(str).str.strip(), n, stratified)
    return kept


def warn_unstratified(labels, kept_labels, n: int, stratified: bool = False) -> None:
    """A ``dataset.max_samples`` sample that could not keep the class shares (a class of one row) is plain random: it
    lost a rare class from every split without a word (audit AB); a stratified one rounds a class of a few rows in a large
    file to none, as silently (an audit, session 42). Names the classes it lost or left too small to split."""
    before, after = pd.Series(list(labels)).value_counts(), pd.Series(list(kept_labels)).value_counts()
    small = [c for c in before.index if after.get(c, 0) < 3]
    if small:
        shown_classes = ", ".join(f"{c!r} {after.get(c, 0)} of {before[c]}" for c in small[:8])
        why = ("the sample kept each class's share, which rounds a rare one to few rows or none" if stratified else
               "a class too small to keep its share made the sample plain random")
        print(f"sectune: warning: dataset.max_samples={n}: {why}; rows kept of the rarest classes: {shown_classes}"
              f"{' …' if len(small) > 8 else ''} (a class with none is gone from every split and from the macro-F1; fewer "
              "than 3 cannot be split into train, validation and test): raise dataset.max_samples", file=sys.stderr)


# --------------------------------------------------------------------------- splitting

def split_flows(table: FlowTable, val_fraction: float, test_fraction: float,
                seed: int) -> Dict[str, FlowTable]:
    """Stratified, seeded train/validation/test split (two ``train_test_split`` calls).

    A fraction of 0 gives an empty split. Test is carved off first so its rows do not depend
    on ``val_fraction``: changing the validation size never changes the test set.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"dataset.val_fraction={val_fraction}, test_fraction={test_fraction}: "
                          "each must be in [0, 1) and their sum < 1")
    check_split_seed(seed)
    idx = np.arange(len(table))
    y = table.y.to_numpy()

    def cut(pool: np.ndarray, frac: float) -> tuple:
        if frac <= 0:
            return pool, pool[:0]
        try:
            return train_test_split(pool, test_size=frac, random_state=seed, stratify=y[pool])
        except ValueError as exc:  # a class too small to appear on both sides
            counts = pd.Series(y[pool]).value_counts()
            raise DataError(f"{table.source}: cannot split stratified ({exc}); smallest classes: "
                            f"{counts.tail(3).to_dict()}; raise dataset.max_samples (when set) or lower dataset.val_fraction / "
                            "test_fraction") from None

    rest, test = cut(idx, test_fraction)
    train, val = cut(rest, val_fraction / (1 - test_fraction) if val_fraction else 0.0)
    out = {}
    for name, rows in (("train", train), ("validation", val), ("test", test)):
        rows = np.sort(rows)
        out[name] = FlowTable(table.X.iloc[rows].reset_index(drop=True),
                              table.y.iloc[rows].reset_index(drop=True), table.features,
                              table.label_column, table.source, dict(table.cleaning))
    return out


# --------------------------------------------------------------------------- normalising

def _compact(v: float, precision: int) -> str:
    s = f"{float(v):.{precision}g}"
    return "0" if s in ("-0", "0", "nan") else s


def render_flow(row: Mapping[str, float], features: Sequence[str], template: str = DEFAULT_TEMPLATE,
                precision: int = 3, sep: str = "; ", fmt: str = "{name}={value}") -> str:
    """Render one (normalised) flow inside ``template``'s ``{features}``: ``fmt`` per feature, joined by ``sep``.

    ``precision`` significant digits (``%g``): 46 features then take ~250 GPT-2 tokens, leaving
    room for the template and answer in a 512-token context.
    """
    if "{features}" not in template:
        raise ConfigError("dataset.prompt_template must contain '{features}'")
    if "{value}" not in fmt:
        raise ConfigError(f"dataset.feature_format={fmt!r} must contain '{{value}}'")
    body = sep.join(fmt.replace("{name}", name).replace("{value}", _compact(row[name], precision)) for name in features)
    return template.replace("{features}", body)


def write_splits_json(out_dir, splits: Mapping[str, List[dict]]) -> Dict[str, str]:
    """Write ``<split>.json`` (a JSON list of records) per split, as seed 004 does; returns paths."""
    out = Path(out_dir)
    paths = {}
    for name, records in splits.items():
        p = out / f"{name}.json"
        write_text_atomic(p, json.dumps(list(records), ensure_ascii=False))
        paths[name] = str(p)
    return paths


@dataclass
class PreparedFlows:
    """Everything a stage needs: records per split, raw frames, labels, fitted normalizer."""

    records: Dict[str, List[dict]]
    tables: Dict[str, FlowTable]  # X imputed with train medians (raw scale)
    labels: List[str]
    normalizer: FlowNormalizer
    cleaning: Dict[str, object]


def prepare_flow_splits(path, features: Sequence[str], label_column: str,
                        granularity: str = "family", *, val_fraction: float = 0.1,
                        test_fraction: float = 0.2, seed: int = 0, nan_policy: str = "impute",
                        max_rows: Optional[int] = None, template: str = DEFAULT_TEMPLATE,
                        precision: int = 3, method: str = "robust_log", bins: int = 10,
                        sep: str = "; ", fmt: str = "{name}={value}", normalizer: Optional["FlowNormalizer"] = None) -> PreparedFlows:
    """Load → split → fit normalizer on train (or take ``normalizer``, a run's saved one) → impute every split → render prompts.

    Records are ``{"text", "label", "features": {name: raw value}}``; raw values are after
    train-median imputation so the RF baseline and the model see the same rows.
    """
    table = load_flows(path, features, label_column, granularity, nan_policy=nan_policy,
                       max_rows=max_rows, seed=seed)
    tables = split_flows(table, val_fraction, test_fraction, seed)
    norm = normalizer if normalizer is not None else FlowNormalizer(method, bins).fit(tables["train"].X)
    cleaning = dict(table.cleaning)
    cleaning["cells_imputed"] = int(sum(t.X.isna().sum().sum() for t in tables.values()))
    cleaning["split_rows"] = {k: len(t) for k, t in tables.items()}
    records: Dict[str, List[dict]] = {}
    for name, t in tables.items():
        t.X = norm.impute(t.X)
        t.cleaning = cleaning
        Z = norm.transform(t.X)
        records[name] = [
            {"text": render_flow(z, table.features, template, precision, sep, fmt), "label": lab,
             "features": raw}
            for z, raw, lab in zip(Z.to_dict("records"), t.X.to_dict("records"), t.y)]
    labels = sorted(set(table.y))
    return PreparedFlows(records, tables, labels, norm, cleaning)
