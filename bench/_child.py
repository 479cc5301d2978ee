"""The benches' parent/child protocol: each measured side runs in a fresh interpreter (its own peak RSS,
no caches warmed by the other side) and prints its result as one ``BENCH_RESULT {json}`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "BENCH_RESULT "


def emit(result: dict) -> None:
    """The child's last word: its measurements, for :func:`run_child` to read."""
    print(PREFIX + json.dumps(result), flush=True)


def run_child(script: str, argv: list[str], label: str, threads: int | None = None) -> dict:
    """Run ``script --child ARGV`` in a fresh interpreter and return the dict it emitted."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    p = subprocess.run([sys.executable, script, "--child", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-8000:])
        raise SystemExit(f"{label} run failed (rc {p.returncode})")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX) :])
    raise SystemExit(f"{label}: no result line\n{p.stdout[-2000:]}")
