"""The ``hdfs`` dataset: HDFS log sessions as sequences of log keys (seed 003; DeepLog, Du et al. 2017).

Two layouts are read (``dataset.hdfs_layout``, or found from what ``dataset.path`` holds):

* ``deeplog``: DeepLog's key sessions, one session per line as space-separated integer keys
  1..``dataset.num_log_keys``: ``hdfs_train`` (normal) and ``hdfs_test_abnormal`` (anomalous). The
  matching ``hdfs_test_normal`` is not public in that snapshot, so the normal file is split three ways.
* ``loghub``: raw lines (``HDFS_2k.log``) + block labels (``*_block_labels.csv``): each line joins the
  session of every block id it names, in file order; the key of a line is the structured CSV's
  ``EventId`` (``E4`` → 4) when ``<log>_structured.csv`` is there (``dataset.log_parser=auto``), else
  the drain3 template of its content after the variable fields are masked (:func:`mask_content`).

Splits (:func:`sectune.data.hdfs_splits.split_sessions`, ``dataset.split_seed`` recorded in ``info``): the normal sessions are
shuffled and cut into test-normal (``test_fraction``), validation (``val_fraction``) and train (the
rest); the anomalous ones are cut between validation and test in the same proportion as the held-out
normal ones (so validation has test's class balance). Training sees normal train sessions only;
the detection threshold is chosen on validation (sectune/evaluation/anomaly.py), never on test.

Rendering for a language model: prompt ``dataset.prompt_template`` (``session:``), completion the keys
as `` 5 5 22 …`` (one token per key for the tiny tokenizer); the end of the session is the tokenizer's
EOS token, which TRL appends to every completion and the detector appends the same way.

Bad input: a session line that is empty or holds a non-integer, a key outside 1..num_log_keys, an
unknown EventId, a raw line that is not ``<date> <time> <pid> <level> <component>: <content>``, an empty
log, a label or structured CSV that is not UTF-8 or lacks its header (a UTF-8 BOM is accepted), or an
empty split is a ``DataError`` naming the file and line; ``dataset.skip_bad_lines=true`` skips bad lines
instead and counts them (``info["skipped_lines"]``). Without the real files (a fresh clone) the
sessions are generated in DeepLog's format (sectune/data/synthetic_hdfs.py) and the run says so.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sectune.data import note_skipped
from sectune.errors import ConfigError, DataError

DEEPLOG_DIR, LOGHUB_DIR = "deeplog_hdfs_sessions", "loghub_hdfs_2k"
NORMAL_FILE, ANOMALOUS_FILE = "hdfs_train", "hdfs_test_abnormal"
#: what a byte that is not UTF-8 reads as (files are read with errors="replace": the line is named, not the whole file refused)
NOT_UTF8 = "\ufffd"
#: DeepLog's full set also has its normal test sessions (~553k); read too when present
EXTRA_NORMAL_FILE = "hdfs_test_normal"
#: the most log keys (templates) a run takes: the bigram detector holds a (keys + 1)² table (4,097² floats: 134 MB);
#: loghub's HDFS logs have 29-48 templates
MAX_LOG_KEYS = 4096
DEFAULT_PROMPT = "session:"
NORMAL, ANOMALOUS = 0, 1


@dataclass(frozen=True)
class Session:
    #: ``<file>:<line>`` (deeplog) or the block id (loghub): stable across runs
    id: str
    keys: tuple[int, ...]
    label: int  # NORMAL | ANOMALOUS


@dataclass
class HdfsData:
    splits: dict[str, list[Session]]
    num_keys: int
    source: str
    info: dict = field(default_factory=dict)


def render_keys(keys) -> str:
    """`` 5 5 22``: every key with its leading space, so each is one token of a byte-level BPE."""
    return "".join(f" {k}" for k in keys)


# ------------------------------------------------------------------------------ deeplog layout
def read_key_sessions(path: Path, label: int, num_keys: int, skip_bad: bool = False) -> tuple[list[Session], int]:
    """One session per line; (sessions, skipped lines)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (dataset=hdfs, deeplog layout: {NORMAL_FILE} + {ANOMALOUS_FILE})")
    sessions, skipped = [], 0
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
        # lines end at \n, \r\n or \r only: str.splitlines also splits at \x0b, \x0c and \u2028, cutting a session in two
        lines = re.split(r"\r\n|\r|\n", fh.read())
    while lines and not lines[-1].strip():  # blank lines at the end are the end of the file, not empty sessions
        lines.pop()
    for n, line in enumerate(lines, 1):
        problem = None
        parts = line.split()
        if NOT_UTF8 in line:
            problem = "not UTF-8 text (a byte that is no character; save the file as UTF-8)"
        elif not parts:
            problem = "empty session line (a session needs at least one key)"
        else:
            bad = next((p for p in parts if not (p.isascii() and p.isdigit())), None)  # '²' is a digit to str.isdigit
            if bad is not None:
                problem = f"{bad!r} is not a log key (integers 1..{num_keys})"
            else:
                # a key longer than num_keys' digits is out of range whatever it is: int() of more than 4,300 digits raised
                out = next((p for p in parts if len(p.lstrip("0")) > len(str(num_keys)) or not 1 <= int(p) <= num_keys), None)
                if out is not None:
                    shown = out if len(out) <= 20 else f"{out[:20]}… ({len(out)} digits)"
                    problem = f"unknown log key {shown} (dataset.num_log_keys={num_keys}: keys are 1..{num_keys})"
        if problem:
            if not skip_bad:
                raise DataError(f"{path}:{n}: {problem}; fix the line or set dataset.skip_bad_lines=true to skip such lines")
            skipped += 1
            continue
        sessions.append(Session(f"{path.name}:{n}", tuple(int(p) for p in parts), label))
    return sessions, skipped


