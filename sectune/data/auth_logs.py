"""The ``auth_logs`` dataset: windows of auth-log lines paired with a rule-based JSON analysis.

Layout (seed 000's): ``ROOT/auth_data/<class>/auth_data_X_Y.txt`` holds a window of raw log
lines, ``ROOT/Auth_bin/auth_text_X_Y.json`` its analysis; ``<class>`` is the verdict
(benign | suspicious | malicious), X a running index, Y the window's first line number in the
source log. ``BUILD_INFO.json`` at the root records where the windows came from.

The analysis comes from transparent rules (``analyze_auth_log``), so the same function is the
annotation, the classic baseline beside the model and a reward check during RL.

The annotation rules (``analyze_auth_log``) live in ``sectune/data/auth_rules.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from sectune.data import check_count
from sectune.errors import DataError
from sectune.data.synthetic_auth import GENERATOR_VERSION
from sectune.data.jsonl import lone_surrogate
from sectune.paths import shared_data_dir
from sectune.files import make_temp_dir


from sectune.data.auth_rules import ANSWER_KEYS, CLASSES, REAL_SOURCES, RULES_VERSION, _HEADER, _SSHD, analyze_auth_log  # noqa: F401 (re-exported)

# ------------------------------------------------------------------------ schema & render
@lru_cache(maxsize=1)
def _packaged_validator():
    return _load_validator(None)


def _validator(schema_path: str | None = None):
    """The packaged schema's validator (cached), or a user's schema read fresh each call."""
    return _packaged_validator() if schema_path is None else _load_validator(schema_path)


def _load_validator(schema_path: str | None):
    from jsonschema import Draft202012Validator

    if schema_path is None:
        text = resources.files("sectune.data").joinpath("auth_schema.json").read_text(encoding="utf-8")
        where = "sectune/data/auth_schema.json"
    else:
        where = schema_path
        try:
            text = Path(schema_path).read_text(encoding="utf-8")
        except OSError as e:
            raise DataError(f"{schema_path}: cannot read schema ({e.strerror})") from e
        except UnicodeDecodeError as e:  # a binary file given as the schema: was the decoder's traceback
            raise DataError(f"{schema_path}: not a JSON schema (not UTF-8 text: byte {e.start})") from None
    try:
        schema = json.loads(text)
        Draft202012Validator.check_schema(schema)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: line {e.lineno}, column {e.colno}: invalid JSON schema ({e.msg})") from e
    except Exception as e:  # jsonschema.SchemaError
        raise DataError(f"{where}: not a valid JSON Schema ({getattr(e, 'message', e)})") from e
    return Draft202012Validator(schema)


def _schema_errors(obj: Any, validator=None) -> list[str]:
    errors = sorted((validator or _validator()).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def validate_analysis(obj: Any) -> list[str]:
    """Schema violations of an analysis as ``"key/path: message"`` strings; empty when valid."""
    return _schema_errors(obj)


def render_prompt(log_text: str) -> str:
    """The instruction a model sees; short, because the tiny default model has 512 tokens."""
    return (
        "Analyze these authentication log lines and answer with JSON matching the schema.\n"
        f"### Logs:\n{log_text.strip()}\n### Analysis:\n"
    )


def render_completion(analysis: dict) -> str:
    """Compact JSON, no trailing newline, keys in :data:`ANSWER_KEYS` order (evidence first, then the
    verdict: the model writes the counts it decides from before the decision), other keys after them."""
    ordered = {k: analysis[k] for k in ANSWER_KEYS if k in analysis}
    ordered.update((k, v) for k, v in analysis.items() if k not in ordered)
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False)


def subwindows(log_text: str, k: int, rng: random.Random, min_lines: int) -> list[str]:
    """Up to ``k`` distinct contiguous spans of a window's lines (``min_lines`` .. all but one line),
    each a new window for the rule engine to annotate. Cutting a window moves its counts across the
    rules' thresholds (6 failures from one source: malicious; 4 of them: suspicious), which is the
    decision a model most often gets wrong, and uses no line outside the window it was cut from."""
    lines = log_text.strip().splitlines()
    n = len(lines)
    lo = min(min_lines, n - 1)
    out: list[str] = []
    seen = {log_text.strip()}
    for _ in range(4 * k):
        if len(out) >= k or lo < 1:
            break
        size = rng.randint(lo, n - 1)
        start = rng.randint(0, n - size)
        text = "\n".join(lines[start : start + size])
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


# -------------------------------------------------------------------------------- builder
def _auth_relevant(line: str) -> bool:
    """Linux_2k mixes kernel/daemon noise with auth lines; keep only the auth processes."""
    m = _HEADER.match(line.strip())
    if not m:
        return False
    proc = m["proc"].strip()
    base = proc.split("(")[0]
    return "(pam_unix)" in proc or base in {*_SSHD, "su", "login", "ftpd", "klogind", "gdm-binary"} or proc.startswith("--")


def _windows(numbered: list[tuple[int, str]], rng: random.Random, lo: int, hi: int) -> Iterable[tuple[int, list[str]]]:
    """Consecutive, non-overlapping windows of lengths drawn from ``[lo, hi]``."""
    i = 0
    while len(numbered) - i >= lo:
        n = min(rng.randint(lo, hi), len(numbered) - i)
        chunk = numbered[i : i + n]
        yield chunk[0][0], [text for _, text in chunk]
        i += n


def _write_sample(root: Path, index: int, first_line: int, label: str, lines: list[str], analysis: dict) -> None:
    """Write one txt/json pair (separate so tests can make a build fail midway)."""
    (root / "auth_data" / label / f"auth_data_{index}_{first_line}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "Auth_bin" / f"auth_text_{index}_{first_line}.json").write_text(
        json.dumps(analysis, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stratified(items: list, label_of, k: int) -> list:
    """First ``k`` items taken round-robin over labels (sorted), keeping each label's order."""
    by: dict[str, list] = {}
    for it in items:
        by.setdefault(label_of(it), []).append(it)
    queues = [by[lab] for lab in sorted(by)]
    out: list = []
    depth = 0
    while len(out) < k and any(depth < len(q) for q in queues):
        out.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return out[:k]


