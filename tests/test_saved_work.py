"""Nothing already saved is lost or corrupted: reruns, kills and damaged files around a run dir (session 23's audit)."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import FAST, compose, sectune

ARGS = [*FAST, "train.max_steps=4", "train.save_steps=2", "dataset.max_samples=20", "train.save_total_limit=null"]


def _lrs(ckpt):
    return [r["learning_rate"] for r in json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if "learning_rate" in r]


def test_a_failed_rerun_with_other_settings_keeps_the_run_and_resume_continues_only_its_own_attempt(tmp_path):
    """A fresh rerun rewrote trained_with.json beside the earlier attempt's checkpoint-N, so train.resume=auto then
    continued lr-0.01 checkpoints under an lr-0.003 config (exit 0); and the rerun's partial loss history replaced the
    succeeded run's, so a failure left that run unusable though its adapter was untouched."""
    run_dir = tmp_path / "r"
    first = sectune([*ARGS, "train.learning_rate=0.01"], run_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    earlier = first.result  # (Run.result reads result.json when asked)
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    # every weight file (adapter, checkpoints) has the modes of the run's other files: safetensors 0.8 saves owner-only
    weights = {str(p.relative_to(run_dir)): oct(p.stat().st_mode & 0o777) for p in run_dir.rglob("*.safetensors")}
    assert len(weights) >= 3 and set(weights.values()) == {oct((run_dir / "result.json").stat().st_mode & 0o777)}, weights
    history = (run_dir / "train_history.json").read_text()

    failed = sectune([*ARGS, "train.learning_rate=0.003", "debug.fail_at_step=3"], run_dir)
    assert failed.returncode != 0
    ckpts = run_dir / "checkpoints"
    assert "earlier attempt's 2 checkpoint(s) moved to" in failed.stderr
    assert sorted(p.name for p in (ckpts / "earlier").iterdir()) == ["checkpoint-2", "checkpoint-4", "trained_with.json"]
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2"]  # this attempt's
    # the earlier run is whole again: its result, its history, its config; the attempt's beside it
    assert json.loads((run_dir / "result.json").read_text()) == earlier
    assert (run_dir / "train_history.json").read_text() == history
    assert json.loads((run_dir / "train_history.failed.json").read_text())["train"]
    assert json.loads((run_dir / "result.failed.json").read_text())["status"] == "failed"
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter

    resumed = sectune([*ARGS, "train.learning_rate=0.003", "train.resume=auto"], run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {ckpts / 'checkpoint-2'}" in resumed.stdout
    assert max(_lrs(ckpts / "checkpoint-4")) <= 0.003  # never a step of the lr-0.01 run
    assert resumed.result["status"] == "succeeded"
    assert json.loads((run_dir / "result.previous.json").read_text()) == earlier  # another config's run, kept beside


def test_a_rerun_after_a_killed_one_still_puts_the_succeeded_run_back(tmp_path):
    """SIGKILL leaves result.json "running"; the succeeded run it was replacing is in result.previous.json (now kept for
    a rerun of the same config too), and the next command that fails before replacing the weights restores it."""
    run_dir = tmp_path / "r"
    first = sectune([*ARGS, "train.save_steps=null"], run_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    earlier = first.result
    time.sleep(1.1)  # result.json's times are in whole seconds
    killed = {**earlier, "status": "running", "metrics": {}, "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")}
    (run_dir / "result.previous.json").write_text(json.dumps(earlier))  # what the killed command had written
    (run_dir / "result.json").write_text(json.dumps(killed))
    again = sectune([*ARGS, "train.save_steps=null", "debug.fail_at_step=1"], run_dir)
    assert again.returncode != 0
    assert "was killed while it replaced the succeeded run" in again.stderr
    assert json.loads((run_dir / "result.json").read_text()) == earlier
    # had the killed command replaced the adapter already, the earlier result would name weights that are not its own
    (run_dir / "result.previous.json").write_text(json.dumps(earlier))
    (run_dir / "result.json").write_text(json.dumps(killed))
    os.utime(run_dir / "adapter" / "adapter_model.safetensors")  # written after the killed command started
    again = sectune([*ARGS, "train.save_steps=null", "debug.fail_at_step=1"], run_dir)
    assert again.returncode != 0 and json.loads((run_dir / "result.json").read_text())["status"] == "failed"


def test_starting_from_a_run_that_did_not_succeed_is_refused(tmp_path):
    """dpo.init_from took an SFT run whose weights were NaN (its result: failed, "nothing downstream uses this run") and
    reported NaN margins as a success."""
    from sectune.errors import ConfigError
    from sectune.runner import init_source

    run_dir = tmp_path / "sft"
    (run_dir / "adapter").mkdir(parents=True)
    res = {"stage": "sft", "status": "failed", "error": "eval_loss is nan: the trained weights are broken\nmore",
           "artifacts": {"adapter": "adapter"}}
    (run_dir / "result.json").write_text(json.dumps(res))
    with pytest.raises(ConfigError, match=r"dpo.init_from=.*result.json says status 'failed': eval_loss is nan: the trained "
                                          r"weights are broken; start from a run that succeeded$"):
        init_source(str(run_dir), "dpo.init_from")
    (run_dir / "result.json").write_text(json.dumps({**res, "status": "running", "error": None}))
    (run_dir / "result.previous.json").write_text(json.dumps({**res, "status": "succeeded"}))
    with pytest.raises(ConfigError, match=r"status 'running'; start from a run that succeeded \(result.previous.json there"):
        init_source(str(run_dir), "rl.init_from")


def test_replacing_a_saved_folder_deletes_the_old_one_only_once_the_new_one_is_in(tmp_path, monkeypatch):
    """replace_dir deleted the old adapter first: a kill (or a failed delete) in between left half of it and the new one
    stranded under a temporary name that nothing picks up."""
    import shutil

    from sectune import run_guard

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "w.safetensors").write_text("old")
    stale = [tmp_path / ".adapter.tmp99999", tmp_path / ".adapter.old-abc"]
    for p in stale:
        p.mkdir()
    new = tmp_path / f".adapter.tmp{os.getpid()}"
    new.mkdir()
    (new / "w.safetensors").write_text("new")
    deleted = []
    monkeypatch.setattr(shutil, "rmtree", lambda p, ignore_errors=False: deleted.append(
        (Path(p).name, sorted(q.name for q in Path(p).rglob("*")), (out / "w.safetensors").read_text() if out.exists() else None)))
    run_guard.replace_dir(new, out)
    assert (out / "w.safetensors").read_text() == "new" and not new.exists()
    # the stale folders of killed saves first; the old adapter last, after the new one was in place
    assert {d[0] for d in deleted[:2]} == {p.name for p in stale}
    name, inside, at_out = deleted[-1]
    assert name.startswith(".adapter.old-") and "w.safetensors" in inside and at_out == "new"
    link_target = tmp_path / "elsewhere"
    link_target.mkdir()
    (link_target / "keep").write_text("x")
    out2 = tmp_path / "linked"
    out2.symlink_to(link_target)
    tmp2 = tmp_path / ".linked.tmp1"
    tmp2.mkdir()
    run_guard.replace_dir(tmp2, out2)
    assert out2.is_dir() and not out2.is_symlink() and (link_target / "keep").read_text() == "x"


def test_a_checkpoint_cut_short_before_rl_saved_its_held_out_scores_is_skipped(tmp_path, capsys):
    """RL adds heldout_best.* to a checkpoint after Trainer's trainer_state.json: a kill in between left a checkpoint that
    looked complete, and the resume forgot the kept step (blaming "an older sectune")."""
    import torch
    from safetensors.torch import save_file

    from sectune.training.checkpoints import latest_checkpoint, unusable

    for step in (2, 4):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        save_file({"w": torch.ones(4)}, str(d / "adapter_model.safetensors"))
        torch.save({"s": torch.ones(2)}, d / "optimizer.pt")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-2" / "heldout_best.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"  # a stage that needs nothing more
    assert latest_checkpoint(tmp_path, needs=("heldout_best.json",)) == tmp_path / "checkpoint-2"
    assert "skipping checkpoint-4: heldout_best.json is missing (the save was cut short)" in capsys.readouterr().err
    assert unusable(tmp_path / "checkpoint-2", ("heldout_best.json",)) is None


def test_a_read_only_run_dir_is_one_line_not_a_logging_traceback():
    from sectune.cli import _logging_os_error

    err = PermissionError(13, "Permission denied", "/ro/cli.log")
    try:
        try:
            raise err
        except PermissionError as e:
            raise ValueError("Unable to configure handler 'file'") from e
    except ValueError as wrapped:
        assert _logging_os_error(wrapped) is err
    assert _logging_os_error(ValueError("something else")) is None


def test_a_run_dir_that_exists_but_refuses_writes_is_not_called_one_that_cannot_be_created(tmp_path, capsys):
    from sectune.cli import _run_dir_error

    with pytest.raises(SystemExit) as out:
        _run_dir_error(PermissionError(13, "Permission denied", str(tmp_path / "cli.log")), log_file=True)
    assert out.value.code == 2
    assert capsys.readouterr().err.strip() == (f"sectune: error: {tmp_path / 'cli.log'}: Permission denied: cannot write in the "
                                               "run dir (hydra.run.dir, or hydra.sweep.dir for -m)")


def test_an_adapter_whose_base_model_is_gone_or_damaged_is_not_put_on_other_weights(tmp_path):
    """An adapter recorded on an SFT's (or warm-up's) full weights fell back to the configured random model when those
    weights were missing; a truncated base gave an unnamed SafetensorError traceback in infer."""
    import torch
    from safetensors.torch import save_file

    from conftest import compose
    from sectune.errors import ConfigError
    from sectune.models import modeling
    from sectune.model_chain import usable as _usable

    run_dir = tmp_path / "rl"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    save_file({"w": torch.ones(4)}, str(run_dir / "adapter" / "adapter_model.safetensors"))
    res = {"stage": "rl", "status": "succeeded", "artifacts": {"adapter": "adapter", "base_model": "../sft/model"}}
    (run_dir / "result.json").write_text(json.dumps(res))
    why, _, _ = _usable("rl", run_dir)
    assert why == "its base model ../sft/model/config.json is missing"
    with pytest.raises(ConfigError, match=r"artifacts.base_model=../sft/model, is missing"):
        modeling.adapter_base(run_dir / "adapter", compose(["logger=none"]))
    base = tmp_path / "sft" / "model"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    save_file({"w": torch.ones(256)}, str(base / "model.safetensors"))
    assert _usable("rl", run_dir)[0] is None
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    why, _, _ = _usable("rl", run_dir)
    assert why.startswith("its base model ../sft/model/model.safetensors is damaged (")
    with pytest.raises(ConfigError, match=r"model.safetensors \(artifacts.base_model of .*\) is damaged"):
        modeling.adapter_base(run_dir / "adapter", compose(["logger=none"]))


def test_a_pipeline_step_with_an_unreadable_result_is_rerun_saying_why(tmp_path, capsys):
    from sectune.pipeline_record import already_done
    from sectune.stages.pipeline import Step

    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "result.json").write_text("garbage")
    assert already_done(Step("sft", tmp_path / "sft", None, [])) is None
    assert f"{tmp_path / 'sft' / 'result.json'} is not a readable result (damaged?); running the sft step again" in capsys.readouterr().err


