"""sectune-report over fabricated Hydra sweep dirs (no training needed)."""
import json

import pandas as pd
import pytest
import yaml

from conftest import compose
from sectune.report import build_report, main, write_report
from sectune.sweep_jobs import NO_RESULT

GRID = [  # job, lora.r, lr, what happened
    (0, 4, "1e-4", {"eval_loss": 1.30, "eval_accuracy": 0.70}),
    (1, 4, "2e-4", {"eval_loss": 1.10, "eval_accuracy": 0.80}),
    (2, 8, "1e-4", "failed"),
    (3, 8, "2e-4", None),  # crashed before result.json
]


def make_sweep(root, grid=GRID, extra_override="model=tiny_llama"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    for job, r, lr, outcome in grid:
        d = root / str(job)
        (d / ".hydra").mkdir(parents=True)
        ov = [f"lora.r={r}", f"train.learning_rate={lr}"] + ([extra_override] if extra_override else [])
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(ov))
        base = {"stage": "sft", "artifacts": {}, "started": "2025-01-01T00:00:00", "finished": "2025-01-01T00:01:00",
                "config_digest": f"d{job}"}
        if isinstance(outcome, dict):
            (d / "result.json").write_text(json.dumps({**base, "status": "succeeded", "metrics": outcome}))
        elif outcome == "failed":
            (d / "result.json").write_text(json.dumps({**base, "status": "failed", "metrics": {},
                                                        "error": "CUDA out of memory"}))
    return root


def test_build_report_rows_columns_and_sort(tmp_path):
    df = build_report(make_sweep(tmp_path / "sweep"))
    assert len(df) == 4
    assert list(df.columns[:3]) == ["job", "lora.r", "train.learning_rate"]
    assert pd.api.types.is_integer_dtype(df["lora.r"])
    assert pd.api.types.is_float_dtype(df["train.learning_rate"])
    assert set(df["train.learning_rate"]) == {1e-4, 2e-4}
    assert df.attrs["swept"] == ["lora.r", "train.learning_rate"]
    assert df.attrs["fixed"] == {"model": "tiny_llama"}
    # default: eval_loss ascending, failures last (in job order)
    assert list(df["job"]) == [1, 0, 2, 3]
    assert df.attrs["sort_by"] == "eval_loss" and df.attrs["ascending"] is True
    failed = df[df["status"] == "failed"].set_index("job")
    assert set(failed.index) == {2, 3}
    assert failed.loc[2, "error"] == "CUDA out of memory"
    assert failed.loc[3, "error"] == NO_RESULT
    assert df.set_index("job").loc[0, "error"] == ""