# ------------------------------------------------------------------------------ loghub layout
LOG_LINE = re.compile(r"^(?P<date>\d{6}) (?P<time>\d{6}) (?P<pid>\d+) (?P<level>[A-Z]+) (?P<component>[^:\s]+): (?P<content>.*)$")
BLOCK_ID = re.compile(r"blk_-?\d+")
#: variable fields masked before template mining, in this order (a run of block ids is one field)
MASKS = (
    (re.compile(r"blk_-?\d+(?:\s+blk_-?\d+)*"), "<BLK>"),
    (re.compile(r"/?\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?"), "<IP>"),
    (re.compile(r"(?:/[\w.\-]+)+"), "<PATH>"),
    (re.compile(r"(?<![\w<])-?\d+(?![\w>])"), "<NUM>"),
)


def mask_content(content: str) -> str:
    for rx, token in MASKS:
        content = rx.sub(token, content)
    return content


def _drain_keys(contents: list[str], reference: list[str] = ()) -> list[int]:
    """drain3 cluster id (1, 2, … in order of first appearance) of each masked content; ``reference`` contents (another
    log's, in its order) are clustered first, so its templates keep the ids they had when that log alone was read."""
    try:
        from drain3 import TemplateMiner
        from drain3.template_miner_config import TemplateMinerConfig
    except ImportError:
        raise ConfigError("dataset.log_parser=drain3 needs the drain3 package (pip install drain3), "
                          "or a structured CSV beside the log (dataset.log_parser=structured)") from None
    conf = TemplateMinerConfig()
    conf.profiling_enabled = False
    miner = TemplateMiner(config=conf)
    for c in reference:
        miner.add_log_message(mask_content(c))
    return [int(miner.add_log_message(mask_content(c))["cluster_id"]) for c in contents]


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV whose header names ``columns``; a UTF-8 BOM is accepted. A file that is not
    UTF-8, not CSV, empty or without that header (a missing first line, say) is a DataError naming the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    raw = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: empty file; expected a header line naming {', '.join(columns)}, then one row per line")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [str(c).strip() for c in reader.fieldnames or []]
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{path}:1: first line {text.splitlines()[0][:80]!r} is not a header naming {', '.join(columns)} "
                            f"(missing {', '.join(missing)})")
        reader.fieldnames = header
        for row in reader:
            yield reader.line_num, row
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: cannot parse as CSV ({e})") from None


def _event_key(ev: str) -> int | None:
    """n of ``E<n>`` when it is 1..MAX_LOG_KEYS, else None: key 0 is the detectors' start/end slot, ``E<4,300 digits>``
    made int() raise, and E999999999 asked for a 10^18-cell bigram table."""
    m = re.fullmatch(r"E0*(\d{1,4})", ev)
    return int(m[1]) if m and 1 <= int(m[1]) <= MAX_LOG_KEYS else None