def test_an_interrupt_says_what_a_rerun_continues_from(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sectune.runner import resume_hint

    assert resume_hint(tmp_path) == ""  # a stage without checkpoints (infer, evaluate)
    (tmp_path / "checkpoints").mkdir()
    assert "no checkpoint was saved (train.save_steps)" in resume_hint(tmp_path)
    d = tmp_path / "checkpoints" / "checkpoint-6"
    d.mkdir()
    save_file({"w": torch.ones(2)}, str(d / "model.safetensors"))
    torch.save({}, d / "optimizer.pt")
    (d / "trainer_state.json").write_text("{}")
    assert resume_hint(tmp_path) == "; the same command with train.resume=auto continues from checkpoint-6"


def test_a_runs_warnings_are_kept_in_its_result(tmp_path):
    """The "rows repeat a training row" and cleaning warnings were on the console only: an archived run that measured
    memory looked like one that did not."""
    import sys

    from sectune.run_guard import recorded_warnings

    before = sys.stdout, sys.stderr
    with recorded_warnings() as heard:
        print("sectune: warning: x.csv: 3 of 9 test rows repeat a training row's text exactly")
        print("sectune: note: written", end="")
        print("plain output\r progress 10%\r progress 20%\nsectune: warning: on stderr", file=sys.stderr)
        print(" in two parts")
        print("sectune: done")
        print("sectune: warning: on stderr", file=sys.stderr)  # the same split read again: recorded once
    assert (sys.stdout, sys.stderr) == before
    assert heard.lines == ["sectune: warning: x.csv: 3 of 9 test rows repeat a training row's text exactly",
                           "sectune: warning: on stderr", "sectune: note: written in two parts"]
    data = tmp_path / "t.csv"
    data.write_text("text,label\n" + "".join(f"row {i % 10},{'a' if i % 2 else 'b'}\n" for i in range(40)))
    run = sectune(["stage=classify", "dataset=text_label_csv", f"dataset.path={data}", "train.max_steps=1", *FAST], tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    assert any("repeat a training row's text exactly" in w for w in run.result["warnings"]), run.result.get("warnings")
    # every line the command printed is in the run dir's console.log, progress bars at their last state
    log = (tmp_path / "run" / "console.log").read_text()
    assert log.startswith("===== ") and "stage=classify" in log.splitlines()[0]
    assert "repeat a training row's text exactly" in log and "sectune: done" in log and "\r" not in log and "\x1b" not in log
    again = sectune(["stage=classify", "dataset=text_label_csv", f"dataset.path={data}", "train.max_steps=1", *FAST], tmp_path / "run")
    assert again.returncode == 0 and (tmp_path / "run" / "console.log").read_text().startswith(log)  # appended, not replaced
    assert (tmp_path / "run" / "console.log").read_text().count("===== ") == 2


def test_the_console_log_keeps_a_progress_bars_last_state_without_control_sequences(tmp_path):
    import sys

    from sectune.run_guard import recorded_warnings

    with recorded_warnings(tmp_path / "console.log"):
        print("  0%|  | 0/3\r 33%|# | 1/3\r100%|##| 3/3\x1b[A", file=sys.stderr)
        print("sectune: done", end="")
        print(" · 1s")
    lines = (tmp_path / "console.log").read_text().splitlines()
    assert lines[1:] == ["100%|##| 3/3", "sectune: done · 1s"]


def test_a_sectune_line_naming_hostile_text_reaches_the_terminal_escaped(tmp_path, capsys):
    """A warning quotes what an input held: stage=infer's "skipped sft: the run did not succeed (... <its error>)" quoted a
    failed run's error naming a log file an attacker called "ev\\x1b]0;PWNED\\x07..." and played the escapes on the
    terminal (and in console.log, which strips CSI sequences but not an OSC). Escaped now; a progress bar's own \\r is not
    sectune's line and passes."""
    import sys

    from sectune.run_guard import recorded_warnings

    evil = "ev\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\u202eil.log"
    with recorded_warnings(tmp_path / "console.log") as heard:
        print(f"sectune: warning: infer: skipped sft: the run did not succeed (status 'failed': {evil}: empty log file)")
        print(f"sectune: infer: {evil}: 2 windows\tbenign 2", file=sys.stderr)
        sys.stderr.write("\r 50%|#   | 2/4\n")
    out, err = capsys.readouterr()
    said = "ev\\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b[2J\\u202eil.log"
    assert out == f"sectune: warning: infer: skipped sft: the run did not succeed (status 'failed': {said}: empty log file)\n"
    assert err == f"sectune: infer: {said}: 2 windows\tbenign 2\n\r 50%|#   | 2/4\n"  # its own tab and newline kept
    log = (tmp_path / "console.log").read_text(encoding="utf-8")
    assert "\x1b" not in log and "\x07" not in log and "\u202e" not in log and said in log
    assert heard.lines == [out.strip()]


def test_a_sectune_line_after_a_progress_bars_last_state_starts_its_own_line(tmp_path, capsys):
    """An error printed while a progress bar held the line (no newline after its last redraw) was glued to the bar, on
    the console and in console.log, where a reader searching for "sectune: error:" at a line's start missed it."""
    import sys

    from sectune.run_guard import recorded_warnings

    with recorded_warnings(tmp_path / "console.log"):
        sys.stderr.write("\r 50%|#   | 2/4")
        print("sectune: error: boom", file=sys.stderr)
    assert capsys.readouterr().err.splitlines()[-1] == "sectune: error: boom"
    assert (tmp_path / "console.log").read_text().splitlines()[-2:] == [" 50%|#   | 2/4", "sectune: error: boom"]


def test_a_heuristic_reward_model_of_older_rules_is_not_a_finished_step():
    """After an upgrade (rules auth-rules-1 -> 3) a pipeline skipped its heuristic reward step as done and its rl step
    refused that step's spec ("rerun the reward stage"), then advised rerunning the same command: a loop only deleting
    reward/ by hand broke. The spec this sectune cannot use makes the step unfinished, so the rerun redoes it."""
    import tempfile

    from sectune.data.auth_rewards import heuristic_spec
    from sectune.run_guard import damaged_artifact

    with tempfile.TemporaryDirectory() as d:
        run = Path(d)
        (run / "reward_model").mkdir()
        result = {"status": "succeeded", "artifacts": {"reward_model": "reward_model"}}
        (run / "reward_model" / "heuristic_reward.json").write_text(json.dumps(heuristic_spec()))
        assert damaged_artifact(run, result) is None
        (run / "reward_model" / "heuristic_reward.json").write_text(json.dumps({**heuristic_spec(), "rules_version": "auth-rules-1"}))
        why = damaged_artifact(run, result)
        assert why is not None and why.startswith(f"artifacts.reward_model ({run / 'reward_model' / 'heuristic_reward.json'}) "
                                                  "cannot be used by this sectune: heuristic reward spec has rules_version='auth-rules-1'")


@pytest.mark.parametrize("key", ["model", "adapter", "reward_model", "base_model"])
def test_every_weight_artifact_missing_or_cut_short_keeps_a_run_from_being_reused(tmp_path, key):
    """damaged_artifact was tested through an adapter only: a stage=reward run whose reward_model folder was deleted or
    cut short must not stand for a finished run either (sweep.skip_done, a pipeline's skip check)."""
    from sectune.run_guard import damaged_artifact

    result = {"status": "succeeded", "artifacts": {key: "weights", "plots": "gone_plots"}}
    assert damaged_artifact(tmp_path, result) == f"artifacts.{key} ({tmp_path / 'weights'}) is missing"
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes((64).to_bytes(8, "little") + b'{"w": ')
    assert damaged_artifact(tmp_path, result).startswith(f"artifacts.{key} ({tmp_path / 'weights' / 'model.safetensors'}) is damaged")
    assert damaged_artifact(tmp_path, {"artifacts": {"plots": "gone_plots"}}) is None  # not weights: fine to delete


# An audit of hostile inputs (session 26): A run pointed at a folder whose result.json another tool wrote leaves that
# folder as it was and exits 2.
def test_foreign_result_json_is_kept(tmp_path):
    run_dir = tmp_path / "theirs"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "keep.txt").write_text("mine")
    (run_dir / "result.json").write_text('{"mine": 1}')
    run = sectune(["stage=plan", "logger=none"], run_dir=run_dir)
    assert run.returncode == 2, run.stderr
    assert "not written by sectune" in run.stderr
    assert json.loads((run_dir / "result.json").read_text()) == {"mine": 1}
    assert (run_dir / "adapter" / "keep.txt").read_text() == "mine"


def test_a_folder_of_weights_without_a_result_json_is_kept(tmp_path):
    """sectune writes result.json before any of its folders, so adapter/ (model/, checkpoints/, ...) without one is another
    tool's: a run there was let through and replaced them (left alone in session 26)."""
    from sectune.run_guard import foreign_result

    run_dir = tmp_path / "theirs"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_model.safetensors").write_text("theirs")
    run = sectune(["stage=plan", "logger=none"], run_dir=run_dir)
    assert run.returncode == 2, run.stderr
    assert "adapter/, checkpoints/ but no result.json" in run.stderr
    assert not (run_dir / "result.json").exists() and (run_dir / "adapter" / "adapter_model.safetensors").read_text() == "theirs"
    assert foreign_result(tmp_path / "new" / "result.json") is None  # a new dir, or one of Hydra's own files only
    (tmp_path / "hydra_only" / ".hydra").mkdir(parents=True)
    assert foreign_result(tmp_path / "hydra_only" / "result.json") is None


def test_an_interrupt_between_the_two_renames_puts_the_earlier_folder_back(tmp_path, monkeypatch):
    """An audit (session 36): SIGTERM between moving the earlier adapter aside and moving the new one in left the
    earlier one in .adapter.old-*, which the next save deleted; the run's result then named an adapter that was gone."""
    from sectune import run_guard

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "w.safetensors").write_text("old")
    new = tmp_path / f".adapter.tmp{os.getpid()}"
    new.mkdir()
    (new / "w.safetensors").write_text("new")
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new folder's rename: the signal arrives here
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_guard.replace_dir(new, out)
    monkeypatch.setattr(os, "replace", real)
    assert (out / "w.safetensors").read_text() == "old" and (new / "w.safetensors").read_text() == "new"