def test_sort_direction_by_metric_name_and_override(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    acc = build_report(sweep, sort_by="eval_accuracy")
    assert list(acc["job"][:2]) == [1, 0] and acc.attrs["ascending"] is False  # not a loss: largest first
    acc_up = build_report(sweep, sort_by="eval_accuracy", ascending=True)
    assert list(acc_up["job"]) == [0, 1, 2, 3]
    loss_down = build_report(sweep, sort_by="eval_loss", ascending=False)
    assert list(loss_down["job"]) == [0, 1, 2, 3]


def test_first_metric_when_no_eval_loss(tmp_path):
    grid = [(0, 4, "1e-4", {"f1": 0.5}), (1, 8, "1e-4", {"f1": 0.9}), (2, 16, "1e-4", {"f1": 0.7})]
    df = build_report(make_sweep(tmp_path / "s", grid, extra_override=None))
    assert df.attrs["sort_by"] == "f1" and list(df["job"]) == [1, 2, 0]
    assert df.attrs["swept"] == ["lora.r"] and "train.learning_rate" in df.columns


def test_a_classify_sweep_sorts_by_validation_macro_f1_not_train_loss(tmp_path):
    grid = [(0, 4, "1e-4", {"train_loss": 0.1, "val_macro_f1": 0.6}), (1, 8, "1e-4", {"train_loss": 0.5, "val_macro_f1": 0.9}),
            (2, 16, "1e-4", {"train_loss": 0.3, "val_macro_f1": 0.7})]
    df = build_report(make_sweep(tmp_path / "s", grid, extra_override=None))
    assert df.attrs["sort_by"] == "val_macro_f1" and df.attrs["ascending"] is False and list(df["job"]) == [1, 2, 0]


def test_an_hdfs_detection_sweep_sorts_by_the_chosen_rules_validation_f1_not_a_rule_flag(tmp_path):
    """An audit (session 36): stage=evaluate dataset=hdfs reported no val_f1, so its sweeps were sorted by the first
    non-test metric, rule_is_top_g (which rule validation chose, 0/1). A 0/1 flag is never the fallback either."""
    flags = {"test_f1": 0.7, "rule_is_top_g": 1, "model_top_g": 9}
    grid = [(0, 4, "1e-4", {**flags, "val_f1": 0.80}), (1, 8, "1e-4", {**flags, "rule_is_top_g": 0, "val_f1": 0.90})]
    df = build_report(make_sweep(tmp_path / "s", grid, extra_override=None))
    assert df.attrs["sort_by"] == "val_f1" and df.attrs["ascending"] is False and list(df["job"]) == [1, 0]
    grid = [(0, 4, "1e-4", flags), (1, 8, "1e-4", {**flags, "rule_is_top_g": 0, "model_top_g": 5})]
    assert build_report(make_sweep(tmp_path / "t", grid, extra_override=None)).attrs["sort_by"] == "model_top_g"


def test_numeric_job_order_and_garbled_result(tmp_path):
    grid = [(i, 4 * (i + 1), "1e-4", {"eval_loss": float(i)}) for i in range(11)]
    sweep = make_sweep(tmp_path / "s", grid)
    (sweep / "10" / "result.json").write_text("{not json")
    (sweep / "plots").mkdir()  # not a job dir
    df = build_report(sweep, sort_by="job")
    assert list(df["job"]) == list(range(11))
    bad = df.set_index("job").loc[10]
    assert bad["status"] == "failed" and "10/result.json" in bad["error"] and "unreadable" in bad["error"]


def test_write_report_files(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    out = write_report(sweep)
    assert (sweep / "report.csv").is_file() and (sweep / "report.md").is_file()
    csv = pd.read_csv(sweep / "report.csv")
    assert len(csv) == 4 and "eval_loss" in csv.columns and "model" in csv.columns
    md = (sweep / "report.md").read_text()
    assert "| job | lora.r | train.learning_rate | status | eval_loss | eval_accuracy | error |" in md
    assert "CUDA out of memory" in md and "`model=tiny_llama`" in md
    plots = sorted(p.name for p in (sweep / "plots").iterdir())
    assert plots == ["lora.r.png", "train.learning_rate.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out["plots"])
    assert not [p for p in sweep.rglob(".*tmp*")]  # temp files renamed away


def test_categorical_swept_key_plot(tmp_path):
    grid = [(0, 4, "1e-4", {"eval_loss": 1.0}), (1, 4, "1e-4", {"eval_loss": 2.0})]
    sweep = make_sweep(tmp_path / "s", grid, extra_override=None)
    for job, choice in ((0, "r4_attention"), (1, "r16_all_linear")):
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"lora={choice}"]))
    out = write_report(sweep)
    assert out["frame"].attrs["swept"] == ["lora"]
    assert [p.name for p in out["plots"]] == ["lora.png"]


def test_cli(tmp_path, capsys):
    sweep = make_sweep(tmp_path / "sweep")
    assert main([str(sweep), "--sort-by", "eval_accuracy", "--ascending"]) == 0
    printed = capsys.readouterr().out
    assert "| job |" in printed and "report.csv" in printed
    assert "Sorted by `eval_accuracy` (ascending)" in printed


