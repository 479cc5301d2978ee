"""A Mac (Apple Silicon: no CUDA, torch's mps backend, Python from Xcode's tools), faked on Linux: nothing here ran on a Mac."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import compose
from sectune.errors import ConfigError
from sectune.paths import PROJECT_ROOT


@pytest.fixture
def mac(monkeypatch):
    """sys.platform darwin, no CUDA, Apple's GPU visible to torch and to transformers."""
    import sys

    import torch
    import transformers.training_args as ta

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(ta, "is_torch_mps_available", lambda *a, **k: True)


def test_auto_on_a_mac_trains_where_sectune_places_tensors(mac, tmp_path):
    """train.device=auto on a Mac: sectune's own placement (to_run_device, generation, scoring) is the CPU, and so is
    Trainer's: it picks mps whenever use_cpu is off, so training_kwargs must turn it on (else the model trains on mps
    while sectune's tensors stay on the CPU)."""
    import torch
    from transformers import TrainingArguments

    from sectune.models import modeling
    from sectune.training import engine

    cfg = compose(["train.device=auto"])
    assert modeling.device_for(cfg) == "cpu"
    kwargs = engine.training_kwargs(cfg, tmp_path, has_eval=False)
    assert TrainingArguments(**kwargs).device == torch.device("cpu")
    assert TrainingArguments(**{**kwargs, "use_cpu": False, "bf16": False}).device.type == "mps"  # what the check above guards against


@pytest.mark.parametrize("device", ["mps", "mps:0"])
def test_train_device_mps_is_refused_by_name_with_what_a_mac_runs(device):
    from sectune.config_checks import check_values
    from sectune.models import modeling

    for check in (check_values, modeling.device_for):
        with pytest.raises(ConfigError) as e:
            check(compose([f"train.device={device}"]))
        msg = str(e.value)
        assert f"train.device={device}" in msg.replace("'", "")
        assert "Apple's GPU (mps) is not supported" in msg and "on a Mac train.device=auto or cpu trains on the CPU" in msg


def test_doctor_on_a_mac_gives_no_cuda_install_advice_and_names_the_unused_gpu(mac):
    from sectune.stages import doctor

    [cuda] = doctor.check_cuda(compose(["stage=doctor", "train.device=cuda"]), predicted_peak=None)
    assert cuda.status == "missing" and "download.pytorch.org" not in cuda.fix and "macOS has no CUDA" in cuda.fix
    [auto] = doctor.check_cuda(compose(["stage=doctor"]), predicted_peak=None)
    assert "training runs on CPU" in auto.detail and "Apple's GPU (mps) is present and not used" in auto.detail


def _fake_python(folder: Path, version: str) -> Path:
    """A ``python3`` answering the Makefile's version questions as ``version`` would, and logging any other call."""
    major, minor, _ = (int(x) for x in version.split("."))
    py = folder / f"python{version}"
    py.write_text("#!/bin/sh\n"
                  f'case "$*" in *version_info*) exit {int((major, minor) < (3, 10))};; *python_version*) echo {version};; '
                  f'*) echo "$*" >> "{folder}/calls"; exit 1;; esac\n')
    py.chmod(0o755)
    return py


def test_make_setup_with_macos_python_3_9_says_so_before_making_a_venv(tmp_path):
    """macOS's own python3 (Xcode's command-line tools) is 3.9: pip then said only that no torch==2.13.0 exists."""
    py = _fake_python(tmp_path, "3.9.6")
    r = subprocess.run(["make", "-C", str(PROJECT_ROOT), "setup", f"PY={py}", f"VENV={tmp_path / 'venv'}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"{py} is Python 3.9.6; sectune needs >= 3.10: e.g. make setup PY=python3.11" in r.stderr
    assert not (tmp_path / "calls").exists()  # no venv was made with it
    ok = _fake_python(tmp_path, "3.11.9")
    subprocess.run(["make", "-C", str(PROJECT_ROOT), "setup", f"PY={ok}", f"VENV={tmp_path / 'venv'}"],
                   capture_output=True, text=True, timeout=60)
    assert (tmp_path / "calls").read_text().startswith(f"-m venv {tmp_path / 'venv'}")


def test_run_records_name_a_macs_chip_not_just_arm(mac, monkeypatch):
    """No /proc/cpuinfo on macOS, and platform.processor() there is "arm": the chip's name comes from sysctl."""
    import subprocess

    from sectune import run_records

    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(FileNotFoundError(self))
                        if str(self) == "/proc/cpuinfo" else real_read(self, *a, **k))
    monkeypatch.setattr("platform.processor", lambda: "arm")
    asked = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: asked.append(cmd) or subprocess.CompletedProcess(cmd, 0, "Apple M2 Pro\n", ""))
    assert run_records.cpu_model() == "Apple M2 Pro"
    assert asked == [["sysctl", "-n", "machdep.cpu.brand_string"]]