def _structured_keys(path: Path, n_lines: int, templates: Path | None) -> tuple[list[int], int]:
    """EventId (``E<n>`` → n) of each line from loghub's structured CSV; (keys, number of templates)."""
    known = None
    if templates is not None and templates.is_file():
        known = {(row.get("EventId") or "").strip() for _, row in _csv_rows(templates, ("EventId",))}
    keys, by_line = [], {}
    for n, row in _csv_rows(path, ("EventId",)):
        ev = (row.get("EventId") or "").strip()
        if not re.fullmatch(r"E\d+", ev) or (known is not None and ev not in known):
            raise DataError(f"{path}:{n}: unknown EventId {ev!r:.40}" + (f" (not in {templates.name})" if known else ""))
        if (key := _event_key(ev)) is None:
            raise DataError(f"{path}:{n}: EventId {ev!r:.40} out of range: sectune numbers templates E1..E{MAX_LOG_KEYS}")
        keys.append(key)
        # the row's LineId places it: rows sorted by EventId gave every line another's key, silently (session 36)
        lid = (row.get("LineId") or "").strip()
        if lid:
            if not lid.isdigit() or not 1 <= int(lid) <= n_lines or int(lid) in by_line:
                raise DataError(f"{path}:{n}: LineId {lid!r:.20} is not a line of the log (1..{n_lines}, each once)")
            by_line[int(lid)] = key
    if len(keys) != n_lines:
        raise DataError(f"{path}: {len(keys)} rows for {n_lines} log lines; it is not the structured form of this log")
    if by_line:
        if len(by_line) != len(keys):
            raise DataError(f"{path}: {len(keys) - len(by_line)} row(s) without a LineId beside rows with one: give every row its LineId, or none")
        keys = [by_line[i] for i in range(1, n_lines + 1)]
    listed = (k for e in known or () if (k := _event_key(e)) is not None)
    num = max([*keys, *listed], default=1)  # the templates file may number templates this log never uses
    return keys, num


def loghub_files(folder: Path) -> tuple[Path, Path]:
    """(the log, its labels file) of a loghub HDFS folder."""
    logs = sorted(p for p in folder.glob("*.log"))
    labels_files = sorted(folder.glob("*_block_labels.csv")) or sorted(folder.glob("anomaly_label.csv"))
    if len(logs) != 1 or not labels_files:
        raise DataError(f"{folder}: a loghub HDFS folder holds one *.log and a *_block_labels.csv (BlockId,Label); found {[p.name for p in logs]}")
    return logs[0], labels_files[0]


def _log_lines(log_path: Path, skip_bad: bool) -> tuple[list[list[str]], list[str], int]:
    """(each line's block ids, each line's content, skipped lines) of a loghub HDFS log."""
    blocks_of, contents, skipped = [], [], 0
    # only line breaks end a line (splitlines also split at \x0c, \u2028: one line became two; session 36)
    lines = re.split(r"\r\n|\r|\n", log_path.read_text(encoding="utf-8-sig", errors="replace"))  # a BOM is not data
    while lines and not lines[-1].strip():  # blank lines at the end are the end of the file (as in the deeplog layout)
        lines.pop()
    if not lines:
        raise DataError(f"{log_path}: empty log; a loghub HDFS log holds one line per event (<date> <time> <pid> <level> <component>: <content>)")
    for n, line in enumerate(lines, 1):
        m = LOG_LINE.match(line) if NOT_UTF8 not in line else None
        blocks = BLOCK_ID.findall(line)
        if m is None or not blocks:
            if not skip_bad:
                why = ("not a loghub HDFS line (<date> <time> <pid> <level> <component>: <content>)" if NOT_UTF8 not in line
                       else "not UTF-8 text (a byte that is no character; save the log as UTF-8)") if m is None else "names no block id"
                raise DataError(f"{log_path}:{n}: {why}; fix it or set dataset.skip_bad_lines=true to skip such lines")
            skipped += 1
            blocks = []
        blocks_of.append(list(dict.fromkeys(blocks)))
        contents.append(m.group("content") if m else "")
    return blocks_of, contents, skipped


def keys_parser(folder: Path, layout: str, parser: str) -> str:
    """How a folder's sessions get their keys: deeplog (given), structured (loghub's EventId) or drain3."""
    if layout == "deeplog":
        return "deeplog"
    if parser == "structured" or parser == "drain3":
        return parser
    log = next(iter(sorted(folder.glob("*.log"))), None)  # loghub_files' log (a folder with another count fails there)
    return "structured" if log is not None and log.with_name(log.name + "_structured.csv").is_file() else "drain3"