def build_auth_folder(
    out_dir: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    min_lines: int = 6,
    max_lines: int = 20,
    max_windows: int | None = None,
    generated_lines: int = 0,
    fresh_names: bool = False,
) -> dict:
    """Cut real (or generated) auth logs into annotated windows; write seed 000's layout.
    ``generated_lines`` > 0: that many generated lines (seeded by ``seed``) and no real log, even where
    ``source_dir`` has them (an SFT warm-up, ``sft.warmup_lines``), drawn with ``fresh_names`` (``sft.warmup_fresh_names``).

    Written to a sibling temp folder and renamed onto ``out_dir`` when complete, so a crash
    never leaves a half-written folder that looks finished. Returns BUILD_INFO.json's content.
    """
    from sectune.data.log_text import read_log
    from sectune.data.synthetic_auth import generate_auth_lines

    if not 1 <= min_lines <= max_lines:
        raise DataError(f"auth_logs: need 1 <= min_lines <= max_lines, got {min_lines}, {max_lines}")
    if max_windows is not None and max_windows < len(CLASSES):
        raise DataError(f"auth_logs: max_windows={max_windows} cannot hold all {len(CLASSES)} classes")
    src_root = Path(source_dir) if source_dir is not None else shared_data_dir()
    out = Path(out_dir)
    rng = random.Random(seed)
    if generated_lines < 0:
        raise DataError(f"auth_logs: generated_lines must be >= 0, got {generated_lines}")
    real = [] if generated_lines else [src_root / rel for rel in REAL_SOURCES if (src_root / rel).is_file()]
    streams: list[tuple[str, list[tuple[int, str]]]] = []
    files_info = []
    for path in real:
        text = read_log(path, "auth_logs").splitlines()  # bytes not UTF-8 (a Latin-1 user name) named, a BOM dropped
        keep = [(n, ln.rstrip()) for n, ln in enumerate(text, 1) if ln.strip() and ("Linux" not in path.name or _auth_relevant(ln))]
        lines = [ln for ln in text if ln.strip()]
        headed = sum(bool(_HEADER.match(ln.strip())) for ln in lines)
        if lines and headed < len(lines) / 2:  # RFC 5424, journald JSON: the rules read these without process or pid
            print(f"sectune: warning: {path}: {headed} of {len(lines)} lines have a syslog header (Mon DD HH:MM:SS or ISO 8601 "
                  "timestamp, host, proc[pid]:); the rules read the others without their process and pid, so one attempt's "
                  "lines are not grouped (convert them, e.g. journalctl -o short-iso)")
        streams.append((path.name, keep))
        st = path.stat()
        files_info.append({"path": str(path), "sha256": _sha256(path), "lines": len(text), "auth_lines": len(keep),
                           "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    source = "real" if real else "synthetic"
    note = None
    if generated_lines:
        note = f"{generated_lines} generated lines (sectune.data.synthetic_auth, seed {seed}{', fresh names' if fresh_names else ''}), asked for"
        streams.append(("synthetic", list(enumerate(generate_auth_lines(generated_lines, seed, fresh_names=fresh_names), 1))))
    elif not real:
        # recorded in the folder's info; sectune.data.auth_logs_folder says it once per run (note_generated)
        note = f"{src_root} has none of {', '.join(REAL_SOURCES)}; generated synthetic logs in the same formats"
        streams.append(("synthetic", list(enumerate(generate_auth_lines(2000, seed), 1))))

    samples = []  # (first_line, label, lines, analysis)
    for _, numbered in streams:
        for first, lines in _windows(numbered, rng, min_lines, max_lines):
            analysis = analyze_auth_log(lines)
            samples.append((first, analysis["verdict"], lines, analysis))
    if max_windows is not None:
        samples = _stratified(samples, lambda s: s[1], max_windows)
    counts = {c: sum(1 for s in samples if s[1] == c) for c in CLASSES}
    missing = [c for c, n in counts.items() if n == 0]
    if missing and generated_lines:  # the generated warm-up, not the real logs (which were not read)
        raise DataError(f"sft.warmup_lines={generated_lines}: the generated lines gave no {'/'.join(missing)} windows "
                        f"(counts {counts}); the warm-up needs all classes: raise sft.warmup_lines (the presets use 10000)")
    if missing:
        raise DataError(f"{src_root}: logs gave no {'/'.join(missing)} windows (counts {counts}); auth_logs needs all classes")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.building-")  # not mkdtemp's owner-only 0700: a shared .cache
    try:
        for c in CLASSES:
            (tmp / "auth_data" / c).mkdir(parents=True)
        (tmp / "Auth_bin").mkdir()
        for index, (first, label, lines, analysis) in enumerate(samples, 1):
            _write_sample(tmp, index, first, label, lines, analysis)
        info = {
            "source": source,
            "source_files": files_info,
            "seed": seed,
            "min_lines": min_lines,
            "max_lines": max_lines,
            "max_windows": max_windows,
            "generated_lines": generated_lines,
            "counts": counts,
            "total": len(samples),
            "rules_version": RULES_VERSION,
            **({"generator": GENERATOR_VERSION} if source == "synthetic" or generated_lines else {}),
            "layout": "auth_data/<class>/auth_data_X_Y.txt + Auth_bin/auth_text_X_Y.json (X index, Y first line)",
        }
        if note:
            info["note"] = note
        (tmp / "BUILD_INFO.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        from sectune.files import held
        from sectune.run_guard import replace_dir

        with held(out.parent):  # one process at a time checks and renames
            if _built(out) == info:  # another run (a sweep's job, a rank) built the same folder meanwhile: keep theirs,
                shutil.rmtree(tmp)   # which it may be reading (replacing it under a reader failed that run)
                return info
            replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _built(out: Path) -> dict | None:
    """A finished build's BUILD_INFO at ``out``, or None (no build, or one whose info cannot be read)."""
    try:
        return json.loads((Path(out) / "BUILD_INFO.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_auth_folder(
    out_dir: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    min_lines: int = 6,
    max_lines: int = 20,
    max_windows: int | None = None,
    generated_lines: int = 0,
    fresh_names: bool = False,
) -> dict:
    """Build ``out_dir`` unless it already holds a finished build; return its BUILD_INFO."""
    info_path = Path(out_dir) / "BUILD_INFO.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{info_path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg}); delete the folder to rebuild") from e
        # a build by older rules, or of lines an older generator wrote, is rebuilt (atomically: a reader never sees half of one)
        stale = info.get("rules_version") != RULES_VERSION or (info.get("source") == "synthetic" and info.get("generator") != GENERATOR_VERSION)
        # built from generated logs while the real ones were missing, and the real ones are there now: rebuilt from them
        stale = stale or (info.get("source") == "synthetic" and not generated_lines and source_dir is not None
                          and any((Path(source_dir) / rel).is_file() for rel in REAL_SOURCES))
        changed = None if stale else _changed_source(info, source_dir)
        if changed:
            print(f"sectune: {changed} since {out_dir} was built from it; building its windows again", file=sys.stderr)
        if not stale and not changed:
            return info
    return build_auth_folder(out_dir, source_dir, seed=seed, min_lines=min_lines, max_lines=max_lines, max_windows=max_windows,
                             generated_lines=generated_lines, fresh_names=fresh_names)


def _changed_source(info: dict, source_dir) -> str | None:
    """What changed in the real logs a finished build was cut from (a file edited, added or gone), or None: the cache is
    named by the source folder, so a user's log grown by a week, or a newer loghub release, was never read again
    (an audit, session 38). A file of the same size and modification time is taken as unchanged; else its sha256 decides."""
    if info.get("source") != "real":
        return None
    root = Path(source_dir) if source_dir is not None else shared_data_dir()
    recorded = {rel: f for f in info.get("source_files") or [] for rel in REAL_SOURCES if str(f.get("path", "")).endswith(rel)}
    for rel in REAL_SOURCES:
        path = root / rel
        if not path.is_file():
            if rel in recorded:
                return f"{path} is gone"
            continue
        rec = recorded.get(rel)
        if rec is None:
            return f"{path} is new"
        try:
            st = path.stat()
            if (rec.get("size"), rec.get("mtime_ns")) == (st.st_size, st.st_mtime_ns):
                continue
            if _sha256(path) != rec.get("sha256"):
                return f"{path} changed"
        except OSError:
            return None  # unreadable: the build says so
    return None


# --------------------------------------------------------------------------------- loader
@dataclass(frozen=True)
class AuthSample:
    """One window: its id (``X_Y``), class folder, raw log text and parsed analysis."""

    id: str
    label: str
    log_text: str
    analysis: dict
    txt_path: Path
    json_path: Path


_TXT_NAME = re.compile(r"^auth_data_(?P<x>\d+)_(?P<y>\d+)\.txt$")


def load_auth_folder(path: str | os.PathLike, max_samples: int | None = None, schema_path: str | os.PathLike | None = None) -> list[AuthSample]:
    """Read and validate a seed-000 folder; every problem raises DataError naming the file."""
    root = Path(path)
    check_count(max_samples, "dataset.max_samples", f"windows, or null for every window of {root}", DataError)
    if not root.exists():
        raise DataError(f"{root}: auth_logs folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: auth_logs path is not a folder")
    data_dir, bin_dir = root / "auth_data", root / "Auth_bin"
    for d in (data_dir, bin_dir):
        if not d.is_dir():
            raise DataError(f"{d}: missing; an auth_logs folder needs auth_data/<class>/*.txt and Auth_bin/*.json")
    found = sorted(d.name for d in data_dir.iterdir() if d.is_dir())
    unknown = [name for name in found if name not in CLASSES and any((data_dir / name).rglob("*.txt"))]
    if unknown:  # a misspelt class folder would otherwise become a class of its own
        raise DataError(f"{data_dir / unknown[0]}: not a class folder; auth_data/ holds one folder per class, named "
                        f"{', '.join(CLASSES)} (found: {', '.join(found)})")
    odd_case = next((p for p in data_dir.rglob("*") if p.suffix.lower() == ".txt" and p.suffix != ".txt"), None)
    if odd_case is not None:  # rglob("*.txt") left it out without a word
        raise DataError(f"{odd_case}: name must be auth_data_X_Y.txt, with a lower-case .txt")
    entries = []
    for txt in data_dir.rglob("*.txt"):
        rel = txt.relative_to(data_dir)
        if len(rel.parts) != 2:
            raise DataError(f"{txt}: log files must sit in auth_data/<class>/, one folder per class ({', '.join(CLASSES)})")
        m = _TXT_NAME.match(txt.name)
        if not m:
            raise DataError(f"{txt}: name must be auth_data_X_Y.txt")
        entries.append((int(m["x"]), int(m["y"]), rel.parts[0], txt))
    if not entries:
        raise DataError(f"{data_dir}: no auth_data_X_Y.txt files under auth_data/<class>/")
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    for a, b in zip(entries, entries[1:]):  # two class folders' windows would share one Auth_bin analysis (and id)
        if a[:2] == b[:2]:
            raise DataError(f"{a[3]} and {b[3]}: two windows numbered {a[0]}_{a[1]} (one analysis file, "
                            f"{bin_dir / f'auth_text_{a[0]}_{a[1]}.json'}, cannot describe both); renumber one")
    if max_samples is not None:
        entries = sorted(_stratified(entries, lambda e: e[2], max_samples), key=lambda e: (e[0], e[1], e[2]))
    validator = _validator(str(schema_path) if schema_path is not None else None)
    samples = []
    for x, y, label, txt in entries:
        js = bin_dir / f"auth_text_{x}_{y}.json"
        if not js.is_file():
            raise DataError(f"{txt}: has no analysis file {js}")
        try:
            log_text = txt.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows tools write one) is not data
            raw = js.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{txt} / {js}: cannot read as UTF-8 text ({e})") from e
        if not log_text.strip():
            raise DataError(f"{txt}: empty log file")
        try:
            analysis = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{js}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from e
        except (ValueError, RecursionError) as e:  # an integer past Python's 4,300-digit limit; nesting past the recursion limit
            raise DataError(f"{js}: not an analysis ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
        errors = _schema_errors(analysis, validator)
        if errors:
            raise DataError(f"{js}: does not match the schema at {errors[0]}")
        if why := lone_surrogate(analysis):
            raise DataError(f"{js}: {why}")
        samples.append(AuthSample(f"{x}_{y}", label, log_text.rstrip("\n"), analysis, txt, js))
    odd = [s for s in samples if s.analysis.get("verdict") != s.label]
    if odd:  # the folder is the window's class (splits, per-class counts); the analysis is what SFT learns to write
        print(f"sectune: warning: {root}: {len(odd)} window(s) sit in a class folder their analysis's verdict disagrees with "
              f"(e.g. {odd[0].txt_path} in {odd[0].label}/, verdict {odd[0].analysis.get('verdict')!r}): the splits follow the "
              "folder, training and scoring follow the analysis", file=sys.stderr)
    return samples
