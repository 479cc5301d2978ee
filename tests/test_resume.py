"""An interrupted run resumed with train.resume=auto continues exactly where it stopped."""

from __future__ import annotations

import json

from conftest import FAST, sectune

# dropout on, so resume must restore RNG state as well as optimizer and scheduler
COMMON = [*FAST, "train.max_steps=12", "train.save_steps=4", "dataset.max_samples=48", "lora.dropout=0.1"]


def _losses(run_dir):
    return dict(json.loads((run_dir / "train_history.json").read_text())["train"])


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    straight = sectune(COMMON, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]

    broken_dir = tmp_path / "broken"
    broken = sectune([*COMMON, "debug.fail_at_step=6"], broken_dir)
    assert broken.returncode != 0
    assert broken.result["status"] == "failed" and "fail_at_step" in broken.result["error"]
    assert not (broken_dir / "adapter").exists(), "a failed run must not leave an artifact that looks complete"
    assert (broken_dir / "checkpoints" / "checkpoint-4").is_dir()
    assert broken.result["metrics"].get("eval_loss_start") is not None  # what was measured is kept

    resumed = sectune([*COMMON, "train.resume=auto"], broken_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.result["status"] == "succeeded"
    a, b = _losses(tmp_path / "straight"), _losses(broken_dir)
    assert sorted(b) == sorted(a) == list(range(1, 13))
    for step in range(5, 13):  # every step after the checkpoint at 4
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    assert abs(straight.result["metrics"]["eval_loss"] - resumed.result["metrics"]["eval_loss"]) < 1e-4


def test_resume_from_explicit_bad_dir_is_a_clear_error(tmp_path):
    run = sectune([*FAST, "train.max_steps=2", "dataset.max_samples=12", f"train.resume={tmp_path}"], tmp_path / "r")
    assert run.returncode == 2
    assert "train.resume" in run.stderr and "not a complete Trainer checkpoint" in run.stderr