def test_an_adapter_goes_on_the_local_weights_it_was_trained_on_in_every_stage(tmp_path, capsys):
    """An audit (session 36): DPO and RL put an SFT adapter on this command's model= (another tiny seed, say) while
    infer put the same adapter on the weights it was trained on, so infer ran DPO's adapter on a base DPO never saw."""
    import json

    from conftest import compose
    from sectune.models import modeling

    cfg = compose(["logger=none"])
    other = tmp_path / "other_base"
    other.mkdir()
    (other / "config.json").write_text("{}")
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(other)}))
    assert modeling.adapter_base(adapter, cfg) == str(other)
    assert "goes on the weights it was trained on" in capsys.readouterr().out
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": modeling.model_path(cfg)}))
    assert modeling.adapter_base(adapter, cfg) == modeling.model_path(cfg)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    assert modeling.adapter_base(adapter, cfg) == modeling.model_path(cfg)  # a hub id: the configured model


def test_files_and_cache_folders_get_the_modes_the_umask_gives(tmp_path):
    """The evaluation figures and report, the flow splits and the generated flows CSV were written through
    ``tempfile.mkstemp`` (owner-only 0600) and a built auth folder through ``mkdtemp`` (0700): a group sharing a project
    could read every file of a run but those. Under umask 022 every file and folder written is now readable by all."""
    from sectune.data.auth_logs import build_auth_folder
    from sectune.data.flows import write_splits_json
    from sectune.data.synthetic_flows import generate_cic_iot_46
    from sectune.evaluation.classifier import write_evaluation
    from sectune.models.tiny import ensure_tiny_model

    old = os.umask(0o022)
    try:
        write_evaluation(tmp_path / "eval", y_true=["a", "b", "a", "b"], y_pred=["a", "b", "b", "b"], labels=["a", "b"],
                         latencies_s=[0.01, 0.02, 0.01, 0.03])
        write_splits_json(tmp_path / "splits", {"train": [{"x": 1}], "test": [{"x": 2}]})
        generate_cic_iot_46(40, 0, tmp_path / "flows.csv")
        build_auth_folder(tmp_path / "auth", generated_lines=1500, seed=7)
        spec = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 32,
                "vocab_size": 300, "max_position_embeddings": 64}
        ensure_tiny_model("t", "llama", spec, tmp_path / "no_shared_data", tmp_path / "cache")
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if not p.name.startswith(".")]
    assert len(list(tmp_path.glob("cache/models/t-*/model.safetensors"))) == 1
    assert len(written) > 20 and any(p.suffix == ".png" for p in written)
    private = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written if p.stat().st_mode & 0o044 != 0o044}
    assert not private, private
    assert not [p for p in tmp_path.rglob(".*tmp*")]  # no temporary file left behind


