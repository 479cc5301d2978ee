"""Shared test helpers: compose configs in-process, run the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sectune.paths import PROJECT_ROOT, shared_data_dir

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub: fail fast
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REAL_AUTH = shared_data_dir() / "loghub_openssh_2k" / "OpenSSH_2k.log"

requires_real_data = pytest.mark.skipif(
    not REAL_AUTH.exists(), reason=f"real public data not found at {shared_data_dir()} (fresh clone without ../shared)"
)

#: small, fast settings for end-to-end runs on the tiny model
FAST = ["logger=none", "generation.preview_samples=0", "train.batch_size=4"]


def compose(overrides: list[str] | None = None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sectune import config

    config.register()
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides or [])


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, run_dir: Path):
        self.proc, self.run_dir = proc, run_dir
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr

    @property
    def result(self) -> dict:
        return json.loads((self.run_dir / "result.json").read_text())


def sectune(args: list[str], run_dir: Path | None = None, timeout: int = 600, env: dict | None = None) -> Run:
    """``python -m sectune ARGS`` in a subprocess, as a user would run it."""
    cmd = [sys.executable, "-m", "sectune", *args]
    if run_dir is not None:
        cmd.append(f"hydra.run.dir={run_dir}")
    proc = subprocess.run(
        cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    return Run(proc, run_dir)


@pytest.fixture
def run_sectune():
    return sectune