@pytest.mark.parametrize("kind", ["missing", "empty", "bad_sort"])
def test_cli_errors_exit_2(tmp_path, capsys, kind):
    target = tmp_path / "nope"
    args = [str(target)]
    if kind == "empty":
        target.mkdir()
        (target / "multirun.yaml").write_text("{}\n")
    if kind == "bad_sort":
        make_sweep(target)
        args += ["--sort-by", "nonexistent_metric"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sectune-report: error:")
    assert ("nonexistent_metric" if kind == "bad_sort" else str(target)) in err[0]
    if kind == "bad_sort":  # the flag this command has
        assert err[0].startswith("sectune-report: error: --sort-by nonexistent_metric: not a column; metrics are eval_loss")


def test_stage_report_names_report_sort_by_not_the_cli_flag(tmp_path):
    """stage=report is configured by Hydra keys: a bad report.sort_by names that key (there is no --sort-by there),
    as one line, exit 2, before report.csv / report.md are written."""
    from conftest import sectune

    sweep = make_sweep(tmp_path / "sweep")
    run = sectune(["stage=report", f"report.dir={sweep}", "report.sort_by=nonexistent_metric", "logger=none"], tmp_path / "run")
    assert run.returncode == 2, run.stderr[-2000:]
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("sectune: error: report.sort_by=nonexistent_metric: not a column; metrics are eval_loss, eval_accuracy")
    assert "--sort-by" not in run.stderr and run.result["error"].startswith("report.sort_by=nonexistent_metric")
    assert not (sweep / "report.csv").exists() and not (sweep / "report.md").exists()


def test_the_default_sort_is_the_sweeps_objective_and_rates_of_errors_sort_ascending(tmp_path):
    """An Optuna sweep maximising reward_accuracy was listed by eval_loss, naming no objective; --sort-by test_fpr put
    the worst false-positive rate first."""
    grid = [(0, 4, "1e-4", {"eval_loss": 0.5, "reward_accuracy": 0.58, "test_fpr": 0.2}),
            (1, 8, "1e-4", {"eval_loss": 0.9, "reward_accuracy": 0.42, "test_fpr": 0.05}),
            (2, 16, "1e-4", {"eval_loss": 0.7, "reward_accuracy": 0.67, "test_fpr": 0.1})]
    sweep = make_sweep(tmp_path / "s", grid, extra_override=None)
    for job in ("0", "1", "2"):
        (sweep / job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"sweep": {"objective": "reward_accuracy",
                                                                                      "direction": "maximize"}}))
    df = build_report(sweep)
    assert df.attrs["sort_by"] == "reward_accuracy" and df.attrs["ascending"] is False and list(df["job"]) == [2, 0, 1]
    fpr = build_report(sweep, sort_by="test_fpr")
    assert fpr.attrs["ascending"] is True and list(fpr["job"]) == [1, 2, 0]


def test_which_metrics_sort_ascending():
    """bytes_reduction (higher is better) sorted ascending because it names bytes; latency_p95_s and
    test_invalid_predictions sorted descending: the worst row first in all three."""
    from sectune.report import lower_is_better

    for name in ("eval_loss", "test_fpr", "attack_success_rate", "latency_p95_s", "test_invalid_predictions", "peak_rss_bytes",
                 "wall_time_s", "bytes_up_total", "generation_s", "duration_s",  # "ratio" is inside generation/duration
                 # an audit (session 35): these sorted worst first
                 "heldout_invented_names_rate", "sft_invented_names_rate", "test_fp", "test_fn", "clients_failed"):
        assert lower_is_better(name), name
    for name in ("bytes_reduction", "bytes_reduction_on_wire", "rows_per_s", "analyses_per_s", "test_macro_f1", "reward_accuracy", "val_score",
                 "grpo_completions_per_s_ratio_vs_trl", "round_s_mean_speedup"):
        assert not lower_is_better(name), name


def test_a_seed_sweep_gets_each_settings_mean_and_sd_over_its_seeds(tmp_path):
    """lora.r x train.seed: report_seeds.csv and report.md give each r its mean ± sample sd over the succeeded seeds
    (hand-computed), sorted as the report (eval_loss ascending); a failed seed is not a run of the mean."""
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    losses = {(4, 1): 1.0, (4, 2): 1.2, (4, 3): 1.4, (8, 1): 0.9, (8, 2): 0.7, (8, 3): None, (16, 1): None, (16, 2): None}
    for job, ((r, seed), loss) in enumerate(losses.items()):
        d = root / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"lora.r={r}", f"train.seed={seed}"]))
        res = {"stage": "sft", "artifacts": {}, "status": "succeeded" if loss else "failed", "error": None if loss else "boom",
               "metrics": {"eval_loss": loss, "train_steps": 10, "total_params": 564864} if loss else {}}
        (d / "result.json").write_text(json.dumps(res))
    out = write_report(root)
    seeds = pd.read_csv(root / "report_seeds.csv")
    # r=8 first: the lower mean loss; r=16, whose every seed failed, keeps its row (it vanished)
    assert list(seeds["lora.r"]) == [8, 4, 16] and list(seeds["runs"]) == [2, 3, 0]
    seeds = seeds[seeds["runs"] > 0]
    assert "| 16 | 0 | — |" in out["markdown"]
    assert "| 0 | 4 | 1 | succeeded | 1 | 10 | 564864 |" in out["markdown"]  # train_steps an integer beside failed jobs' empty cells
    assert seeds["eval_loss mean"].tolist() == pytest.approx([0.8, 1.2])
    assert seeds["eval_loss sd"].tolist() == pytest.approx([(0.02 / 1) ** 0.5, (0.08 / 2) ** 0.5])  # sample sd
    assert seeds["train_steps sd"].tolist() == [0, 0]
    assert "## Over seeds (`train.seed`)" in out["markdown"] and "| 8 | 2 | 0.8 ± 0.14 |" in out["markdown"]
    assert "| 4 | 3 | 1.2 ± 0.2 |" in out["markdown"]
    # no seed swept: no such table
    (root / "report_seeds.csv").unlink()
    plain = write_report(make_sweep(tmp_path / "plain"))
    assert "Over seeds" not in plain["markdown"] and not (tmp_path / "plain" / "report_seeds.csv").exists()