def _two_runs_on_a_disk_that_fills(tmp_path, monkeypatch, fail_at):
    """A succeeded run (fake stage: an adapter, a config Hydra wrote), then a rerun with another config whose writes
    fail with ENOSPC from ``fail_at`` on ("start": its first files; "stage": while saving, and every record after)."""
    import errno
    import shutil

    from conftest import compose
    from sectune import runner

    run_dir = tmp_path / "r"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("first: 1\n")
    full = {"on": False}

    def ok(ctx):
        import torch
        from safetensors.torch import save_file

        (ctx.run_dir / "adapter").mkdir(exist_ok=True)
        save_file({"w": torch.ones(2)}, str(ctx.run_dir / "adapter" / "adapter_model.safetensors"))
        (ctx.run_dir / "train_history.json").write_text('{"train": [1]}')
        return {"metrics": {"y": 1.0}, "artifacts": {"adapter": "adapter", "train_history": "train_history.json"}}

    def fills(ctx):
        (ctx.run_dir / "train_history.json").write_text('{"train": [2]}')  # a stage writes its history as it fails
        full["on"] = True
        raise OSError(errno.ENOSPC, "No space left on device", str(ctx.run_dir / "adapter" / "adapter_model.safetensors"))

    write, copy2 = runner.write_json_atomic, shutil.copy2

    def write_json_atomic(path, obj):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, obj)

    def copy(src, dst, **kw):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return copy2(src, dst, **kw)

    monkeypatch.setattr(shutil, "copy2", copy)

    monkeypatch.setattr(runner, "resolve_stage", lambda name: ok)
    assert runner.run(compose(["logger=none"]), run_dir)[0] == 0
    earlier = json.loads((run_dir / "result.json").read_text())
    (run_dir / ".hydra" / "config.yaml").write_text("second: 2\n")  # what Hydra writes for the next command
    monkeypatch.setattr(runner, "write_json_atomic", write_json_atomic)
    monkeypatch.setattr(runner, "resolve_stage", lambda name: fills)
    full["on"] = fail_at == "start"
    code, _ = runner.run(compose(["logger=none", "lora.r=8"]), run_dir)
    return run_dir, earlier, code


