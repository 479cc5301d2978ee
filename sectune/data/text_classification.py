"""Text → label data: seed 001's ``text,label`` CSV and deepset/prompt-injections.

Loaders return plain lists of ``{"text", "label"}`` dicts with string labels, so the same
classify/evaluate code serves both; every malformed input is a ``DataError`` naming the file
and the column or line, because a silently skipped row changes the reported numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pandas as pd

from sectune.data import warn_case_variants
from sectune.data.csv_files import read_csv_rows, unique_columns
from sectune.data.jsonl import json_lines
from sectune.errors import DataError

#: deepset/prompt-injections: 0 = legitimate, 1 = prompt injection.
INJECTION_LABEL_NAMES = {0: "benign", 1: "injection"}


def load_text_label_csv(path, text_column: str = "text", label_column: str = "label") -> List[Dict[str, str]]:
    """Read a CSV with a text and a label column (seed 001's format).

    Empty text or label cells are errors naming the line (header = line 1) rather than being
    dropped: the seed's README asks users to check for missing values, we check for them.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CSV not found")
    try:
        df = read_csv_rows(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty (expected a header with "
                        f"{text_column!r},{label_column!r})") from None
    except UnicodeDecodeError as exc:
        from sectune.data.csv_files import not_utf8

        raise not_utf8(path, exc) from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: cannot parse as CSV: {exc}") from None
    df.columns = unique_columns(path, df.columns)
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        from sectune.data.csv_files import delimiter_hint

        raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
                        f"found {list(df.columns)}{delimiter_hint(df.columns)}")
    if df.empty:
        raise DataError(f"{path}: has a header but no rows")
    out = []
    for i, (text, label) in enumerate(zip(df[text_column], df[label_column])):
        text, label = str(text), str(label).strip()
        if not text.strip() or not label:
            from sectune.data.csv_files import csv_record_lines

            col = text_column if not text.strip() else label_column
            lines = csv_record_lines(path)  # blank lines and multi-line cells: row i + 2 is not the line
            raise DataError(f"{path}: line {lines[i] if i < len(lines) else i + 2}: empty {col!r}")
        out.append({"text": text, "label": label})
    warn_case_variants([r["label"] for r in out], f"{path} column {label_column!r}")
    return out


def _read_injection_jsonl(path: Path) -> List[Dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: not found (expected train.jsonl and test.jsonl, or the Hugging Face download's "
                        f"{path.stem}-*.parquet)")
    rows = []
    allowed = " or ".join(map(str, INJECTION_LABEL_NAMES))
    for lineno, obj, why in json_lines(path):
        if why:
            raise DataError(f"{path}: line {lineno}: {why}")
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}: line {lineno}: expected an object with a string 'text'")
        label = obj.get("label")
        # a list or object label is unhashable: check the type before looking it up
        if isinstance(label, bool) or not isinstance(label, (int, float)) or label not in INJECTION_LABEL_NAMES:
            raise DataError(f"{path}: line {lineno}: 'label' must be {allowed}, got {label!r}")
        rows.append({"text": obj["text"], "label": INJECTION_LABEL_NAMES[label]})
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def _read_injection_parquet(path: Path) -> List[Dict[str, str]]:
    """One split as the Hugging Face download holds it (``text``, ``label`` 0/1 columns)."""
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a damaged or foreign file
        raise DataError(f"{path}: cannot read as parquet ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    missing = [c for c in ("text", "label") if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (deepset/prompt-injections has text, label)")
    rows = []
    for i, (text, label) in enumerate(zip(frame["text"], frame["label"])):
        if not isinstance(text, str) or label not in INJECTION_LABEL_NAMES:
            raise DataError(f"{path}: row {i}: expected a string text and a label of {' or '.join(map(str, INJECTION_LABEL_NAMES))}")
        rows.append({"text": text, "label": INJECTION_LABEL_NAMES[int(label)]})
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def split_files(directory: Path, split: str) -> tuple[Path, list[Path]]:
    """(``<split>.jsonl``, the parquet files of that split ``hf download`` leaves, in the folder or its ``data/``)."""
    return directory / f"{split}.jsonl", sorted([*directory.glob(f"{split}-*.parquet"), *directory.glob(f"data/{split}-*.parquet")])


def load_prompt_injections(directory) -> Dict[str, List[Dict[str, str]]]:
    """``{"train": [...], "test": [...]}`` (546/116 rows) from ``train.jsonl``/``test.jsonl``, or from the parquet files
    ``hf download deepset/prompt-injections --repo-type dataset --local-dir DIR`` leaves (``DIR/data/
    train-*.parquet``, ``test-*.parquet``, or the same files directly in the folder).

    The dataset has no validation split; callers that tune anything carve one out of train.
    """
    directory = Path(directory)
    if directory.is_file():
        raise DataError(f"{directory}: a file; dataset=prompt_injections reads a folder holding train.jsonl and test.jsonl "
                        "(or the parquet files hf download leaves): give the folder")
    if not directory.is_dir():
        raise DataError(f"{directory}: prompt-injection folder not found (the README's Data table: "
                        "hf download deepset/prompt-injections --repo-type dataset --local-dir <folder>)")
    out = {}
    for split in ("train", "test"):
        jsonl, parquet = split_files(directory, split)
        if jsonl.is_file() or not parquet:
            out[split] = _read_injection_jsonl(jsonl)
        else:
            out[split] = [row for p in parquet for row in _read_injection_parquet(p)]
    return out
