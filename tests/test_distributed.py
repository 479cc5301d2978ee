"""torchrun: one shared run dir (robust to stale notes), rank-0-only writes, same result as 1 process."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sectune import distributed
from sectune.paths import PROJECT_ROOT

#: same global batch: 2 ranks x 2 rows vs 1 process x 4 rows; eval one row per batch so the
#: per-batch eval means are the same rows either way
#: LoRA dropout off: each rank draws its own dropout masks, one process draws others.
#: Two steps: the 16 examples pack into 11 rows, so step 3 is a partial batch (3 rows), which accelerate
#: evens out across ranks by repeating rows (as DistributedSampler does).
COMMON = ["logger=wandb", "generation.preview_samples=0", "train.max_steps=2", "dataset.max_samples=16",
          "train.eval_batch_size=1", "train.device=cpu", "lora.dropout=0"]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(PROJECT_ROOT)}
BIN = Path(sys.executable).parent
LAUNCHERS = {
    "torchrun": [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"],
    # accelerate's --cpu flag means one process; --multi_gpu on a machine without GPUs is DDP over gloo
    "accelerate": [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
                   "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0"],
}


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    single_dir = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run([sys.executable, "-m", "sectune", *COMMON, "train.batch_size=4", f"hydra.run.dir={single_dir}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return single_dir


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_gloo_processes_match_single_process(tmp_path, single_process_run, launcher):
    ddp_cwd = tmp_path / "ddp"
    ddp_cwd.mkdir()
    # no hydra.run.dir: the ranks must agree on outputs/DATE/TIME themselves
    proc = subprocess.run([*LAUNCHERS[launcher], "-m", "sectune", *COMMON, "train.batch_size=2"],
                          cwd=ddp_cwd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dirs = [p.parent for p in (ddp_cwd / "outputs").glob("*/*/.hydra")]
    assert len(run_dirs) == 1, run_dirs
    ddp_dir = run_dirs[0]
    assert len(list((ddp_cwd / "outputs").rglob("result.json"))) == 1
    assert len(list((ddp_cwd / "outputs").rglob("adapter_config.json"))) == 1
    assert len(list(ddp_dir.glob("wandb/offline-run-*"))) == 1
    assert proc.stdout.count("sectune: done ·") == 1, proc.stdout[-3000:]  # rank 0 speaks; each rank printed it before
    single_dir = single_process_run
    ddp = json.loads((ddp_dir / "result.json").read_text())["metrics"]
    one = json.loads((single_dir / "result.json").read_text())["metrics"]
    assert ddp["train_steps"] == one["train_steps"] == 2
    assert ddp["eval_loss_start"] == pytest.approx(one["eval_loss_start"], rel=1e-4)  # same weights, same rows
    # Step by step: the same global batches (length-grouped by the global batch) and synced
    # gradients. Without the all-reduce each rank's gradient is its half's: ~4% off at step 1.
    h_ddp = json.loads((ddp_dir / "train_history.json").read_text())
    h_one = json.loads((single_dir / "train_history.json").read_text())
    assert [s for s, _ in h_ddp["grad_norm"]] == [s for s, _ in h_one["grad_norm"]] == [1, 2]
    for (_, a), (_, b) in zip(h_ddp["grad_norm"], h_one["grad_norm"]):
        assert a == pytest.approx(b, rel=5e-3)
    for (_, a), (_, b) in zip(h_ddp["train"], h_one["train"]):
        assert a == pytest.approx(b, rel=2e-3)
    assert ddp["eval_loss"] == pytest.approx(one["eval_loss"], rel=2e-3)


def _env(monkeypatch, rank, **extra):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for k, v in extra.items():
        monkeypatch.setenv(k, v)


def test_file_fallback_ignores_a_stale_note(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setattr(distributed.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _env(monkeypatch, 1, MASTER_PORT="29999")
    parent, started = distributed._launcher_identity()
    note = tmp_path / f"sectune_run_dir_127.0.0.1_29999__{parent}"
    note.write_text("/stale/run/dir")
    old = started - 3600
    os.utime(note, (old, old))  # written by an earlier launch
    with pytest.raises(SystemExit, match="waited"):
        distributed.share_run_dir_across_ranks(timeout_s=0.5, argv=["sectune"])
    _env(monkeypatch, 0, MASTER_PORT="29999")
    argv0 = ["sectune"]
    chosen = distributed.share_run_dir_across_ranks(argv=argv0)
    _env(monkeypatch, 1, MASTER_PORT="29999")
    argv1 = ["sectune"]
    assert distributed.share_run_dir_across_ranks(timeout_s=5, argv=argv1) == chosen != "/stale/run/dir"
    assert argv0 == argv1 == ["sectune", f"hydra.run.dir={chosen}"]


def test_agent_store_shares_one_run_dir(monkeypatch, tmp_path):
    from datetime import timedelta

    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    monkeypatch.chdir(tmp_path)
    _env(monkeypatch, 1, MASTER_PORT=str(server.port), TORCHELASTIC_USE_AGENT_STORE="True")
    _env(monkeypatch, 0, MASTER_PORT=str(server.port), TORCHELASTIC_USE_AGENT_STORE="True")
    a = distributed.share_run_dir_across_ranks(argv=["sectune"])
    time.sleep(1.1)  # a later second: rank 1 must still get rank 0's dir, not its own ${now:}
    _env(monkeypatch, 1, MASTER_PORT=str(server.port), TORCHELASTIC_USE_AGENT_STORE="True")
    assert distributed.share_run_dir_across_ranks(argv=["sectune"]) == a
    # a -m sweep's ranks share its sweep dir the same way (each rank's own ${now:} split one sweep into two dirs)
    _env(monkeypatch, 0, MASTER_PORT=str(server.port), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="1")
    argv0 = ["sectune", "-m", "lora.r=4"]
    sweep = distributed.share_run_dir_across_ranks(argv=argv0)
    time.sleep(1.1)
    _env(monkeypatch, 1, MASTER_PORT=str(server.port), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="1")
    argv1 = ["sectune", "-m", "lora.r=4"]
    assert distributed.share_run_dir_across_ranks(argv=argv1) == sweep and Path(sweep).parts[-3] == "multirun"
    assert argv0 == argv1 == ["sectune", "-m", "lora.r=4", f"hydra.sweep.dir={sweep}"]


def test_single_process_and_explicit_dirs_are_left_alone(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.share_run_dir_across_ranks(argv=["sectune"]) is None
    assert distributed.share_run_dir_across_ranks(argv=["sectune", "-m", "lora.r=4,8"]) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.share_run_dir_across_ranks(argv=["sectune", "hydra.run.dir=x"]) is None
    assert distributed.share_run_dir_across_ranks(argv=["sectune", "-m", "lora.r=4,8", "hydra.sweep.dir=y"]) is None