def test_a_rerun_that_fills_the_disk_puts_the_succeeded_run_back_first_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """On a full disk the copy of the attempt's config failed before result.json was put back: the succeeded run's
    result.json stayed "running", evaluate refused the run and infer answered with the base model (audit Z, session 39).
    Its result goes back first (by a rename where no write succeeds), its config by a rename, and the error is one line
    naming the file (a traceback before)."""
    run_dir, earlier, code = _two_runs_on_a_disk_that_fills(tmp_path, monkeypatch, "stage")
    err = capsys.readouterr().err
    assert code == 1 and json.loads((run_dir / "result.json").read_text()) == earlier
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "first: 1\n"
    assert (run_dir / ".hydra" / "failed" / "config.yaml").read_text() == "second: 2\n"
    assert "Traceback" not in err and "adapter_model.safetensors: no space left on the disk" in err, err
    # the loss history it rewrote: the kept copy itself goes back where copying it fails (the run was left without it)
    assert (run_dir / "train_history.json").read_text() == '{"train": [1]}'
    assert (run_dir / "train_history.failed.json").read_text() == '{"train": [2]}'
    assert "not done: this attempt's result.failed.json (No space left on device)" in err, err


def test_a_rerun_that_cannot_write_its_first_files_leaves_the_succeeded_runs_config(tmp_path, monkeypatch, capsys):
    """Hydra writes the new command's config over the succeeded run's before sectune starts; a failure writing
    result.previous.json (a full disk, a read-only run dir) left that config beside the earlier adapter, and evaluate
    then refused the run over data that had not changed (audit Z, session 39)."""
    run_dir, earlier, code = _two_runs_on_a_disk_that_fills(tmp_path, monkeypatch, "start")
    err = capsys.readouterr().err
    assert code == 1 and json.loads((run_dir / "result.json").read_text()) == earlier
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "first: 1\n"
    (line,) = [ln for ln in err.splitlines() if ln.startswith("sectune: error:")]
    # (here the lock's copy of the config fails first; result.previous.json's write would be next)
    assert ".hydra/running/config.yaml: no space left on the disk" in line and f"nothing in {run_dir} was replaced" in line, err


