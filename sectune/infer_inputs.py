"""``stage=infer``'s side of the files: the logs read (text, gzip, UTF-16; a folder's unusable files skipped, named), the
windows they are cut into (line numbers as ``wc -l`` and ``sed -n`` count them), the answers' file (never over a file
that is not an earlier infer output), the per-file verdict summary and the names an answer gives that its window
does not hold."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sectune.data import auth_logs
from sectune.data.log_text import read_log
from sectune.data.auth_rules import _MAX_HOST, _MAX_NAME
from sectune.errors import ConfigError, DataError, shown

DEFAULT_OUTPUT = "analyses.json"
#: what a folder's file may be and be skipped, named (read_log's words → the reason shown)
_SKIPPED = {"binary file": "binary", "empty log file": "empty", "does not decompress": "a damaged gzip"}
#: gzip's magic; UTF-16's byte-order marks (a Windows export)


# ----------------------------------------------------------------------------- inputs
def read_inputs(input_file) -> list[tuple[str, str]]:
    """(file name, text) for one log file or each regular file of a folder (sorted, not recursive, hidden files
    skipped); a folder's binary or empty files are skipped, named (a rotated, compressed or empty log beside the text
    ones must not stop the rest); a single unusable file is a DataError naming it. Windows the pipeline cut from
    generated logs are recorded as such (:func:`sectune.data.note_generated_folder`)."""
    from sectune.data import note_generated_folder

    if not input_file:
        raise ConfigError("stage=infer needs infer.input_file=<a log file or a folder of log files>")
    path = Path(str(input_file)).expanduser()
    note_generated_folder(path if path.is_dir() else path.parent)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise DataError(f"infer.input_file={input_file}: the folder holds no log files")
        texts, skipped = [], []
        for f in files:
            try:
                texts.append((f.name, read_log(f)))
            except DataError as e:
                why = next((w for k, w in _SKIPPED.items() if k in str(e)), None)
                if why is None:
                    raise
                skipped.append(f"{shown(f.name)} ({why})")
        if skipped:
            print(f"sectune: warning: infer: skipped {len(skipped)} file(s) in {path} that hold no text log: "
                  f"{', '.join(skipped[:5])}{' …' if len(skipped) > 5 else ''}")
        if not texts:
            raise DataError(f"infer.input_file={input_file}: the folder holds no text log files (every file is binary or empty)")
        return texts
    if path.is_file():
        return [(path.name, read_log(path))]
    if path.exists():
        raise DataError(f"infer.input_file={input_file}: not a regular file or a folder")
    raise DataError(f"infer.input_file={input_file}: no such file or folder")


# ----------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class LogWindow:
    name: str  # the file's name
    text: str
    first: int  # 1-based line numbers in the file, blank lines counted
    last: int


def file_lines(text: str) -> list[str]:
    """A log's lines as ``wc -l`` counts them: split at ``\\n`` only (a user name holding U+2028, a form feed or a
    lone ``\\r`` is one line's text, not a line break: ``str.splitlines`` shifted every later window), ``\\r\\n`` ends
    read as ``\\n``."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def log_windows(files: list[tuple[str, str]], window_lines: int) -> list[LogWindow]:
    """Each file whole, or, past ``window_lines`` non-blank lines (> 0), cut into the fewest consecutive windows
    of at most that many lines, of near-equal length (2,000 lines by 20: 100 windows of 20; 45 by 20: 3 of 15),
    so that no window is much shorter than the ones the analyst learnt from."""
    out = []
    for name, text in files:
        lines = [(i, line) for i, line in enumerate(file_lines(text), 1) if line.strip()]
        if window_lines <= 0 or len(lines) <= window_lines:
            out.append(LogWindow(name, "\n".join(file_lines(text)) + "\n", lines[0][0], lines[-1][0]))
            continue
        k = -(-len(lines) // window_lines)
        bounds = [round(j * len(lines) / k) for j in range(k + 1)]
        for a, b in zip(bounds, bounds[1:]):
            chunk = lines[a:b]
            out.append(LogWindow(name, "\n".join(line for _, line in chunk) + "\n", chunk[0][0], chunk[-1][0]))
    return out


def verdict_summaries(records: list[dict]) -> list[str]:
    """One line per file cut into windows: its windows' verdicts, and where the most severe one is. A verdict outside
    benign/suspicious/malicious (a custom ``infer.schema``) is counted and named, never ranked: it was left out, so
    a less severe verdict read as the worst."""
    by_file: dict[str, list[dict]] = {}
    for r in records:
        by_file.setdefault(r["input"], []).append(r)
    out = []
    for name, recs in by_file.items():
        if len(recs) < 2:
            continue
        # a verdict the token budget's forced close wrote is not the model's (the schema's shortest: "benign", failing open)
        verdicts = [v if r["schema_valid"] and not r.get("verdict_forced") and isinstance(v := (r["analysis"] or {}).get("verdict"), str)
                    else None for r in recs]
        counts = {v: verdicts.count(v) for v in auth_logs.CLASSES[::-1] if v in verdicts}
        worst = next(iter(counts), None)
        other = sorted({v for v in verdicts if v is not None and v not in auth_logs.CLASSES})
        where = [f"{r['lines'][0]}-{r['lines'][1]}" for r, v in zip(recs, verdicts) if v == worst]
        unread = verdicts.count(None)
        forced = sum(bool(r.get("verdict_forced")) for r in recs)
        unread_said = f"no schema-valid verdict {unread}" + (f" ({forced} written by the forced close, not the model)" if forced else "")
        parts = ([f"{v} {c}" for v, c in counts.items()] + [f"{v} {verdicts.count(v)} (not ranked)" for v in other]
                 + ([unread_said] if unread else []))
        out.append(f"{shown(name)}: {len(recs)} windows · " + ", ".join(parts)
                   + (f" · {worst} at lines {', '.join(where[:5])}{' …' if len(where) > 5 else ''}" if worst else ""))
    return out


def cut_long_windows(windows: list[LogWindow], max_chars: int) -> tuple[list[LogWindow], set[int]]:
    """Windows longer than ``max_chars`` characters keep their first and last ``max_chars / 2`` (whole lines); (the
    windows, the indices of those cut)."""
    out, cut = [], set()
    for i, w in enumerate(windows):
        if len(w.text) <= max_chars:
            out.append(w)
            continue
        half = max_chars // 2
        head, tail = w.text[:half].rsplit("\n", 1)[0], w.text[-half:].split("\n", 1)[-1]
        out.append(LogWindow(w.name, f"{head}\n{tail}", w.first, w.last))
        cut.add(i)
    return out, cut


def warn_unfamiliar_format(files: list[tuple[str, str]], share: float = 0.5) -> None:
    """Say when most of a file's lines are not the syslog lines (``Mon DD HH:MM:SS host proc[pid]: …``) the analyst and
    the rules read: RFC 5424, journald JSON or a log of other daemons got analyses as confident as an auth log's."""
    from sectune.data.auth_rules import SYSLOG_HEADER

    for name, text in files:
        lines = [ln for ln in file_lines(text) if ln.strip()]
        known = sum(bool(SYSLOG_HEADER.match(ln.strip())) for ln in lines)
        if lines and known < share * len(lines):
            print(f"sectune: warning: infer: {shown(name)}: {known} of {len(lines)} lines are syslog lines as the analyst was trained "
                  "on (Mon DD HH:MM:SS host proc[pid]: …); its analyses of the others are guesses (convert them, e.g. "
                  "journalctl -o short)")


# ----------------------------------------------------------------------------- the answers' file
def output_path(output_file, run_dir: Path, inputs=()) -> Path:
    """Where the answers go: ``infer.output_file``, else ``<run dir>/analyses.json``. An existing file there must be an
    earlier infer output: the input log itself, or a run's result.json, was overwritten with exit 0."""
    if not output_file:
        # a rerun in this dir replaces an earlier run's answers only when it has new ones (written atomically at the end,
        # the earlier ones kept as analyses.previous.json); if it fails first, they and result.json stay (runner.run)
        return run_dir / DEFAULT_OUTPUT
    path = Path(str(output_file)).expanduser()
    if path.is_dir():
        raise ConfigError(f"infer.output_file={output_file}: is a folder; give a file name (e.g. {path / DEFAULT_OUTPUT})")
    parent = next(p for p in path.absolute().parents if p.exists())  # the folders below it are created
    if not parent.is_dir():
        raise ConfigError(f"infer.output_file={output_file}: {parent} is a file, not a folder")
    if path.exists() and (any(path.resolve() == Path(str(i)).expanduser().resolve() for i in inputs) or not _infer_output(path)):
        raise ConfigError(f"infer.output_file={output_file}: the file exists and is not an earlier infer output (an input log, "
                          "a run's result.json?); give a new path, or delete it first")
    return path


def _infer_output(path: Path) -> bool:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(obj, list) and all(isinstance(r, dict) and "input" in r and "lines" in r for r in obj)


def keep_previous(path: Path) -> Path | None:
    """The answers a rerun replaces move to ``<name>.previous<suffix>`` (one generation), said aloud."""
    if not path.is_file():
        return None
    previous = path.with_name(f"{path.stem}.previous{path.suffix}")
    os.replace(path, previous)
    print(f"sectune: infer: the earlier answers in {path.name} are now {previous}")
    return previous


# ----------------------------------------------------------------------------- grounding
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")


def absent_names(analysis, window_text: str) -> list[str]:
    """The source addresses/hosts and user names an analysis gives that its window does not hold: a SOC analyst reading
    ``source_ips: 183.62.140.253`` must know the window never mentions it (the tiny analyst names attackers it
    remembers from training)."""
    if not isinstance(analysis, dict):
        return []
    # a field that is not a list (a schema-invalid "source_ips": 1) holds no names: it crashed infer, losing its answers,
    # and a string was read letter by letter (an audit, session 41)
    listed = {k: v if isinstance(v := analysis.get(k), list) else [] for k in ("source_ips", "invalid_users", "targeted_users")}
    names = [(s.get("ip"), _MAX_HOST) for s in listed["source_ips"] if isinstance(s, dict)]
    names += [(u, _MAX_NAME) for k in ("invalid_users", "targeted_users") for u in listed[k]]
    # a whole token of the window, not a piece of one: 10.0.0.1 is not in "10.0.0.12", nor root in "user=rootadmin", nor
    # 2001:db8 in "2001:db8:5:1::23" (an audit, session 40), though 10.0.0.5 is in "::ffff:10.0.0.5"; a name as long as
    # the schema allows may be a longer one cut there, as the rules cut it (its start must match)
    return sorted({n for n, cap in names if isinstance(n, str) and n and not re.search(
        rf"(?:(?<![\w.:-])|(?<=::ffff:)){re.escape(n)}" + (r"(?![\w-]|\.\w|:[\w:])" if len(n) < cap else ""), window_text)})


# ----------------------------------------------------------------------------- an interrupted run's answers
def resume_key(choice, model_ref: str, gen_cfg, ic, prompts: list[str], max_seq_length: int | None = None, schema=None) -> str:
    """What an interrupted run's answers depend on: the model (its files' sizes and times), the decoding, the prompts and
    where they are cut (``model.max_seq_length``), and the schema a constrained decode follows (answers decoded under
    another schema were resumed as this one's)."""
    from omegaconf import OmegaConf

    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (choice.path.iterdir() if choice.path else ()) if p.is_file())
    what = {"model": model_ref, "used": choice.used, "path": str(choice.path), "files": files, "constrained": bool(ic.constrained),
            "grounded": [str(f) for f in ic.get("grounded_fields") or ()],
            "generation": OmegaConf.to_container(gen_cfg, resolve=True) if OmegaConf.is_config(gen_cfg) else dict(gen_cfg),
            "batch_size": int(ic.batch_size), "prompts": hashlib.sha256("\0".join(prompts).encode()).hexdigest(),
            "max_seq_length": max_seq_length, "schema": schema if ic.constrained else None}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def resumed(partial: Path, key: str, total: int) -> list[dict]:
    """The records an interrupted run of the same command saved in ``partial`` (its ``.key`` matching ``key``), else []."""
    try:
        same = json.loads(partial.with_suffix(".key").read_text(encoding="utf-8"))["resume_key"] == key
        texts = json.loads(partial.read_text(encoding="utf-8")) if same else None
        ok = texts is not None and all(isinstance(r["generated"], str) for r in texts)
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not ok or len(texts) > total:
        if partial.exists():
            print(f"sectune: note: infer: {partial} holds another model's, decoding's or input's answers: not reused")
        return []
    print(f"sectune: infer: resuming: {len(texts)} of {total} windows were answered by the interrupted run ({partial})")
    return texts
