"""A Hydra multirun's job dirs as :mod:`sectune.report` reads them: each job's overrides and result (a crash or a
garbled file becomes a failed status saying which), the jobs its ``multirun.yaml`` lists, and its sweep objective."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

RESULT_FILE = "result.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
NO_RESULT = "no result.json (job crashed before the runner finished)"
STILL_RUNNING = "result.json still says running (job killed, or still in progress)"
BASE_COLUMNS = ("job", "status", "error")
FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
HYDRA_FLOATS = ("inf", "+inf", "-inf", "nan")


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Hydra's numbered job dirs, in numeric (not lexical) order: 0, 1, ..., 10."""
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


NOT_STARTED = "not started"
EARLIER_SWEEP = "earlier sweep"
RUNNING = "running"
#: statuses of rows that are not this sweep's results (yet): listed after the others, never ranked
NOT_RUN = (NOT_STARTED, EARLIER_SWEEP, RUNNING)
LIVE = "still running: a live sectune process holds its run dir"


def lock_held(job: Path) -> bool:
    """Whether a live process holds ``job``'s run-dir lock (sectune.run_guard's): a job still training."""
    import fcntl

    lock = job / ".sectune.lock"
    if not lock.is_file():
        return False
    try:
        with open(lock, "r") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return True
    return False


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Each job's overrides as the sweep's ``multirun.yaml`` (written by the command that made the dir last) expands
    them with Hydra's basic sweeper; None for another sweeper (Optuna: its trials are drawn) or an unreadable file."""
    try:
        conf = yaml.safe_load((sweep_dir / "multirun.yaml").read_text(encoding="utf-8")) or {}
        hydra = conf["hydra"]
        if not str(hydra["sweeper"]["_target_"]).endswith("BasicSweeper"):
            return None
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = hydra["sweeper"].get("params") or {}
        given = [f"{k}={v}" for k, v in params.items()] + list(hydra["overrides"]["task"])
        return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(given), None)[0]
    except Exception:  # noqa: BLE001 - no multirun.yaml, or one Hydra cannot read back: the dirs as they are
        return None


def parse_value(text: str) -> Any:
    """An override value as Hydra means it: YAML scalars plus ``1e-4`` (YAML 1.1 reads a string)."""
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and (FLOAT_RE.fullmatch(value.strip()) or value.strip().lower() in HYDRA_FLOATS):
        return float(value)
    if isinstance(value, (list, dict)):
        return text  # a list override stays one cell, hashable and printable
    return value


def read_overrides(job: Path) -> dict[str, Any]:
    """``{key: value}`` from ``.hydra/overrides.yaml``; ``+``/``++`` prefixes dropped."""
    out: dict[str, Any] = {}
    for item in raw_overrides(job):
        key, sep, raw = item.partition("=")
        out[key.lstrip("+")] = parse_value(raw) if sep else None
    return out


def raw_overrides(job: Path) -> list[str]:
    """The job's ``.hydra/overrides.yaml`` as Hydra wrote it (``key=value`` strings); [] if missing or unreadable."""
    try:
        items = yaml.safe_load((job / OVERRIDES_FILE).read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError):
        return []
    return [str(i) for i in items] if isinstance(items, list) else []


def read_result(job: Path) -> dict[str, Any]:
    """``status``, ``metrics``, ``error`` of one job; problems become a failed status."""
    path = job / RESULT_FILE
    if not path.is_file():
        return {"status": "failed", "metrics": {}, "error": NO_RESULT}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    except (OSError, ValueError) as e:
        return {"status": "failed", "metrics": {}, "error": f"unreadable {path}: {e}"}
    status = str(data.get("status", "failed"))
    error = data.get("error") or ""
    if status == "running":  # a job still training (a report read mid-sweep called it failed: session 36), else killed
        status, error = (RUNNING, LIVE) if lock_held(job) else ("failed", STILL_RUNNING)
    metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
    clean = {}
    for k, v in metrics.items():
        if isinstance(v, str) and math.isnan(_to_float(v)) and v.lower() != "nan":
            clean[str(k)] = v  # a label beside the numbers (heldout_split: validation), not a number gone missing
        else:
            clean[str(k)] = v if isinstance(v, (int, float)) and not isinstance(v, bool) else _to_float(v)
    env = data.get("environment")
    return {"status": status, "metrics": clean, "error": str(error), "environment": env if isinstance(env, dict) else None}


def _to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def sweep_objective(jobs: list[Path]) -> tuple[str | None, str]:
    """(sweep.objective, sweep.direction) from the first job's saved config, or (None, "minimize")."""
    for job in jobs:
        try:
            sweep = (yaml.safe_load((job / ".hydra" / "config.yaml").read_text(encoding="utf-8")) or {}).get("sweep") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        return sweep.get("objective"), str(sweep.get("direction") or "minimize")
    return None, "minimize"