def test_a_pipeline_sweep_sorts_by_its_chosen_policys_validation_score_never_by_a_test_number(tmp_path):
    """A pipeline's metrics are its infer step's (``inputs`` first) plus the held-out table's: it was sorted by ``inputs``,
    then (an audit, session 25) by the held-out table's verdict macro-F1, a test number: the top row was the best of k
    noisy test scores, and the job validation would choose came last."""
    grid = [(0, 4, "1e-4", {"inputs": 43, "heldout_val_verdict_macro_f1": 0.95, "heldout_verdict_macro_f1": 0.84}),
            (1, 4, "2e-4", {"inputs": 43, "heldout_val_verdict_macro_f1": 0.88, "heldout_verdict_macro_f1": 0.91})]
    frame = build_report(make_sweep(tmp_path / "p", grid))
    assert frame.attrs["sort_by"] == "heldout_val_verdict_macro_f1" and not frame.attrs["ascending"]
    assert list(frame["job"]) == [0, 1]
    # only test numbers (an injection evaluate sweep): not ranked, and the report says why
    grid = [(0, 4, "1e-4", {"attack_success_rate": 0.4, "clean_verdict_accuracy": 0.8}),
            (1, 4, "2e-4", {"attack_success_rate": 0.2, "clean_verdict_accuracy": 0.9})]
    out = write_report(make_sweep(tmp_path / "c", grid))
    assert out["frame"].attrs["sort_by"] is None and list(out["frame"]["job"]) == [0, 1]
    assert "Not ranked (job order): every metric here is measured on the test split" in out["markdown"]
    # asked for by name: sorted, and said to be a choice on test
    forced = write_report(tmp_path / "c", sort_by="attack_success_rate")
    assert list(forced["frame"]["job"]) == [1, 0] and "That is a test number: the top row was chosen on test" in forced["markdown"]


def test_a_sweep_objective_measured_on_test_is_refused():
    from sectune.sweeps import check_sweep
    from sectune.errors import ConfigError

    # an audit (session 25): names with "test" mid-name and the held-out table's per-row numbers got past a prefix check
    for name in ("heldout_verdict_macro_f1", "attack_success_rate", "test_macro_f1", "baseline_test_f1", "sft_verdict_macro_f1",
                 "rl_constrained_field_f1", "majority_verdict_macro_f1", "preference_accuracy", "reward_accuracy",
                 # "test" as the last word, and the rest of TEST_METRIC's alternatives that no name here exercised
                 "macro_f1_test", "accuracy_test", "targeted_attack_success_rate", "demanded_attack_success_rate",
                 "clean_verdict_accuracy", "logp_margin", "reward_margin", "heuristic_reward_mean", "dpo_verdict_macro_f1",
                 "base_json_valid_rate", "rules_verdict_macro_f1", "sft_vs_tfidf_lr_diff", "rl_analyses_per_s",
                 # the classic baseline beside the attack (stage=evaluate, stage=contrastive)
                 "baseline_attack_success_rate", "baseline_clean_verdict_accuracy", "baseline_targeted_attack_success_rate",
                 # an audit (session 35): the grouped rows, invented names, the held-out triplets' representation metrics,
                 # an injection evaluation's and a vote's numbers, a user's external file
                 "sft_grounded_verdict_macro_f1", "rl_constrained_grounded_field_f1", "rl_invented_names_rate",
                 "causal_stability", "causal_discrimination_start", "spurious_separation", "injected_schema_valid_rate",
                 "external_macro_f1", "members_attack_success_rate_mean"):
        with pytest.raises(ConfigError, match=rf"sweep.objective={name}: a number measured on the test split"):
            check_sweep(compose([f"sweep.objective={name}"]))
    for name in ("heldout_val_verdict_macro_f1", "eval_loss", "val_f1", "reward_heldout_best", "predicted_peak_bytes",
                 "testimony_f1", "latest_loss", "val_contest_score",  # "test" inside a word is no test number
                 "best_eval_causal_discrimination", "eval_causal_stability"):  # the train.eval_steps curve: validation
        check_sweep(compose([f"sweep.objective={name}"]))


