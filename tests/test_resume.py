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
    # the run's mean train loss covers all 12 steps, not only the 8 after the resume (Trainer's own figure)
    assert abs(straight.result["metrics"]["train_loss"] - resumed.result["metrics"]["train_loss"]) < 1e-4
    after_resume = sum(b[s] for s in range(5, 13)) / 8
    assert abs(resumed.result["metrics"]["train_loss"] - after_resume) > 1e-3


def test_run_train_loss_adds_the_steps_before_a_resume_weighted_by_the_steps_each_logged_loss_covers():
    from types import SimpleNamespace

    from sectune.training.engine import run_train_loss

    out = SimpleNamespace(training_loss=1.0)  # this call's mean over steps 5..8
    log = [{"step": 2, "loss": 4.0}, {"step": 4, "loss": 2.0}, {"step": 4, "eval_loss": 9.0}, {"step": 6, "loss": 1.5}]
    resumed = SimpleNamespace(_initial_global_step=4, state=SimpleNamespace(global_step=8, log_history=log))
    assert run_train_loss(resumed, out) == (4.0 * 2 + 2.0 * 2 + 1.0 * 4) / 8
    fresh = SimpleNamespace(_initial_global_step=0, state=SimpleNamespace(global_step=8, log_history=log))
    assert run_train_loss(fresh, out) == 1.0
    # resumed from the last step's checkpoint: nothing trained in this call, whose Trainer loss is 0.0 (it was recorded)
    done = SimpleNamespace(_initial_global_step=4, state=SimpleNamespace(global_step=4, log_history=log[:3]))
    assert run_train_loss(done, SimpleNamespace(training_loss=0.0)) == (4.0 * 2 + 2.0 * 2) / 4


def test_resume_from_explicit_bad_dir_is_a_clear_error(tmp_path):
    run = sectune([*FAST, "train.max_steps=2", "dataset.max_samples=12", f"train.resume={tmp_path}"], tmp_path / "r")
    assert run.returncode == 2
    assert "train.resume" in run.stderr and "not a complete Trainer checkpoint" in run.stderr


