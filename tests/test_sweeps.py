"""Sweeps: 2x2 multirun + report (with failed rows), skip_done across sweep dirs, submitit, Optuna."""
import csv
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import cli, compose
from sectune.paths import PROJECT_ROOT

TINY = ["logger=none", "generation.preview_samples=0", "train.batch_size=2", "train.max_steps=2",
        "dataset.max_samples=12"]


def multirun(args, sweep_dir: Path, timeout=600, env=None):
    return cli(["-m", *args, f"hydra.sweep.dir={sweep_dir}"], timeout=timeout, env={"HF_HUB_OFFLINE": "1", **(env or {})})


def results(sweep_dir: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")}


def test_2x2_sweep_report_failed_rows_and_skip_done_across_sweep_dirs(tmp_path):
    index = tmp_path / "index"
    first, second = tmp_path / "sweep1", tmp_path / "sweep2"
    grid = ["lora.r=2,4", "debug.fail_at_step=null,1", f"sweep.index_dir={index}"]
    proc = multirun([*TINY, *grid], first)
    # failed jobs are rows, not the end of the sweep: all four ran; the sweep then exits 1, naming the two
    assert proc.returncode == 1 and "sectune: 2 of 4 sweep jobs failed" in proc.stderr, proc.stderr[-3000:]
    res = results(first)
    assert len(res) == 4
    assert sorted(r["status"] for r in res.values()) == ["failed", "failed", "succeeded", "succeeded"]
    assert len(list(index.glob("*.json"))) == 2  # only succeeded jobs are indexed

    # the console script: one row per job, swept keys as columns, failures as failed rows
    rep = subprocess.run([str(Path(sys.executable).parent / "sectune-report"), str(first)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})  # this checkout's sectune behind the entry point
    assert rep.returncode == 0, rep.stderr
    rows = list(csv.DictReader((first / "report.csv").open()))
    assert len(rows) == 4 and {"lora.r", "debug.fail_at_step", "status", "eval_loss"} <= set(rows[0])
    assert sum(r["status"] == "failed" for r in rows) == 2
    assert "lora.r" in (first / "report.md").read_text()
    # one plot per swept key with succeeded values (every succeeded job has fail_at_step=null: no plot)
    assert sorted(p.name for p in (first / "plots").glob("*.png")) == ["lora.r.png"]

    # a rerun lands in a NEW dir: finished configs are found through the index, failed ones rerun
    proc = multirun([*TINY, *grid, "sweep.skip_done=true"], second)
    assert proc.returncode == 1 and "sectune: 2 of 4 sweep jobs failed" in proc.stderr, proc.stderr[-3000:]  # the fail_at_step=1 pair
    res2 = results(second)
    assert len(res2) == 4
    reused = [r for r in res2.values() if r.get("reused_from")]
    assert len(reused) == 2 and all(r["status"] == "succeeded" for r in reused)
    assert {Path(r["reused_from"]).parent for r in reused} == {first.resolve()}
    for job, r in res2.items():
        if r.get("reused_from"):
            assert (second / str(job) / r["artifacts"]["adapter"] / "adapter_config.json").is_file()
        else:
            assert r["status"] == "failed" and "fail_at_step" in r["error"]

    # the report as a stage over the second sweep
    run_dir = tmp_path / "report_run"
    proc = cli(["stage=report", f"report.dir={second}", "logger=none", f"hydra.run.dir={run_dir}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((run_dir / "result.json").read_text())
    assert out["metrics"] == {"jobs": 4, "succeeded": 2, "failed": 2}
    assert (run_dir / out["artifacts"]["report_csv"]).resolve() == (second / "report.csv").resolve()


def test_skip_done_reuses_the_jobs_of_a_moved_checkout_but_not_other_data_or_values(tmp_path):
    """Session 44: skip_done compared config digests holding the checkout's places (paths.shared_data, paths.cache_dir)
    and its index named the jobs by absolute path: the same sweep in a moved checkout (its multirun/ and ../shared/data
    along) trained every job again. Another value, or the data file edited, is still another job."""
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "shared").mkdir(parents=True)
    (a / "shared" / "notes.txt").write_text("the same data\n")

    def sweep(root, name, *args):
        return multirun([*TINY, f"paths.shared_data={root / 'shared'}", f"sweep.index_dir={root / 'multirun' / '.index'}", *args],
                        root / "multirun" / name)

    proc = sweep(a, "s1", "lora.r=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a.rename(b)  # the checkout moved: its multirun/ (runs and index) and ../shared/data with it
    proc = sweep(b, "s2", "lora.r=2,4", "sweep.skip_done=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(b / "multirun" / "s2")
    assert res[0].get("reused_from") == str((b / "multirun" / "s1" / "0").resolve()), res[0]
    assert not res[1].get("reused_from") and res[1]["status"] == "succeeded"  # lora.r=4: another job
    assert (b / "multirun" / "s2" / "0" / res[0]["artifacts"]["adapter"] / "adapter_config.json").is_file()
    # in place (hydra.sweep.dir=<the moved sweep>): its own result stands
    proc = sweep(b, "s1", "lora.r=2", "sweep.skip_done=true")
    assert "already succeeded with this config; skipped" in proc.stdout, proc.stdout[-2000:]
    (b / "shared" / "notes.txt").write_text("other data, longer\n")  # the data edited: trained again
    proc = sweep(b, "s3", "lora.r=2", "sweep.skip_done=true")
    assert proc.returncode == 0 and not results(b / "multirun" / "s3")[0].get("reused_from"), proc.stdout[-2000:]


def test_an_interrupted_sweep_rerun_with_train_resume_auto_finds_the_jobs_that_finished(tmp_path):
    """Session 44: an interrupted sweep's advice is to rerun it with sweep.skip_done=true train.resume=auto, but
    train.resume was part of every digest, so each job that had finished was trained again. The place-free digest (what
    skip_done also matches) leaves it out; another value still counts."""
    import json

    from sectune import sweeps
    from sectune.run_digest import config_digest

    def digests(*extra):
        cfg = compose([f"sweep.index_dir={tmp_path / 'index'}", *extra])
        return cfg, config_digest(cfg), config_digest(cfg, portable=True)

    _, digest, place_free = digests()
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "result.json").write_text(json.dumps({"status": "succeeded", "config_digest": digest,
                                                             sweeps.PLACE_FREE_KEY: place_free}))
    assert sweeps.find_done(*digests("train.resume=auto")[:1], tmp_path / "job", *digests("train.resume=auto")[1:]) is not None
    assert sweeps.find_done(*digests("lora.r=8")[:1], tmp_path / "job", *digests("lora.r=8")[1:]) is None


def test_digest_ignores_sweep_bookkeeping():
    from sectune.runner import config_digest

    a = compose(["sweep.skip_done=false"])
    b = compose(["sweep.skip_done=true", "sweep.index_dir=/elsewhere"])
    c = compose(["lora.r=16"])
    assert config_digest(a) == config_digest(b) != config_digest(c)


def test_digest_counts_the_processes_that_train_a_config(monkeypatch):
    """sweep.skip_done reused a 2-process (global batch 2x) result for the same config run as one process."""
    from sectune.runner import config_digest

    cfg = compose(["train.batch_size=2"])
    one = config_digest(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert config_digest(cfg) == one  # one process: the digests of runs made before this change stand
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = config_digest(cfg)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert len({one, two, config_digest(cfg)}) == 3


def test_an_option_added_at_the_value_older_runs_had_keeps_their_digest(monkeypatch):
    """An upgrade that added any config key made every earlier run "another config": sweep.skip_done trained every job
    again and a pipeline its finished steps. A key listed in run_digest.ADDED_KEYS at its older value is left out of the
    digest (a node added whole too); at another value it counts."""
    from sectune import run_digest
    from sectune.runner import config_digest, skip_digest

    cfg = compose(["lora.r=4"])
    before, before_skip = config_digest(cfg), skip_digest(cfg)
    monkeypatch.setattr(run_digest, "ADDED_KEYS", {**run_digest.ADDED_KEYS, "train.new_option": 3, "fresh.a": 1, "fresh.b": [1, 2]})
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # the upgraded schema: a plain config that takes the new keys
    cfg.train.new_option = 3
    cfg.fresh = {"a": 1, "b": [1, 2]}
    assert config_digest(cfg) == before and skip_digest(cfg) == before_skip
    for key, other in (("train.new_option", 4), ("fresh.b", [2, 1])):
        changed = cfg.copy()
        OmegaConf.update(changed, key, other)
        assert config_digest(changed) != before, key
    assert config_digest(compose(["lora.r=8"])) != before


def test_a_newer_rule_engine_or_log_generator_makes_auth_runs_other_runs(monkeypatch):
    """The rules label every auth window: a policy trained on the older labels was reused by a pipeline or a sweep after
    an upgrade that changed them (the digest knew the source logs, not the labels). Runs on other data keep their digest,
    and at the versions digests began with nothing changes."""
    from sectune.data import auth_rules, synthetic_auth
    from sectune.run_digest import AUTH_VERSIONS_BASE, data_fingerprint
    from sectune.runner import config_digest

    monkeypatch.setattr(auth_rules, "RULES_VERSION", AUTH_VERSIONS_BASE["rules"])
    monkeypatch.setattr(synthetic_auth, "GENERATOR_VERSION", AUTH_VERSIONS_BASE["generator"])
    auth, flows = compose(["dataset=auth_logs"]), compose(["dataset=cic_iot_2023_merged"])
    before = config_digest(auth), config_digest(flows)
    assert "auth_versions" not in data_fingerprint(auth)
    monkeypatch.setattr(auth_rules, "RULES_VERSION", "auth-rules-99")
    assert data_fingerprint(auth)["auth_versions"] == {"rules": "auth-rules-99"}
    assert config_digest(auth) != before[0] and config_digest(flows) == before[1]
    monkeypatch.setattr(synthetic_auth, "GENERATOR_VERSION", "auth-gen-99")
    assert data_fingerprint(compose(["dataset=injection_triplets"]))["auth_versions"] == {"rules": "auth-rules-99", "generator": "auth-gen-99"}


def test_every_config_key_is_frozen_or_listed_with_its_older_value():
    """tests/config_keys.txt froze the schema's keys; a key added since must be in run_digest.ADDED_KEYS with a value the
    schema accepts, so no upgrade changes every digest unseen."""
    from omegaconf import OmegaConf

    from sectune.config import SectuneConfig, TinySpec
    from sectune.run_digest import ADDED_KEYS, schema_keys

    frozen = {line.strip() for line in (Path(__file__).parent / "config_keys.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    now = set(schema_keys())
    unlisted = sorted(now - frozen - set(ADDED_KEYS))
    assert not unlisted, f"new config keys {unlisted}: list each in sectune/run_digest.py ADDED_KEYS with the value " \
                         "that reproduces what runs made before it did"
    assert not set(ADDED_KEYS) & frozen and set(ADDED_KEYS) <= now
    schema = OmegaConf.structured(SectuneConfig)
    for key, older in ADDED_KEYS.items():
        if key.startswith("model.tiny.") and schema.model.tiny is None:  # optional, unset in the bare schema: its type's
            schema.model.tiny = TinySpec()  # defaults, which type-check the key as well
        OmegaConf.update(schema, key, older)  # raises on a value of the wrong type


def test_submitit_local_runs_a_two_job_sweep_and_counts_a_job_that_never_wrote_its_result(tmp_path):
    """Job 1's dir is held by another command (as a second sweep into the same dir would hold it): it refuses to start
    and writes no result.json. Through a launcher only dirs holding one were read, so that sweep exited 0 (session 36)."""
    import fcntl

    sweep = tmp_path / "sweep"
    (sweep / "1").mkdir(parents=True)
    with open(sweep / "1" / ".sectune.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = multirun([*TINY, "hydra/launcher=local", "train.learning_rate=1e-3,1e-2"], sweep)
    assert proc.returncode == 1 and f"1 of 2 sweep jobs failed: {sweep / '1'}" in proc.stderr, proc.stderr[-3000:]
    res = results(sweep)
    assert sorted(res) == [0] and res[0]["status"] == "succeeded"
    assert any((sweep / ".submitit").rglob("*_result.pkl"))  # the jobs really went through submitit


def test_launcher_presets_compose():
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from sectune import config

    config.register()
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        slurm = hcompose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
        raw = hcompose("config", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True)
    lc = slurm.hydra.launcher
    assert lc._target_.endswith("SlurmLauncher") and lc.partition == "gpu" and lc.gpus_per_node == 1
    assert lc.array_parallelism == 8 and any("module load" in s for s in lc.setup)
    # W&B decides on the cluster as on this machine (the setup forced offline even with a key); squeue names the stage
    assert not any("WANDB_MODE" in s for s in lc.setup) and lc.name == "sectune_sft"
    assert raw.hydra.launcher._target_.endswith("SlurmLauncher")


def test_the_slurm_launcher_off_a_cluster_is_a_clear_error_not_a_traceback(tmp_path):
    import shutil

    if shutil.which("srun"):
        pytest.skip("this machine has srun: the launcher would submit for real")
    proc = multirun(["hydra/launcher=slurm", "stage=plan", "logger=none"], tmp_path / "sweep", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("sectune: error: hydra/launcher=slurm: no `srun` on this machine's PATH")


def test_a_sweep_the_cluster_refuses_is_one_line_not_a_traceback(tmp_path):
    """An audit (session 36): sbatch refusing the jobs (a partition the cluster lacks) ended in a 45-line traceback of
    submitit's FailedJobError. A stand-in srun and sbatch (no SLURM here) refuse as a real sbatch does."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpux' >&2\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    proc = multirun(["hydra/launcher=slurm", "hydra.launcher.partition=gpux", "stage=plan", "logger=none"], tmp_path / "sweep",
                    timeout=300, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "sectune: error: the cluster refused the sweep's jobs: sbatch: error: invalid partition specified: gpux" in proc.stderr


def test_more_than_one_task_per_job_is_refused_before_any_job(tmp_path):
    """An audit (session 36): tasks_per_node=2 (slurm.yaml: "not wired") ran the whole job twice in one dir, the second
    stopping on the first's lock: a wasted allocation, no word."""
    proc = multirun(["hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "stage=plan", "logger=none"],
                    tmp_path / "sweep", timeout=300)
    assert proc.returncode == 2 and "hydra.launcher.tasks_per_node=2: one task per job" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "sweep" / "0").exists()


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_a_launcher_without_multirun_is_refused_not_run_here(tmp_path, launcher):
    """hydra/launcher=slurm without -m trained in this process (on a login node, say), exit 0, no word."""
    proc = cli([f"hydra/launcher={launcher}", "stage=plan", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], cwd=PROJECT_ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"sectune: error: hydra/launcher={launcher} applies to sweeps only" in proc.stderr
    assert not (tmp_path / "run" / "result.json").exists()


def test_optuna_preset_returns_the_objective(tmp_path):
    sweep = tmp_path / "optuna"
    proc = multirun(["hparams_search=sft_optuna", "stage=plan", "logger=none", "hydra.sweeper.n_trials=3",
                     "sweep.objective=predicted_peak_bytes"], sweep, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = (sweep / "optimization_results.yaml").read_text()
    values = [r["metrics"]["predicted_peak_bytes"] for r in results(sweep).values()]
    assert len(values) == 3 and f"best_value: {float(min(values))}" in best


def test_an_optuna_study_whose_every_trial_failed_ends_in_one_line_not_a_traceback(tmp_path):
    """Optuna raises "No trials are completed yet" when no trial returned its objective; Hydra printed that as a
    20-line traceback above sectune's own count of the failed jobs."""
    sweep = tmp_path / "optuna"
    proc = multirun(["hparams_search=sft_optuna", "stage=plan", "logger=none", "hydra.sweeper.n_trials=2",
                     f"model.name_or_path={tmp_path / 'no_model'}", "sweep.objective=predicted_peak_bytes"], sweep, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"sectune: 2 of 2 sweep jobs failed: {sweep / '0'}, {sweep / '1'}" in proc.stderr
    assert "Traceback" not in proc.stderr and "No trials are completed" not in proc.stderr, proc.stderr[-3000:]
    assert all(json.loads((sweep / j / "result.json").read_text())["status"] == "failed" for j in "01")


def test_a_sweep_with_a_failed_job_exits_non_zero_after_running_every_job(tmp_path):
    """A failed job is a row of the sweep, not its end; the sweep used to exit 0 even when every job failed."""
    # a job that fails as it runs (a value check would now stop the sweep before any job: the test below)
    run = cli(["-m", "stage=plan", "logger=none", f"model.name_or_path={tmp_path / 'no_model'},null", f"hydra.sweep.dir={tmp_path / 'm'}"])
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"sectune: 1 of 2 sweep jobs failed: {tmp_path / 'm' / '0'}" in run.stderr
    assert json.loads((tmp_path / "m/1/result.json").read_text())["status"] == "succeeded"  # the other job still ran


def test_skip_done_in_place_never_links_to_another_job_dir_of_the_same_sweep(tmp_path, capsys):
    """Rerun in place with other values (lora.r=4,8 then 8,16): job 0 (r=8) used to link to job 1's dir, which job 1
    (r=16) then overwrote, leaving r=8's result pointing at an r=16 adapter."""
    from sectune import sweeps

    sweep = tmp_path / "m"
    job1 = sweep / "1"
    (job1 / "adapter").mkdir(parents=True)
    (job1 / "result.json").write_text(json.dumps({"status": "succeeded", "config_digest": "abc", "artifacts": {"adapter": "adapter"}}))
    cfg = compose(["sweep.skip_done=true", f"sweep.index_dir={tmp_path / 'index'}"])
    sweeps.record_done(cfg, job1, "abc")
    assert sweeps.reuse(cfg, sweep / "0", "abc", write=True) is None and not (sweep / "0" / "result.json").exists()
    assert "trained again rather than linked" in capsys.readouterr().out
    other = tmp_path / "other_sweep" / "3"  # another sweep's dir: linked as before
    assert sweeps.reuse(cfg, other, "abc", write=False)["reused_from"] == str(job1.resolve())
    assert sweeps.reuse(cfg, job1, "abc", write=False)["status"] == "succeeded"  # its own dir: skipped as before
    # an adapter cut short, or deleted, since: trained again (both were reused, and infer fell back to the base model)
    (job1 / "adapter" / "adapter_model.safetensors").write_bytes((64).to_bytes(8, "little") + b'{"w": ')
    assert sweeps.reuse(cfg, other, "abc", write=False) is None and sweeps.reuse(cfg, job1, "abc", write=False) is None
    assert "adapter_model.safetensors) is damaged" in capsys.readouterr().out
    shutil.rmtree(job1 / "adapter")
    assert sweeps.reuse(cfg, job1, "abc", write=False) is None and "artifacts.adapter" in capsys.readouterr().out


def test_an_objective_the_stage_does_not_report_is_named_and_the_sweep_fails(tmp_path):
    """A typo'd sweep.objective: every trial was logged as 'Return value must be float-castable' and the sweep ended in
    Optuna's 'No trials are completed yet' traceback, never naming the key."""
    proc = multirun(["hparams_search=sft_optuna", "stage=plan", "logger=none", "hydra.sweeper.n_trials=2", "sweep.objective=eval_los"],
                    tmp_path / "opt")
    assert proc.returncode == 2
    assert "sectune: error: sweep.objective=eval_los: this stage's result has no such number" in proc.stderr
    assert "predicted_peak_bytes" in proc.stderr
    # the first trial that cannot be scored, with no trial ever scored, stops the sweep: the others would train for nothing
    assert "no job of this sweep has reported sweep.objective=eval_los, so the sweep stops here" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "opt").iterdir() if p.is_dir()) == ["0"]
    # and the trial is a failed one in its result.json (the report and sweep.skip_done's index agree), metrics kept
    res = json.loads((tmp_path / "opt" / "0" / "result.json").read_text())
    assert res["status"] == "failed" and res["error"].startswith("sweep.objective=eval_los") and "predicted_peak_bytes" in res["metrics"]


def test_jobs_a_launcher_ran_in_other_processes_count_in_the_sweeps_exit_code(tmp_path, monkeypatch):
    """Under the submitit launcher a sweep with a failed job exited 0: only jobs run in the sweep's own process were
    counted. Their result.json files are read at the sweep's end instead."""
    from omegaconf import OmegaConf

    from sectune import cli as sectune_cli

    for job, status in (("0", "succeeded"), ("1", "failed")):
        (tmp_path / job).mkdir()
        (tmp_path / job / "result.json").write_text(json.dumps({"status": status}))
    (tmp_path / ".submitit").mkdir()
    monkeypatch.setattr(sectune_cli, "_SWEEP_JOBS", [])
    monkeypatch.setattr(sectune_cli, "_SWEEP_REPORTED", False)
    sectune_cli.SweepCheck().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert sectune_cli._SWEEP_JOBS == [(str(tmp_path / "0"), 0), (str(tmp_path / "1"), 1)]
    with pytest.raises(SystemExit) as e:
        sectune_cli._exit_if_sweep_jobs_failed()
    assert e.value.code == 1
    sectune_cli._exit_if_sweep_jobs_failed()  # said once: a second call (main's SystemExit handler) prints nothing more


def test_a_typo_in_a_sweep_leaves_no_sweep_dir_behind_and_an_earlier_sweeps_record_as_it_was(tmp_path):
    """`sectune -m lora.rr=4,8` said which key was wrong, and left multirun/DATE/TIME/ holding only multirun.yaml (in an
    earlier sweep's dir: that sweep's multirun.yaml replaced, which sectune-report reads for its job list)."""
    new = tmp_path / "new"
    run = cli(["-m", "stage=plan", "logger=none", "lora.rr=4,8", f"hydra.sweep.dir={new}"])
    assert run.returncode == 2 and "lora.rr" in run.stderr and not new.exists(), run.stderr[-1000:]
    old = tmp_path / "old"
    old.mkdir()
    (old / "multirun.yaml").write_text("hydra: {overrides: {task: [lora.r=4]}}\n")
    run = cli(["-m", "stage=plan", "logger=none", "lora.rr=4,8", f"hydra.sweep.dir={old}"])
    assert run.returncode == 2 and (old / "multirun.yaml").read_text() == "hydra: {overrides: {task: [lora.r=4]}}\n"


def test_a_sweep_into_the_dir_of_a_sweep_still_running_is_refused_before_any_job(tmp_path):
    """Two sweeps started in the same second shared multirun/DATE/TIME: each refused some of the other's jobs, and one
    replaced the other's finished job as "a sweep rerun in place" (audit AA). The second is refused whole, the first's
    jobs untouched; the dir is free again once the first has exited."""
    import fcntl

    sweep = tmp_path / "m"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "result.json").write_text('{"status": "succeeded"}')
    with open(sweep / ".sweep.lock", "a+") as held:  # the sweep still running
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242")
        held.flush()
        run = cli(["-m", "stage=plan", "logger=none", "lora.r=4,8", f"hydra.sweep.dir={sweep}"])
        assert run.returncode == 2 and f"{sweep} is in use by another sweep (pid 4242)" in run.stderr, run.stderr[-1000:]
        assert sorted(p.name for p in sweep.iterdir()) == [".sweep.lock", "0"]
        assert (sweep / "0" / "result.json").read_text() == '{"status": "succeeded"}'
    run = cli(["-m", "stage=plan", "logger=none", "lora.r=4,8", f"hydra.sweep.dir={sweep}"])
    assert run.returncode == 0 and (sweep / "1" / "result.json").is_file(), run.stderr[-1000:]


def test_default_dirs_of_commands_started_in_the_same_second_are_distinct(tmp_path, monkeypatch):
    """Hydra's default outputs/DATE/TIME and multirun/DATE/TIME are per second: two commands a script started together
    shared one (one refused as "in use"; two sweeps lost jobs to each other). The dir is claimed as it is chosen."""
    from datetime import datetime

    from sectune import paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "_CLAIMED", {})
    now = datetime(2026, 12, 7, 5, 47, 15)
    (tmp_path / "multirun/2026-12-07/05-47-15").mkdir(parents=True)  # another command's, this second
    first = paths.fresh_run_dir("multirun", now)
    assert first == "multirun/2026-12-07/05-47-15-1" and (tmp_path / first).is_dir()
    assert paths.fresh_run_dir("multirun", now) == first  # Hydra resolves it again: the same dir
    monkeypatch.setattr(paths, "_CLAIMED", {})
    assert paths.fresh_run_dir("multirun", now) == "multirun/2026-12-07/05-47-15-2"
    paths._drop_if_empty(tmp_path / first)  # what a command that wrote nothing leaves: nothing
    assert not (tmp_path / first).exists()

    # as a user runs them: each command in a dir of its own, a sweep's jobs in one
    runs = [cli(["stage=plan", "logger=none"], cwd=tmp_path) for _ in range(2)]
    sweep = cli(["-m", "stage=plan", "logger=none", "lora.r=4,8"], cwd=tmp_path)
    assert all(r.returncode == 0 for r in [*runs, sweep]), [r.stderr[-800:] for r in [*runs, sweep]]
    assert len(list(tmp_path.glob("outputs/*/*/result.json"))) == 2
    assert [p.parent.name for p in sorted(tmp_path.glob("multirun/*/*/*/result.json"))] == ["0", "1"]


def test_every_job_of_a_grid_sweep_is_checked_before_the_first_one_runs(tmp_path):
    """An audit (session 25): `train.learning_rate=1e-3,-1` ran job 0 to its end before job 1 was refused, and
    `+lora.rr=3,4` created and failed every job (exit 1). Now nothing starts and nothing is left."""
    for swept, says in (("train.learning_rate=1e-3,-1", "sweep job 1 (stage=plan logger=none train.learning_rate=-1): "
                                                          "train.learning_rate=-1.0: must be a number > 0; no job was started"),
                        ("+lora.rr=3,4", "sweep job 0 (stage=plan logger=none +lora.rr=3): lora.rr: not a sectune setting")):
        sweep = tmp_path / swept.split("=")[0].strip("+")
        proc = multirun(["stage=plan", "logger=none", swept], sweep, timeout=300)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr[-1500:]
        assert not sweep.exists()


def test_sweeps_imports_nothing_from_the_runner_that_imports_it():
    """DESIGN.md's runner <-> sweeps import circle: sweeps took damaged_artifact and write_json_atomic from runner, which
    imports sweeps at its top. Both come from run_guard (a leaf) now."""
    import ast

    from sectune import sweeps

    tree = ast.parse(open(sweeps.__file__).read())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert "sectune.run_guard" in names
    assert not [n for n in names if n and (n == "sectune.runner" or n.endswith("sectune.runner"))], names


def test_overrides_before_and_after_the_multirun_flag_are_one_sweep(tmp_path):
    """README's `sectune --config-dir my_conf +experiment=my_study -m train.seed=1,2,3` stopped with argparse's
    "unrecognized arguments: train.seed=1,2,3" (exit 2): Hydra reads its overrides as one positional list, which the
    flag cut in two. sectune moves the flag first; every override on either side applies to each job."""
    from sectune.cli import multirun_flag_first

    assert multirun_flag_first(["a=1", "-m", "b=1,2"]) == ["-m", "a=1", "b=1,2"]
    assert multirun_flag_first(["--config-dir", "c", "a=1", "--multirun", "b=2"]) == ["--multirun", "--config-dir", "c", "a=1", "b=2"]
    assert multirun_flag_first(["a=1", "b=2"]) == ["a=1", "b=2"]
    sweep = tmp_path / "m"
    run = cli(["stage=plan", "logger=none", "-m", "lora.r=4,8", f"hydra.sweep.dir={sweep}"])
    assert run.returncode == 0, run.stderr[-2000:]
    saved = [json.loads((sweep / str(i) / "result.json").read_text()) for i in (0, 1)]
    assert [s["status"] for s in saved] == ["succeeded", "succeeded"]
    overrides = [(sweep / str(i) / ".hydra" / "overrides.yaml").read_text() for i in (0, 1)]
    assert all("stage=plan" in o and "logger=none" in o for o in overrides)
    assert "lora.r=4" in overrides[0] and "lora.r=8" in overrides[1]


def test_an_optuna_search_space_is_checked_at_its_edges_before_the_first_trial(tmp_path):
    """An Optuna study's trials are drawn as it runs, so each was checked only when it started: `lora.r: choice(4, 8,
    -1)` trained the trials drawn before the bad one, which then failed. Each parameter is now checked at every choice and
    at both ends of its interval before any trial; a good space runs as before (test_optuna_preset_returns_the_objective)."""
    from sectune.cli import _search_space_edges

    edges = _search_space_edges(["stage=plan", "lora.r=choice(4, 8)", "train.learning_rate=interval(1e-5, 5e-2)",
                                 "+x.y=range(1, 10, 3)", "lora.r=choice(16, 32)"])
    assert edges == [["stage=plan", "lora.r=16", "train.learning_rate=1e-05", "+x.y=1"],
                     ["stage=plan", "lora.r=32", "train.learning_rate=1e-05", "+x.y=1"],
                     ["stage=plan", "lora.r=16", "train.learning_rate=0.05", "+x.y=1"],
                     ["stage=plan", "lora.r=16", "train.learning_rate=1e-05", "+x.y=7"]]
    for swept, says in (("lora.r=choice(4,-1)", "lora.r=-1"), ("train.learning_rate=interval(-1e-3,1e-3)", "train.learning_rate=-0.001")):
        sweep = tmp_path / swept.split("=")[0].rsplit(".", 1)[-1]
        proc = multirun(["hparams_search=sft_optuna", "stage=plan", "logger=none", "hydra.sweeper.n_trials=3", swept], sweep,
                        timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Optuna search-space edge" in proc.stderr and says in proc.stderr and "no job was started" in proc.stderr, proc.stderr[-2000:]
        assert not sweep.exists()


def test_an_optuna_direction_other_than_sweep_direction_is_refused_before_any_trial(tmp_path):
    """An audit (session 36): hydra.sweeper.direction=maximize on the command line (as Optuna's documentation shows)
    made the study maximise eval_loss while every job, the runner and sectune-report minimised it: Optuna's best trial
    was the report's worst, and nothing said so."""
    sweep = tmp_path / "opt"
    proc = multirun(["hparams_search=sft_optuna", "stage=plan", "logger=none", "hydra.sweeper.n_trials=2",
                     "hydra.sweeper.direction=maximize"], sweep, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hydra.sweeper.direction=maximize but sweep.direction=minimize" in proc.stderr and not sweep.exists()


def test_an_index_dir_that_cannot_be_written_is_a_warning_and_the_job_stands(tmp_path, capsys):
    """sweep.index_dir is a convenience: the job succeeded either way; the line said neither "warning" nor what it costs
    and went to stdout (audit Z, session 39)."""
    from sectune import sweeps

    (tmp_path / "index").write_text("a file where the index dir should be")
    sweeps.record_done(compose([f"sweep.index_dir={tmp_path / 'index'}"]), tmp_path / "job", "abc123")
    err = capsys.readouterr().err
    assert err.startswith(f"sectune: warning: could not record abc123 in {tmp_path / 'index'} (") and "skip_done will not find" in err, err