def _multirun(root, task, sweeper="hydra._internal.core_plugins.basic_sweeper.BasicSweeper"):
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"_target_": sweeper, "params": None},
                                                                   "overrides": {"task": task}}}))


def _job(root, n, overrides, loss=None):
    (root / str(n) / ".hydra").mkdir(parents=True)
    (root / str(n) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if loss is not None:
        (root / str(n) / "result.json").write_text(json.dumps({"status": "succeeded", "metrics": {"eval_loss": loss}}))


def test_a_sweep_still_running_reports_its_live_job_as_running_and_the_rest_as_not_started_yet(tmp_path):
    """An audit (session 36): a report read mid-sweep called the job in training "failed" and the queued ones "the sweep
    stopped before this job". A job whose run-dir lock a live process holds is running; one nobody holds was killed."""
    import fcntl

    live = tmp_path / "live"
    live.mkdir()
    _multirun(live, ["lora.r=4,8,16"])
    _job(live, 0, ["lora.r=4"], 1.2)
    _job(live, 1, ["lora.r=8"])
    (live / "1" / "result.json").write_text(json.dumps({"status": "running", "metrics": {}}))
    with open(live / "1" / ".sectune.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        df = build_report(live)
        out = write_report(live)["markdown"]
    assert list(zip(df["job"], df["status"])) == [(0, "succeeded"), (1, "running"), (2, "not started")]
    assert "3 jobs: 1 succeeded, 0 failed, 1 still running, 1 not started yet." in out
    assert "no job dir yet: the sweep is still running" in out
    df = build_report(live)  # the lock let go without the run finishing: killed
    assert list(df["status"]) == ["succeeded", "failed", "not started"]


def test_jobs_of_a_sweep_that_kept_no_hydra_dir_are_matched_by_number(tmp_path):
    """An audit (session 36): with hydra.output_subdir=null no job records its overrides, and every job was disowned as
    an earlier sweep's: nothing ranked, no swept column."""
    sweep = tmp_path / "s"
    sweep.mkdir()
    _multirun(sweep, ["lora.r=2,4"])
    for n, loss in ((0, 1.5), (1, 1.1)):
        (sweep / str(n)).mkdir()
        (sweep / str(n) / "result.json").write_text(json.dumps({"status": "succeeded", "metrics": {"eval_loss": loss}}))
    df = build_report(sweep)
    assert list(zip(df["job"], df["lora.r"], df["status"])) == [(1, 4, "succeeded"), (0, 2, "succeeded")]


def test_jobs_a_stopped_sweep_never_started_and_an_earlier_sweeps_leftovers_are_named_not_ranked(tmp_path):
    """A 3-job sweep stopped during job 1 reported "2 jobs" (job 2 gone without a word); a rerun in the old dir with
    other values ranked the first sweep's leftover job first."""
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    _multirun(stopped, ["lora.r=4,8,16", "model=tiny_llama"])
    _job(stopped, 0, ["lora.r=4", "model=tiny_llama"], 1.2)
    _job(stopped, 1, ["lora.r=8", "model=tiny_llama"])  # killed: no result.json
    df = build_report(stopped)
    assert list(zip(df["job"], df["lora.r"], df["status"])) == [(0, 4, "succeeded"), (1, 8, "failed"), (2, 16, "not started")]
    out = write_report(stopped)["markdown"]
    assert "3 jobs: 1 succeeded, 1 failed, 1 never started." in out

    rerun = tmp_path / "rerun"
    rerun.mkdir()
    _multirun(rerun, ["lora.r=2,32"])  # the second command's: jobs 0 and 1 replaced, job 2 is the first sweep's
    _job(rerun, 0, ["lora.r=2"], 1.1)
    _job(rerun, 1, ["lora.r=32"], 1.0)
    _job(rerun, 2, ["lora.r=16"], 0.5)
    df = build_report(rerun)
    assert list(zip(df["job"], df["status"])) == [(1, "succeeded"), (0, "succeeded"), (2, "earlier sweep")]
    assert "left by an earlier sweep" in df.set_index("job").loc[2, "error"]
    assert "2 jobs: 2 succeeded, 0 failed. 1 job dir(s) left by an earlier sweep" in write_report(rerun)["markdown"]

    drawn = tmp_path / "optuna"  # a sampler's trials are drawn, not listed: the dirs as they are
    drawn.mkdir()
    _multirun(drawn, ["lora.r=4"], sweeper="hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    _job(drawn, 0, ["lora.r=8"], 1.0)
    assert list(build_report(drawn)["status"]) == ["succeeded"]


def test_jobs_that_ran_other_code_are_marked_and_labels_stay_labels(tmp_path):
    """sweep.skip_done now reuses jobs across an upgrade that only added options: a report mixing jobs an older sectune
    (or another torch, another machine) trained with new ones said nothing of it. A string metric (heldout_split) was
    read as a number gone missing (NaN)."""
    sweep = make_sweep(tmp_path / "sweep", grid=[(0, 4, "1e-4", {"eval_loss": 1.3, "heldout_split": "validation"}),
                                                   (1, 4, "2e-4", {"eval_loss": 1.1, "heldout_split": "validation"}),
                                                   (2, 8, "1e-4", {"eval_loss": 1.2, "heldout_split": "validation"})])
    env = {"sectune": "0.1.0", "sectune_commit": "aaaaaaaaaaaa", "packages": {"torch": "2.13.0", "trl": "1.16.0"}, "device": "cpu: X"}
    for job, commit in ((0, "aaaaaaaaaaaa"), (1, "bbbbbbbbbbbb"), (2, "aaaaaaaaaaaa")):
        res = json.loads((sweep / str(job) / "result.json").read_text())
        (sweep / str(job) / "result.json").write_text(json.dumps({**res, "environment": {**env, "sectune_commit": commit}}))
    out = write_report(sweep)
    df = out["frame"].set_index("job")
    assert df.loc[0, "environment"] == df.loc[2, "environment"] == "E1" and df.loc[1, "environment"] == "E2"
    assert list(df["heldout_split"]) == ["validation"] * 3
    assert "E1: sectune aaaaaaaaaaaa; torch 2.13.0, trl 1.16.0; cpu: X; E2: sectune bbbbbbbbbbbb" in out["markdown"]
    for job in (1,):  # one code for all: no column, no note
        res = json.loads((sweep / str(job) / "result.json").read_text())
        (sweep / str(job) / "result.json").write_text(json.dumps({**res, "environment": env}))
    out = write_report(sweep)
    assert "environment" not in out["frame"].columns and "different code" not in out["markdown"]


def test_an_error_naming_a_hostile_file_reaches_the_terminal_and_report_md_escaped(tmp_path, capsys):
    # a job's result.json keeps its error as raised (runner): a log file an attacker named with an OSC title sequence, a
    # screen clear and a BiDi override; sectune-report printed it raw, so the terminal that showed the table played them
    evil = "/logs/ev\x1b]0;PWNED\x07\x1b[2J\u202eil.log: empty log file"
    root = make_sweep(tmp_path / "sweep", grid=[(0, 4, "1e-4", "failed")])
    res = json.loads((root / "0" / "result.json").read_text())
    (root / "0" / "result.json").write_text(json.dumps({**res, "error": evil}))
    assert main([str(root)]) == 0
    printed = capsys.readouterr().out
    md = (root / "report.md").read_text(encoding="utf-8")
    for text in (printed, md):
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
        assert "/logs/ev\\x1b]0;PWNED\\x07\\x1b[2J\\u202eil.log: empty log file" in text  # still readable, escaped