def read_loghub(folder: Path, parser: str = "auto", skip_bad: bool = False, reference: Path | None = None
                ) -> tuple[list[Session], list[Session], int, dict]:
    """(normal sessions, anomalous sessions, number of keys, info) from a loghub HDFS folder; ``reference``: a loghub log
    (or its folder) whose drain3 numbering the keys follow (drain3 only; its bad lines read as a run that skipped them
    did, and a run that did not skip any had none)."""
    log_path, labels_path = loghub_files(folder)
    blocks_of, contents, skipped = _log_lines(log_path, skip_bad)
    structured = log_path.with_name(log_path.name + "_structured.csv")
    if parser not in ("auto", "structured", "drain3"):
        raise ConfigError(f"dataset.log_parser={parser!r}: choose auto, structured or drain3")
    if keys_parser(folder, "loghub", parser) == "structured":
        keys, num_keys = _structured_keys(structured, len(contents), log_path.with_name(log_path.name + "_templates.csv"))
        how = f"EventId of {structured.name}"
    else:
        ref_contents, how = [], "drain3 templates of the masked contents"
        if reference is not None:
            ref_log = loghub_files(reference)[0] if reference.is_dir() else reference
            ref_contents = _log_lines(ref_log, True)[1]
            how += f", numbered as in {ref_log}"
        keys = _drain_keys(contents, ref_contents)
        num_keys = max(keys)
    sessions: dict[str, list[int]] = {}
    for blocks, key in zip(blocks_of, keys):
        for b in blocks:
            sessions.setdefault(b, []).append(key)
    label_of: dict[str, int] = {}
    line_of: dict[str, int] = {}
    for n, row in _csv_rows(labels_path, ("BlockId", "Label")):
        lab = (row.get("Label") or "").strip()
        if lab not in ("Normal", "Anomaly"):
            raise DataError(f"{labels_path}:{n}: Label {lab!r} (expected Normal or Anomaly)")
        block, label = (row.get("BlockId") or "").strip(), ANOMALOUS if lab == "Anomaly" else NORMAL
        if label_of.get(block, label) != label:  # the last row had won silently
            raise DataError(f"{labels_path}:{n}: block {block} is {lab} here and {'Normal' if lab == 'Anomaly' else 'Anomaly'} on line "
                            f"{line_of[block]}: one label per block")
        label_of[block] = label
        line_of.setdefault(block, n)
    missing = [b for b in sessions if b not in label_of]
    if missing:
        raise DataError(f"{labels_path}: no label for block {missing[0]} of {log_path.name} ({len(missing)} blocks unlabelled)")
    out = [Session(b, tuple(k), label_of[b]) for b, k in sessions.items()]
    info = {"layout": "loghub", "keys_from": how, "log_lines": len(contents), "skipped_lines": skipped, "blocks": len(out)}
    return [s for s in out if s.label == NORMAL], [s for s in out if s.label == ANOMALOUS], num_keys, info


# ------------------------------------------------------------------------------ entry points
def source_folder(cfg) -> tuple[Path, str, bool]:
    """(folder, layout, generated?) for ``dataset.path`` / ``dataset.source_dir``."""
    d = cfg.dataset
    layout = str(d.hdfs_layout)
    if layout not in ("deeplog", "loghub"):
        raise ConfigError(f"dataset.hdfs_layout={layout!r}: choose deeplog or loghub")
    if d.path:
        p = Path(str(d.path)).expanduser()
        if not p.exists():
            raise DataError(f"dataset.path={d.path}: no such file or folder")
        if p.is_file() and not (p.name in (NORMAL_FILE, ANOMALOUS_FILE, "anomaly_label.csv") or p.suffix == ".log"
                                or p.name.endswith("_block_labels.csv")):
            # its folder was read instead: a run on the other files there, the named one ignored
            raise DataError(f"dataset.path={d.path}: dataset=hdfs reads a folder, not this file: DeepLog sessions "
                            f"({NORMAL_FILE} + {ANOMALOUS_FILE}) or a loghub HDFS folder (*.log + *_block_labels.csv); "
                            "put the file under those names in a folder of its own and give the folder")
        folder = p.parent if p.is_file() else p
        has = {"deeplog": (folder / NORMAL_FILE).is_file(),
               "loghub": bool(list(folder.glob("*_block_labels.csv")) or (folder / "anomaly_label.csv").is_file())}
        found = layout if has[layout] else next((k for k, v in has.items() if v), None)  # both there: dataset.hdfs_layout's
        if found is None:
            raise DataError(f"{folder}: neither DeepLog sessions ({NORMAL_FILE}, {ANOMALOUS_FILE}) nor a loghub HDFS folder "
                            "(*.log + *_block_labels.csv or anomaly_label.csv)")
        return folder, found, False
    folder = Path(str(d.source_dir)) / (DEEPLOG_DIR if layout == "deeplog" else LOGHUB_DIR)
    if (folder / NORMAL_FILE).is_file() or (layout == "loghub" and folder.is_dir()):
        return folder, layout, False
    from sectune.data.synthetic_hdfs import write_deeplog_files

    out = Path(str(cfg.paths.cache_dir)) / "datasets" / "hdfs-synthetic-s0"
    if not (out / ANOMALOUS_FILE).is_file():
        write_deeplog_files(out, seed=0)
    from sectune.data import note_generated

    note_generated(d.name, out, f"sectune: {folder} not found; using generated HDFS sessions in DeepLog's format ({out})")
    return out, "deeplog", True


