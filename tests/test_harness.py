"""The tests' own way of running the CLI (conftest.cli): a run forked from the per-worker server (tests/_zygote.py)
behaves as a plain ``python -m sectune`` subprocess does: same exit code, same output, its own process, killed on
a timeout."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from conftest import _Zygote, cli
from sectune.paths import PROJECT_ROOT


def plain(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sectune", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def zygote():
    z = _Zygote.get()
    if z is None or os.environ.get("SECTUNE_TEST_SUBPROCESS") == "1":
        pytest.skip("the fork server is off (SECTUNE_TEST_SUBPROCESS=1) or could not start: every run is a plain subprocess")
    return z


def test_forked_runs_match_plain_subprocesses(zygote, tmp_path):
    for args in (["--cfg", "job", "stage=plan", "logger=none"], ["logger=none", "train.max_stepz=3"]):
        forked, ref = cli(args), plain(args)
        assert forked.returncode == ref.returncode, (args, forked.stderr[-800:], ref.stderr[-800:])
        assert forked.stdout == ref.stdout, args
        assert forked.stderr.strip().splitlines()[-1:] == ref.stderr.strip().splitlines()[-1:], args
    assert "max_stepz" in forked.stderr and forked.returncode != 0  # the typo names the key, as from a shell


def test_a_forked_run_is_its_own_process_and_a_timeout_kills_it(zygote, tmp_path):
    out = cli(["--cfg", "job", "logger=none"], cwd=tmp_path)  # its own cwd: hydra resolves from there
    assert out.returncode == 0 and "stage:" in out.stdout
    with pytest.raises(subprocess.TimeoutExpired):
        cli(["logger=none", "train.max_steps=100000", "dataset.max_samples=24", f"hydra.run.dir={tmp_path / 'long'}"], timeout=3)
    # the server is still serving, and the killed run left no child behind
    again = cli(["--cfg", "job", "logger=none"])
    assert again.returncode == 0
    children = subprocess.run(["ps", "--ppid", str(zygote.proc.pid), "-o", "pid="], capture_output=True, text=True).stdout.split()
    assert children == []


def test_a_worker_that_imported_flower_still_forks_its_runs(zygote):
    """Flower's import sets GRPC_VERBOSITY=error in this process when absent: the server (started before, or after, that
    import) must serve either environment, or every later run of the worker is a plain subprocess (~10 s of imports each)."""
    pytest.importorskip("flwr")
    importlib.import_module("flwr.supercore.grpc")  # sets GRPC_VERBOSITY when absent

    if os.environ["GRPC_VERBOSITY"] != "error":
        pytest.skip(f"GRPC_VERBOSITY={os.environ['GRPC_VERBOSITY']} set outside the tests")
    without = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    assert zygote.serves(without) == zygote.serves(dict(os.environ))
    assert zygote.serves(dict(os.environ))