def test_a_mistyped_or_missing_resume_is_refused_before_anything_loads(tmp_path):
    """train.resume=autoo (or a folder that is not there) was "not a complete Trainer checkpoint" after the model had loaded."""
    for value in ("autoo", str(tmp_path / "nope")):
        run = sectune([*FAST, "train.max_steps=2", f"train.resume={value}"], tmp_path / "r")
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert f"train.resume={value}" in run.stderr and "neither auto, null nor an existing checkpoint folder" in run.stderr
        assert "trainable of" not in run.stdout  # stopped at the config, before the model


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_damaged_checkpoint_files_are_named(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sectune.training.checkpoints import damaged_file

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    save_file({"w": torch.ones(64, 64)}, str(ckpt / "adapter_model.safetensors"))
    torch.save({"state": torch.ones(64, 64)}, ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text('{"global_step": 4}')
    assert damaged_file(ckpt) is None
    _truncate(ckpt / "optimizer.pt")
    assert damaged_file(ckpt)[0] == "optimizer.pt"
    _truncate(ckpt / "adapter_model.safetensors")
    name, why = damaged_file(ckpt)
    assert name == "adapter_model.safetensors" and "truncated" in why


def test_a_safetensors_file_whose_header_shapes_do_not_fit_its_offsets_is_damaged(tmp_path):
    """An audit (session 41): a header whose tensor shape no longer matched its byte offsets, with the file's size
    right, passed the size check and failed later in from_pretrained; safetensors' own header checks now run too."""
    import torch
    from safetensors.torch import save_file

    from sectune.training.checkpoints import damaged_safetensors

    f = tmp_path / "adapter_model.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(4)}, str(f))
    assert damaged_safetensors(tmp_path) is None
    data = f.read_bytes()
    assert data.count(b'"shape":[4]') == 2
    f.write_bytes(data.replace(b'"shape":[4]', b'"shape":[3]', 1))  # same header length, same file size
    name, why = damaged_safetensors(tmp_path)
    assert name == "adapter_model.safetensors" and why.startswith("does not load")


def test_resume_skips_a_damaged_newest_checkpoint_and_names_a_damaged_explicit_one(tmp_path):
    args = [*FAST, "train.save_steps=2", "dataset.max_samples=24", "train.save_total_limit=null"]
    run_dir = tmp_path / "run"
    first = sectune([*args, "train.max_steps=4"], run_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpts = run_dir / "checkpoints"
    damaged = ckpts / "checkpoint-4" / "adapter_model.safetensors"
    _truncate(damaged)  # trainer_state.json intact: it looks complete

    # auto: falls back to checkpoint-2, saying which one it skipped and why
    resumed = sectune([*args, "train.max_steps=6", "train.resume=auto"], run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping checkpoint-4: adapter_model.safetensors is damaged (truncated" in resumed.stderr, resumed.stderr[-3000:]
    assert f"resuming from {ckpts / 'checkpoint-2'}" in resumed.stdout
    assert resumed.result["metrics"]["train_steps"] == 6
    assert sorted(dict(json.loads((run_dir / "train_history.json").read_text())["train"])) == list(range(1, 7))

    # explicit: a clear error naming the damaged file
    _truncate(ckpts / "checkpoint-6" / "adapter_model.safetensors")
    explicit = sectune([*args, "train.max_steps=8", f"train.resume={ckpts / 'checkpoint-6'}"], tmp_path / "explicit")
    assert explicit.returncode == 2, explicit.stderr[-2000:]
    (line,) = [ln for ln in explicit.stderr.splitlines() if ln.startswith("sectune: error:")]
    assert str(ckpts / "checkpoint-6" / "adapter_model.safetensors") in line and "damaged" in line, line
    assert "Traceback" not in explicit.stderr


def test_resuming_checkpoints_trained_with_other_settings_is_an_error_naming_them(tmp_path):
    """train.resume=auto after changing the learning rate continued the old run's weights under the new config, and a
    pipeline step rerun with another β kept the old adapter, recorded as the new one."""
    import pytest

    from conftest import compose
    from sectune.errors import ConfigError
    from sectune.training import checkpoints

    ckpt_dir = tmp_path / "run" / "checkpoints"
    base = ["logger=none", "train.learning_rate=0.01"]
    assert checkpoints.resolve_resume(compose(base), ckpt_dir) is None  # a fresh start records its settings
    record = json.loads((ckpt_dir / checkpoints.RESUME_RECORD).read_text())
    assert record["train.learning_rate"] == 0.01 and "train.max_steps" not in record
    ckpt = ckpt_dir / "checkpoint-4"
    checkpoints._check_same_training(compose([*base, "train.max_steps=40", "train.save_steps=2"]), ckpt, "x")  # longer: fine
    with pytest.raises(ConfigError, match=r"^train.resume=auto \(.*checkpoint-4\): those checkpoints were trained with other "
                                          r"settings \(lora.r: 4 there, 16 now; train.learning_rate: 0.01 there, 0.001 now\)"):
        checkpoints._check_same_training(compose(["logger=none", "train.learning_rate=0.001", "lora.r=16"]), ckpt,
                                         f"train.resume=auto ({ckpt})")


def test_a_key_added_since_the_checkpoints_were_recorded_does_not_stop_their_resume_at_the_value_they_trained_with(tmp_path):
    """Checkpoints recorded before dataset.injection_text_groups existed could not be resumed at all: the key differed
    ("None there, 'similar' now"), and setting it to null was refused. A key missing from the record counts as its schema
    default; for an injected-windows run, as the older behaviour (containment) it trained with."""
    import pytest

    from conftest import compose
    from sectune.errors import ConfigError
    from sectune.training import checkpoints

    for dataset, ok, other in ((["dataset=auth_logs"], [], ["dataset.min_lines=7"]),
                               (["dataset=injection_triplets"], ["dataset.injection_text_groups=containment"], [])):
        ckpt_dir = tmp_path / dataset[0] / "checkpoints"
        assert checkpoints.resolve_resume(compose(["logger=none", *dataset]), ckpt_dir) is None
        record_file = ckpt_dir / checkpoints.RESUME_RECORD
        record = json.loads(record_file.read_text())
        del record["dataset.injection_text_groups"]  # recorded by a sectune before the key
        record_file.write_text(json.dumps(record))
        checkpoints._check_same_training(compose(["logger=none", *dataset, *ok]), ckpt_dir / "checkpoint-2", "x")
        # any real difference still stops it, and so does the injected-windows run under the new default split
        with pytest.raises(ConfigError, match="trained with other settings"):
            checkpoints._check_same_training(compose(["logger=none", *dataset, *other]), ckpt_dir / "checkpoint-2", "x")


def test_a_key_listed_in_added_keys_resumes_at_its_older_value(tmp_path, monkeypatch):
    """Checkpoints recorded before a key in run_digest.ADDED_KEYS resume under the value runs had then, not its default."""
    import pytest

    from conftest import compose
    from sectune import run_digest
    from sectune.errors import ConfigError
    from sectune.training import checkpoints

    default = compose(["logger=none"]).dataset.min_lines
    monkeypatch.setattr(run_digest, "ADDED_KEYS", {**run_digest.ADDED_KEYS, "dataset.min_lines": default + 2})
    ckpt_dir = tmp_path / "checkpoints"
    checkpoints.resolve_resume(compose(["logger=none"]), ckpt_dir)
    record = json.loads((ckpt_dir / checkpoints.RESUME_RECORD).read_text())
    del record["dataset.min_lines"]
    (ckpt_dir / checkpoints.RESUME_RECORD).write_text(json.dumps(record))
    checkpoints._check_same_training(compose(["logger=none", f"dataset.min_lines={default + 2}"]), ckpt_dir / "checkpoint-2", "x")
    with pytest.raises(ConfigError, match="trained with other settings"):
        checkpoints._check_same_training(compose(["logger=none"]), ckpt_dir / "checkpoint-2", "x")


def test_resuming_other_weights_without_their_settings_record_is_one_error_not_a_traceback(tmp_path):
    """With trained_with.json gone (or damaged) the settings cannot be compared: resuming an r4 adapter's checkpoint
    with lora=r16_all_linear was torch's "size mismatch" traceback, exit 1 (an audit, session 32); a damaged record was
    passed over without a word."""
    args = [*FAST, "train.save_steps=1", "dataset.max_samples=8", "train.save_total_limit=null"]
    run_dir = tmp_path / "run"
    first = sectune([*args, "train.max_steps=2"], run_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    record = run_dir / "checkpoints" / "trained_with.json"
    record.write_text("{bad")
    other = sectune([*args, "train.max_steps=4", "train.resume=auto", "lora=r16_all_linear"], run_dir)
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert f"{record} cannot be read (JSONDecodeError" in other.stdout + other.stderr
    (line,) = [ln for ln in other.stderr.splitlines() if ln.startswith("sectune: error:")]
    assert "do not fit the model these settings build (size mismatch for" in line and "trained with other settings" in line, line
    assert json.loads((run_dir / "result.json").read_text())["status"] == "succeeded"  # the finished run is back


def test_resuming_on_another_number_of_processes_is_an_error_naming_both(tmp_path, monkeypatch):
    """N processes train on N x the batch: checkpoints written by 1 process resumed under torchrun with 2 continued on twice
    the global batch and without rank 1's RNG state (a torchrun audit; transformers only logs it). Records from before the
    process count was recorded are 1-process ones."""
    import pytest

    from conftest import compose
    from sectune.errors import ConfigError
    from sectune.training import checkpoints, distributed

    ckpt_dir = tmp_path / "run" / "checkpoints"
    checkpoints.resolve_resume(compose(["logger=none"]), ckpt_dir)
    record = json.loads((ckpt_dir / checkpoints.RESUME_RECORD).read_text())
    assert record["processes"] == 1
    ckpt = ckpt_dir / "checkpoint-4"
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"other settings \(processes: 1 there, 2 now\)"):
        checkpoints._check_same_training(compose(["logger=none"]), ckpt, "train.resume=auto")
    record.pop("processes")  # an older record
    (ckpt_dir / checkpoints.RESUME_RECORD).write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"processes: 1 there, 2 now"):
        checkpoints._check_same_training(compose(["logger=none"]), ckpt, "train.resume=auto")
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    checkpoints._check_same_training(compose(["logger=none"]), ckpt, "train.resume=auto")  # the same count: fine


def test_the_last_good_checkpoint_a_nan_report_names_holds_no_nan(tmp_path):
    """debug mode stopped at step 3 naming checkpoint-2 as the last good one; checkpoint-2 had logged eval_loss NaN and
    held weights of ~1e30."""
    import torch
    from safetensors.torch import save_file

    from sectune.training.checkpoints import last_finite_checkpoint

    def ckpt(step, logs, weight, weights_file="adapter_model.safetensors"):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        save_file({"w": torch.full((4, 4), weight)}, str(d / weights_file))
        torch.save({"state": torch.ones(2)}, d / "optimizer.pt")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": logs}))

    ckpt(1, [{"loss": 1.5, "step": 1}], 0.5)
    ckpt(2, [{"loss": 1.5, "step": 1}, {"eval_loss": float("nan"), "step": 2}], 1.0)
    ckpt(3, [{"loss": 1.5, "step": 1}, {"loss": 1.2, "step": 3}], float("inf"))
    assert last_finite_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert last_finite_checkpoint(tmp_path / "none") is None
    # a full fine-tune's weights (lora=none: model.safetensors), NaN after a step that logged nothing (session 36)
    ckpt(4, [{"loss": 1.5, "step": 1}, {"loss": 1.2, "step": 3}], float("nan"), "model.safetensors")
    assert last_finite_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


def test_resuming_a_checkpoint_at_max_steps_trains_nothing_more_and_keeps_its_weights(tmp_path):
    """An audit (session 25): transformers' Trainer checks the step count only after a step, so a run resumed from a
    checkpoint already at train.max_steps mid-epoch (killed after its last checkpoint) trained step max_steps + 1."""
    from safetensors.torch import load_file

    args = [*FAST, "train.max_steps=5", "train.save_steps=5", "dataset.max_samples=48"]
    first = sectune(args, tmp_path / "r")
    assert first.returncode == 0, first.stderr[-2000:]
    state = json.loads((tmp_path / "r" / "checkpoints" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["epoch"] != int(state["epoch"])  # mid-epoch: where Trainer took one more step
    weights = load_file(tmp_path / "r" / "adapter" / "adapter_model.safetensors")
    again = sectune([*args, "train.resume=auto"], tmp_path / "r")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "is at step 5 (= train.max_steps): nothing left to train" in again.stdout
    assert again.result["metrics"]["train_steps"] == 5 and sorted(_losses(tmp_path / "r")) == [1, 2, 3, 4, 5]
    after = load_file(tmp_path / "r" / "adapter" / "adapter_model.safetensors")
    assert all((after[k] == weights[k]).all() for k in weights)


def test_a_resume_that_lengthens_the_run_trains_its_first_new_step_at_the_new_schedules_rate(tmp_path):
    """An audit (session 36): the optimizer's saved rate was the old schedule's at its end (linear decay: 0), so step 3
    of a run resumed from 2 to 3 steps changed no weight."""
    from safetensors.torch import load_file

    args = [*FAST, "train.save_steps=1", "dataset.max_samples=12"]
    first = sectune([*args, "train.max_steps=2"], tmp_path / "r")
    assert first.returncode == 0, first.stderr[-2000:]
    longer = sectune([*args, "train.max_steps=3", "train.resume=auto"], tmp_path / "r")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "the learning rate follows its schedule from step 2" in longer.stdout
    ckpts = tmp_path / "r" / "checkpoints"
    two, three = (load_file(ckpts / f"checkpoint-{n}" / "adapter_model.safetensors") for n in (2, 3))
    assert any(not (two[k] == three[k]).all() for k in two), "step 3 trained at learning rate 0"
    assert sorted(_losses(tmp_path / "r")) == [1, 2, 3] and longer.result["metrics"]["train_steps"] == 3


class _Planted:
    """A pickle that would write a file if loaded with weights_only=False."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_a_checkpoint_holding_a_code_running_pickle_is_refused_in_one_line_and_runs_nothing(tmp_path):
    """Security: training state is read with torch.load(weights_only=True). An audit (session 25) planted a pickle that
    would create a file in a checkpoint's rng_state.pth: nothing ran, but the error was torch's own, suggesting
    weights_only=False. Now one line says what it means."""
    import torch

    args = [*FAST, "train.save_steps=2", "dataset.max_samples=24", "train.max_steps=2"]
    first = sectune(args, tmp_path / "run")
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    planted = tmp_path / "PWNED"
    torch.save({"python": _Planted(planted)}, ckpt / "rng_state.pth")  # torch's own zip format: it passes the damage check
    again = sectune([*FAST, "train.save_steps=2", "dataset.max_samples=24", "train.max_steps=4", f"train.resume={ckpt}"],
                    tmp_path / "again")
    assert again.returncode == 2, again.stderr[-3000:]
    assert not planted.exists()
    (line,) = [ln for ln in again.stderr.splitlines() if ln.startswith("sectune: error:")]
    assert "holds pickled objects beyond tensors and plain values, which sectune never loads" in line and str(ckpt) in line
    assert "weights_only=False" not in again.stderr.split("sectune: error:")[-1]


def test_a_checkpoint_missing_any_of_trainers_files_is_not_complete(tmp_path):
    """is_complete_checkpoint (weights, optimizer.pt, trainer_state.json) was only ever handed whole checkpoints: one
    without its optimizer state would be resumed with a fresh optimizer, saying nothing."""
    import torch
    from safetensors.torch import save_file

    from sectune.training.checkpoints import complete_checkpoints, is_complete_checkpoint

    def ckpt(step, skip):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if skip != "weights":
            save_file({"w": torch.ones(2)}, str(d / "adapter_model.safetensors"))
        if skip != "optimizer":
            torch.save({"state": torch.ones(2)}, d / "optimizer.pt")
        if skip != "state":
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        return d

    whole = ckpt(1, None)
    partial = [ckpt(n, s) for n, s in ((2, "optimizer"), (3, "state"), (4, "weights"))]
    assert is_complete_checkpoint(whole) and not any(is_complete_checkpoint(p) for p in partial)
    assert complete_checkpoints(tmp_path) == [whole]


def test_a_moved_or_copied_run_resumes_with_its_own_best_checkpoint(tmp_path):
    """An audit (session 36): the resumed state's best checkpoint is a path where the run was. Trainer dropped it for a
    moved run and kept it for a copied one (the other run's weights), and a run resumed at its last step never saved
    again to re-point it: it ended on its last weights, or loaded the other run's best."""
    from types import SimpleNamespace

    from transformers import TrainerState

    from sectune.training.resume_callbacks import ResumedBestCheckpoint

    (tmp_path / "here" / "checkpoint-2").mkdir(parents=True)
    for where in (None, str(tmp_path / "elsewhere" / "checkpoint-2")):  # moved (dropped), copied (the original's)
        state = TrainerState(best_global_step=2, best_model_checkpoint=where)
        ResumedBestCheckpoint().on_train_begin(SimpleNamespace(output_dir=str(tmp_path / "here")), state, None)
        assert state.best_model_checkpoint == str(tmp_path / "here" / "checkpoint-2")
    state = TrainerState(best_global_step=3, best_model_checkpoint=None)  # its checkpoint gone: nothing made up
    ResumedBestCheckpoint().on_train_begin(SimpleNamespace(output_dir=str(tmp_path / "here")), state, None)
    assert state.best_model_checkpoint is None


def test_a_damaged_json_record_a_stage_needs_makes_auto_skip_that_checkpoint(tmp_path):
    """An audit (session 36): GRPO's heldout_best.json garbled in the newest checkpoint stopped train.resume=auto with an
    error, though a garbled trainer_state.json makes it take the checkpoint before."""
    from sectune.training.checkpoints import unusable

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text('{"global_step": 4, "log_history": []}')
    (ckpt / "heldout_best.json").write_text('{"scores": garbage')
    assert unusable(ckpt, ("heldout_best.json",)) == "heldout_best.json is damaged (JSONDecodeError)"
    (ckpt / "heldout_best.json").write_text('{"scores": []}')
    assert unusable(ckpt, ("heldout_best.json",)) is None


def test_a_resume_is_refused_when_the_run_it_starts_from_or_its_data_changed_since(tmp_path):
    """The record held an input run's path only: an SFT run retrained in the same dir had dpo resume checkpoints trained
    from the old weights against the new reference; and a data file rewritten between the interruption and the resume
    gave another split (an audit, session 42). A record from before these keys still resumes."""
    import pytest

    from conftest import compose
    from sectune.errors import ConfigError
    from sectune.training import checkpoints

    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "result.json").write_text(json.dumps({"status": "succeeded", "finished": "2026-12-07T10:00:00", "config_digest": "a" * 64}))
    data = tmp_path / "pairs.jsonl"
    data.write_text("{}\n")
    base = ["logger=none", "stage=dpo", "loss=dpo", "dataset=auth_preferences", f"dpo.init_from={sft}", f"dataset.path={data}"]
    ckpt_dir = tmp_path / "dpo" / "checkpoints"
    assert checkpoints.resolve_resume(compose(base), ckpt_dir) is None
    record = json.loads((ckpt_dir / checkpoints.RESUME_RECORD).read_text())
    assert record["input.dpo.init_from"] == "finished 2026-12-07T10:00:00, config aaaaaaaaaaaa" and "data.dataset.path" in record
    ckpt = ckpt_dir / "checkpoint-2"
    checkpoints._check_same_training(compose(base), ckpt, "x")  # nothing changed
    assert "data.paths.shared_data" not in record  # every dataset's files: one added elsewhere refused any resume
    (sft / "result.json").write_text(json.dumps({"status": "succeeded", "finished": "2026-12-07T11:00:00", "config_digest": "a" * 64}))
    with pytest.raises(ConfigError, match=r"input\.dpo\.init_from: 'finished 2026-12-07T10:00:00.*the run that key names was trained again"):
        checkpoints._check_same_training(compose(base), ckpt, "x")
    checkpoints.resolve_resume(compose(base), ckpt_dir)  # a fresh record: the new SFT run
    data.write_text("{}\n{}\n")
    with pytest.raises(ConfigError, match=r"data\.dataset\.path: .*the files that key names changed since"):
        checkpoints._check_same_training(compose(base), ckpt, "x")
    old = {k: v for k, v in json.loads((ckpt_dir / checkpoints.RESUME_RECORD).read_text()).items()
           if not k.startswith(("input.", "data."))}
    (ckpt_dir / checkpoints.RESUME_RECORD).write_text(json.dumps(old))  # recorded before session 42: nothing to compare
    checkpoints._check_same_training(compose(base), ckpt, "x")


def test_a_flow_classifier_resumed_across_the_quantile_rule_change_is_refused(tmp_path):
    """Checkpoints trained on session 41's bins would continue on session 42's (other prompts for the same flows)."""
    import pytest

    from conftest import compose
    from sectune.errors import ConfigError
    from sectune.training import checkpoints

    cfg = compose(["logger=none", "stage=classify", "dataset=cic_iot_2023_merged"])
    ckpt_dir = tmp_path / "run" / "checkpoints"
    checkpoints.resolve_resume(cfg, ckpt_dir)
    record = json.loads((ckpt_dir / checkpoints.RESUME_RECORD).read_text())
    assert record["dataset.quantile_rule"] == 2
    checkpoints._check_same_training(cfg, ckpt_dir / "checkpoint-2", "x")
    del record["dataset.quantile_rule"]  # recorded before session 42
    (ckpt_dir / checkpoints.RESUME_RECORD).write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"dataset\.quantile_rule: 1 there, 2 now"):
        checkpoints._check_same_training(cfg, ckpt_dir / "checkpoint-2", "x")


def test_a_resume_in_a_moved_checkout_finds_its_data_by_its_files_not_its_place(tmp_path):
    """Session 44: the resume record held the data paths' places (dataset.source_dir: the shared data folder,
    <checkout>/../shared/data; dataset.path: a user's file), so train.resume=auto in a checkout moved or cloned again was
    refused. The same files at the new place resume; other files there, or another value, are still refused; at the same
    place a file added beside the data still resumes (session 42)."""
    import pytest

    from conftest import compose
    from sectune.errors import ConfigError
    from sectune.training import checkpoints

    a, b = tmp_path / "a", tmp_path / "b"
    (a / "shared").mkdir(parents=True)
    (a / "shared" / "notes.txt").write_text("shared\n")
    (a / "shared" / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')

    def cfg(root, *extra):
        return compose(["logger=none", f"paths.shared_data={root / 'shared'}", *extra])

    user = ["stage=reward", "dataset=auth_preferences"]
    for name, extra in (("shared", []), ("user", [*user, f"dataset.path={a / 'shared' / 'pairs.jsonl'}"])):
        assert checkpoints.resolve_resume(cfg(a, *extra), a / "checkout" / "outputs" / "day" / name / "checkpoints") is None
    a.rename(b)  # the checkout moved, its ../shared/data with it

    def check(name, *extra):
        ckpt = b / "checkout" / "outputs" / "day" / name / "checkpoints" / "checkpoint-2"  # (its pipeline dir: outputs/day)
        checkpoints._check_same_training(cfg(b, *extra), ckpt, "train.resume=auto")

    check("shared")
    check("user", *user, f"dataset.path={b / 'shared' / 'pairs.jsonl'}")
    with pytest.raises(ConfigError, match=r"lora.r: 4 there, 8 now"):
        check("shared", "lora.r=8")
    (b / "shared" / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "b", "rejected": "a", "x": 1}\n')  # other data there
    with pytest.raises(ConfigError, match=r"other settings \(data.dataset.path: .*; dataset.path: '.*/a/shared/pairs.jsonl' there"):
        check("user", *user, f"dataset.path={b / 'shared' / 'pairs.jsonl'}")
    with pytest.raises(ConfigError, match=r"dataset.source_dir: '.*/a/shared' there, '.*/b/shared' now"):
        check("shared")  # the shared folder at its new place holds other files: not known to be the same data
    # the same place (a record made in b): a file added beside the data counts by the place, as before
    assert checkpoints.resolve_resume(cfg(b), b / "checkout" / "outputs" / "day" / "again" / "checkpoints") is None
    (b / "shared" / "added.txt").write_text("beside\n")
    check("again")
