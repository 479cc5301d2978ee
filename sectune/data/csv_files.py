"""CSV files as the data readers take them: a clear error for a folder, a missing or unparsable file, a file
that is not UTF-8 (its line and byte), and the file line a pandas row came from."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from sectune.errors import DataError


#: what pandas reads compressed by the file's suffix (compression="infer"); the helpers below that find a bad line or
#: column read the same text (they read a .csv.gz as raw bytes: a traceback, or "not UTF-8 text": audit AB)
_STREAMS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}
_UNREAD = (".zst", ".tar", ".tgz")


def open_binary(path: Path):
    """``path`` opened for reading as pandas reads it: decompressed when its suffix says so (.gz, .bz2, .xz, a .zip
    holding one file). A suffix pandas reads and these helpers do not (.zst, .tar) is a DataError."""
    import importlib

    suffix = path.suffix.lower()
    if suffix in _STREAMS:
        return importlib.import_module(_STREAMS[suffix]).open(path, "rb")
    if suffix == ".zip":
        import zipfile

        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise DataError(f"{path}: cannot read it as .zip ({e})") from None
        names = [n for n in zf.namelist() if not n.endswith("/")]
        if len(names) != 1:
            raise DataError(f"{path}: a .zip holding {len(names)} files; sectune reads a .zip of one CSV (unzip it and give the file)")
        return zf.open(names[0])
    if suffix in _UNREAD:
        raise DataError(f"{path}: sectune reads CSV plain or compressed as .gz, .bz2, .xz or .zip; decompress this one first")
    return open(path, "rb")


def open_text(path: Path):
    """:func:`open_binary` as UTF-8 text for the ``csv`` module (a byte-order mark skipped, newlines as they are)."""
    import io

    return io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline="")


def not_utf8(path: Path, exc: UnicodeDecodeError) -> DataError:
    """The error for a CSV that is not UTF-8, naming the line and byte (pandas' position is within its read buffer)."""
    with open_binary(path) as f:
        raw = f.read()
    try:
        raw.decode("utf-8-sig")
        where = ""
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        where = f" (line {line}, byte 0x{raw[e.start]:02x})"
    packed = path.suffix.lower() in (*_STREAMS, ".zip")
    plain = Path(path.stem) if packed else path
    return DataError(f"{path}: not UTF-8 text{where}: {exc.reason}; save the file as UTF-8 (a Latin-1 export, say: "
                     f"{'decompress it, then ' if packed else ''}iconv -f latin1 -t utf-8 {plain.name} > {plain.stem}.utf8.csv)")


def delimiter_hint(columns) -> str:
    """For a missing-column error: when the header read as one column holding ';', tab or '|' the file is not
    comma-separated (a European spreadsheet's CSV export uses ';'); what to do about it, else ''."""
    cols = [str(c) for c in columns]
    if len(cols) == 1:
        for sep, name in ((";", "';'"), ("\t", "tabs"), ("|", "'|'")):
            if sep in cols[0]:
                return (f"; the header reads as one column: the file seems separated by {name}, and sectune reads "
                        f"comma-separated CSV (convert it: python -c \"import pandas as p,sys; p.read_csv(sys.argv[1], "
                        f"sep={sep!r}).to_csv(sys.argv[2], index=False)\" in.csv out.csv)")
    return ""


def csv_record_lines(path: Path) -> list[int]:
    """The file line on which each data record (after the header) ends, as pandas counts records: blank lines
    skipped, a quoted cell may span lines. For error messages: the row index pandas gives is not a line number."""
    import csv

    with open_text(path) as f:
        reader = csv.reader(f)
        # pandas skips a line only when it holds one blank cell; "," (every cell empty) is a record, the one reported
        ends = [reader.line_num for row in reader if len(row) > 1 or (row and row[0].strip())]
    return ends[1:]


def read_csv_rows(path: Path, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` where a row with more cells than the header is a DataError naming its line. pandas reads a
    first data row with one cell too many as a file whose first column is an index: every column shifted by one (the
    labels read from the column beside them), with no error."""
    import warnings

    with open_binary(path) as f:  # a compression the messages below could not read is said now; a damaged file too
        try:
            f.read(1)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: cannot read it as {path.suffix} ({e})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # index_col=False: a long row's extra cell dropped
            return pd.read_csv(path, index_col=False, **kwargs)
    except pd.errors.ParserWarning:
        import csv

        with open_text(path) as f:
            reader = csv.reader(f)
            width = len(next(reader, []))
            line = next((reader.line_num for row in reader if any(c.strip() for c in row[width:])), None)
        if line is None:  # only empty cells past the header (a trailing comma on the lines): dropped, as pandas does
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", pd.errors.ParserWarning)
                return pd.read_csv(path, index_col=False, **kwargs)
        raise DataError(f"{path}: line {line}: more cells than the header's {width} columns (a comma inside an unquoted "
                        "cell?); quote that cell or fix the row") from None


def read_csv_checked(path: Path, what: str = "CSV", key: str | None = None, strings: bool = False) -> pd.DataFrame:
    """A CSV as a DataFrame with stripped column names; a folder, a missing or an unparsable file is a DataError
    (``key``: the setting that names the file, for the folder's message). ``strings``: every cell as its text, as the
    text readers take it ("NA", "null", "None" and empty cells stay text, not NaN)."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a {what}; " + (f"set {key} to the {what} itself" if key else f"give the {what} itself"))
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        df = read_csv_rows(path, dtype=str, keep_default_na=False) if strings else read_csv_rows(path, low_memory=False)
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot parse as CSV: {exc}") from None
    df.columns = unique_columns(path, df.columns)
    return df


def unique_columns(path: Path, columns) -> list[str]:
    """The column names stripped of spaces; a name given twice is a DataError. 'Rate' and ' Rate' are one name once
    stripped (``df['Rate']`` was then a DataFrame, and a text reader zipped its column names as the rows), and an exact
    repeat, which pandas renames 'Rate.1', was read from the first column without a word."""
    names = [str(c).strip() for c in columns]
    twice = {n for n in names if names.count(n) > 1}
    mangled = [n for n in names if (m := re.fullmatch(r"(.+)\.\d+", n)) and m[1] in names]
    if mangled:  # 'Rate.1' may be a real name: the header itself says whether 'Rate' is there twice
        import csv

        with open_text(path) as f:
            header = [c.strip() for c in next(csv.reader(f), [])]
        twice |= {c for c in header if header.count(c) > 1}
    if twice:
        raise DataError(f"{path}: column name(s) {', '.join(map(repr, sorted(twice)))} given more than once (spaces around a "
                        "name do not count); rename or drop the extra column")
    return names