def load_hdfs(cfg, need_anomalies: bool | None = None) -> HdfsData:
    """The sessions of ``cfg.dataset`` split into train / validation / test (``need_anomalies``: None = unless stage=sft)."""
    d = cfg.dataset
    folder, layout, generated = source_folder(cfg)
    skip = bool(d.skip_bad_lines)
    if layout == "deeplog":
        num_keys = int(d.num_log_keys)
        normal, s1 = read_key_sessions(folder / NORMAL_FILE, NORMAL, num_keys, skip)
        anomalous, s2 = read_key_sessions(folder / ANOMALOUS_FILE, ANOMALOUS, num_keys, skip)
        if (folder / EXTRA_NORMAL_FILE).is_file():  # DeepLog's full set: its normal sessions join the pool split three ways
            extra, s3 = read_key_sessions(folder / EXTRA_NORMAL_FILE, NORMAL, num_keys, skip)
            print(f"sectune: dataset=hdfs: {folder / EXTRA_NORMAL_FILE}: {len(extra)} more normal sessions, split with "
                  f"{NORMAL_FILE}'s into train / validation / test (sessions, not files, are held out)")
            normal, s1 = normal + extra, s1 + s3
        info = {"layout": "deeplog", "skipped_lines": s1 + s2}
    else:
        reference = Path(str(d.drain3_reference)).expanduser() if d.drain3_reference else None
        normal, anomalous, num_keys, info = read_loghub(folder, str(d.log_parser), skip, reference)
    if info["skipped_lines"]:
        print(f"sectune: dataset=hdfs: skipped {info['skipped_lines']} bad lines in {folder} (dataset.skip_bad_lines=true)")
        note_skipped(info["skipped_lines"])  # result.json's skipped_lines, as other datasets' (an audit, session 37)
    # training needs normal sessions only; detection (evaluate, federated rounds) needs anomalies in validation and test
    from sectune.data.hdfs_splits import split_sessions

    splits, split_info = split_sessions(normal, anomalous, float(d.val_fraction), float(d.test_fraction), int(d.split_seed),
                                        d.max_samples, source=str(folder),
                                        need_anomalies=str(cfg.stage.name) != "sft" if need_anomalies is None else need_anomalies)
    info.update(split_info, source=str(folder), generated=generated, num_keys=num_keys)
    return HdfsData(splits, num_keys, str(folder), info)


def sft_splits(cfg) -> dict[str, list[dict]]:
    """Next-key training records: train and validation hold NORMAL sessions only (the model learns
    normal behaviour; validation loss is measured on normal sessions); test is listed for reference."""
    data = load_hdfs(cfg)
    prompt = str(cfg.dataset.prompt_template or DEFAULT_PROMPT)
    print(f"sectune: dataset=hdfs ({data.info['layout']}, {data.source}): split seed {data.info['split_seed']}, "
          f"train {data.info['train_normal']} normal sessions; validation/test anomalous sessions are never trained on")

    def recs(sessions):
        return [{"prompt": prompt, "completion": render_keys(s.keys), "label": "normal", "id": s.id}
                for s in sessions if s.label == NORMAL]

    return {"train": recs(data.splits["train"]), "validation": recs(data.splits["validation"]),
            "test": recs(data.splits["test"])}