def test_writes_the_machine_refuses_are_named_and_leave_nothing_half_written(tmp_path, monkeypatch):
    """The Rust libraries say only "os error 27"; console.log's close on a full disk raised out of the runner's clean-up;
    a failed adapter save left its partial .adapter.tmp<pid>/ holding the room a retry needs (audit Z, session 39)."""
    import errno

    from sectune.models import modeling
    from sectune.run_guard import recorded_warnings
    from sectune.runner import write_error

    msg = write_error(Exception("File too large (os error 27)"), tmp_path)
    assert msg.startswith(f"a file under {tmp_path} or paths.cache_dir: a file-size limit (ulimit -f) was reached"), msg
    assert write_error(OSError(errno.EROFS, "Read-only file system", "/ro/x"), tmp_path).startswith("/ro/x: the file system is read-only")
    assert write_error(ValueError("os error 28"), tmp_path).startswith("a file under") and write_error(ValueError("bad"), tmp_path) is None

    class Full:
        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    rec = recorded_warnings(tmp_path / "console.log").__enter__()
    rec._log = Full()
    rec.__exit__(None, None, None)  # no exception out of the clean-up

    class Model:
        def save_pretrained(self, path, **kw):
            Path(path).mkdir(parents=True)
            (Path(path) / "adapter_model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        modeling.save_pretrained_atomic(Model(), None, tmp_path / "adapter")
    assert not list(tmp_path.glob(".adapter.tmp*")) and not (tmp_path / "adapter").exists()


def test_a_cache_that_names_a_file_is_one_line_naming_it(tmp_path):
    """An audit (session 41): SECTUNE_CACHE (or XDG_CACHE_HOME) naming a file gave a NotADirectoryError traceback."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    run = sectune(["stage=sft", "logger=none", "train.max_steps=1", "dataset.max_samples=10"], tmp_path / "run",
                  env={"SECTUNE_CACHE": str(afile)})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    line = [ln for ln in run.stderr.splitlines() if ln.startswith("sectune: error:")]
    assert len(line) == 1 and str(afile) in line[0] and "a part of the path is a file, not a folder" in line[0], run.stderr[-2000:]
    assert "SECTUNE_CACHE" in line[0] and afile.read_text() == "not a folder"


def test_a_scheduler_jobs_preemption_time_limit_and_interrupt_are_recorded_as_such(tmp_path, monkeypatch, capsys):
    """An audit (session 41), under Hydra's submitit launcher: submitit's requeue exits inside the training step and left
    result.json "running" with a finish time; its time limit with no requeue left was a traceback read as a bug; and a
    SIGTERM'd job re-raised the sweep's interrupt, which submitit does not catch: the submitting sweep ended in a 40-line
    UncompletedJobError. In a sweep the resume hint names the sweep's dir (the same command trained the job from step 0)."""
    from submitit.core.utils import UncompletedJobError

    from sectune import runner, sweeps
    from sectune.run_guard import Interrupted

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    (tmp_path / "sweep" / "0" / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    monkeypatch.setattr(runner, "resume_hint", lambda d: "; (hint)")

    def stage_raising(error):
        def stage(ctx):
            raise error
        return stage

    monkeypatch.setattr(runner, "resolve_stage", lambda name: stage_raising(SystemExit(-1)))
    with pytest.raises(SystemExit):
        runner.run(compose(["logger=none"]), tmp_path / "a")
    res = json.loads((tmp_path / "a" / "result.json").read_text())
    assert res["status"] == "failed" and res["error"] == "interrupted (requeued by the scheduler: preempted or near its time limit)"
    monkeypatch.setattr(runner, "resolve_stage", lambda name: stage_raising(UncompletedJobError("Job not requeued because: timed-out too many times.")))
    code, _ = runner.run(compose(["logger=none"]), tmp_path / "b")
    err = capsys.readouterr().err
    assert code == 143 and "Traceback" not in err and "interrupted (the time limit" in err and "(hint)" in err
    assert json.loads((tmp_path / "b" / "result.json").read_text())["error"].startswith("interrupted (the time limit")
    monkeypatch.setattr(sweeps, "in_multirun", lambda: True)
    monkeypatch.setattr(runner, "resolve_stage", lambda name: stage_raising(Interrupted(15)))
    code, _ = runner.run(compose(["logger=none"]), tmp_path / "c")  # not raised again: the job ends, the sweep reads it
    assert code == 143
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    with pytest.raises(Interrupted):  # a sweep run in this process: the interrupt stops the sweep, as before
        runner.run(compose(["logger=none"]), tmp_path / "d")
    monkeypatch.undo()
    from sectune.run_endings import resume_hint

    (tmp_path / "sweep" / "0" / "checkpoints" / "checkpoint-5" / "trainer_state.json").write_text("{}")
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "sweep" / "0" / "checkpoints" / "checkpoint-5" / "model.safetensors"))
    torch.save({}, tmp_path / "sweep" / "0" / "checkpoints" / "checkpoint-5" / "optimizer.pt")
    monkeypatch.setattr(sweeps, "in_multirun", lambda: True)
    assert resume_hint(tmp_path / "sweep" / "0") == (f"; the same sweep with hydra.sweep.dir={tmp_path / 'sweep'} sweep.skip_done=true "
                                                     "train.resume=auto continues this job from checkpoint-5")
