"""stage=pipeline: step configs composed and handed on, a failing step and the rerun that continues
without retraining, train.resume=auto inside a step, a per-step typo, and the held-out table."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import FAST, compose, requires_real_data, sectune
from sectune.paths import PROJECT_ROOT

HAS_RL = importlib.util.find_spec("sectune.stages.rl") is not None and (PROJECT_ROOT / "conf/loss/grpo.yaml").is_file()
HAS_DPO = importlib.util.find_spec("sectune.stages.dpo") is not None and (PROJECT_ROOT / "conf/loss/dpo.yaml").is_file()
requires_rl = pytest.mark.skipif(not HAS_RL, reason="stage=rl (sectune/stages/rl.py, conf/loss/grpo.yaml) is not in this tree yet")

#: tiny everything: 60 windows (9 held out), 2 SFT steps, the heuristic reward, 4 table windows, short answers
SMALL = [
    *FAST,
    "stage=pipeline",
    "dataset.max_samples=60",
    "generation.max_new_tokens=48",
    "pipeline.heldout_max_windows=4",
    "pipeline.heldout_constrained=false",
    "pipeline.overrides.sft.train.max_steps=2",
    "pipeline.overrides.reward.reward.force_fallback=true",
]
RL_SMALL = [
    "pipeline.overrides.rl.train.max_steps=2",
    "pipeline.overrides.rl.train.batch_size=2",
    "pipeline.overrides.rl.rl.num_generations=2",
    "pipeline.overrides.rl.rl.max_completion_length=24",
]


#: one intra-op thread: the tiny model's ops are too small to split, and on a busy 2-core machine
#: OpenMP's spinning second thread made these runs 3-20x slower (measured: generation 11 s vs 0.5 s)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run(args: list[str], run_dir: Path):
    return sectune(args, run_dir, env=ONE_THREAD)


def _mtime(p: Path) -> int:
    return p.stat().st_mtime_ns


# ----------------------------------------------------------------------------- composing (no training)
def test_step_configs_are_composed_per_step_and_handed_on(tmp_path):
    from sectune.stages import pipeline

    overrides = ["stage=pipeline", "dataset.max_samples=48", "loss.beta=0.3", "pipeline.overrides.infer.train.max_steps=7",
                 "pipeline.overrides.dpo.model=tiny_gpt2", "pipeline.overrides.sft.debug.fail_at_step=3"]
    cfg = compose(overrides)
    names = ["sft", "reward", *(["rl"] if HAS_RL else []), "dpo", "infer"]
    base = pipeline.step_overrides_base(overrides)
    assert base == ["dataset.max_samples=48", "loss.beta=0.3"]
    steps = {n: pipeline.compose_step(cfg, base, n, tmp_path, names) for n in names}

    want = {"sft": ("causal_lm", "auth_logs"), "reward": ("bradley_terry", "auth_preferences"), "dpo": ("dpo", "auth_preferences"),
            "rl": ("grpo", "auth_logs"), "infer": (cfg.loss.name, "auth_logs")}
    for n, s in steps.items():
        assert s.cfg.stage.name == n and s.dir == tmp_path / n
        assert (s.cfg.loss.name, s.cfg.dataset.name) == want[n], n
        assert s.cfg.dataset.max_samples == 48  # a value set inside a swapped group reaches every step
        assert s.cfg.loss.beta == 0.3
        assert dict(s.cfg.pipeline.overrides) == {}  # a step is not a pipeline
    # per-step values and group choices stay in their step
    assert steps["infer"].cfg.train.max_steps == 7 and steps["sft"].cfg.train.max_steps == -1
    assert steps["dpo"].cfg.model.name == "tiny_gpt2" and steps["sft"].cfg.model.name == "tiny_llama"
    # handoffs: run dirs of the earlier steps
    if HAS_RL:
        assert steps["rl"].cfg.rl.init_from == str(tmp_path / "sft")
        assert steps["rl"].cfg.rl.reward_model == str(tmp_path / "reward")
        # and weighs it (its default weight 0 left the reward step's model trained and unused), recorded in step.json
        assert steps["rl"].cfg.rl.rewards.reward_model == pipeline.REWARD_MODEL_WEIGHT
        assert steps["rl"].merged["rl"]["rewards"]["reward_model"] == pipeline.REWARD_MODEL_WEIGHT
        no_reward = pipeline.compose_step(cfg, base, "rl", tmp_path, ["sft", "rl", "infer"])
        assert no_reward.cfg.rl.rewards.reward_model == 0 and no_reward.cfg.rl.reward_model is None
    assert steps["dpo"].cfg.dpo.init_from == str(tmp_path / "sft")
    # infer answers with the newest policy among the steps (a dpo/ an earlier run left answered [sft, infer] before)
    assert steps["infer"].cfg.infer.model_dir == str(tmp_path / ("rl" if HAS_RL else "dpo"))
    for own, want_dir in ((["sft", "infer"], tmp_path / "sft"), (["sft", "dpo", "infer"], tmp_path / "dpo"), (["infer"], tmp_path)):
        assert pipeline.compose_step(cfg, base, "infer", tmp_path, own).cfg.infer.model_dir == str(want_dir), own
    assert steps["infer"].cfg.infer.input_file == str(tmp_path / "heldout" / "windows")
    # train.resume and debug do not change what a step is (a rerun with train.resume=auto skips done steps)
    cfg2 = compose(["stage=pipeline", "dataset.max_samples=48", "loss.beta=0.3", "train.resume=auto"])
    sft2 = pipeline.compose_step(cfg2, pipeline.step_overrides_base(["dataset.max_samples=48", "loss.beta=0.3", "train.resume=auto"]),
                                 "sft", tmp_path, names)
    assert sft2.cfg.train.resume == "auto" and steps["sft"].cfg.debug.fail_at_step == 3
    assert sft2.skip_digest == steps["sft"].skip_digest
    # a loss option with @package _global_ content (simplified_ppo's train settings) lands on its step only
    if HAS_RL:
        cfg3 = compose(["stage=pipeline", "pipeline.loss.rl=simplified_ppo"])
        rl = pipeline.compose_step(cfg3, [], "rl", tmp_path, names)
        assert rl.cfg.loss.name == "simplified_ppo" and rl.cfg.train.optimizer == "adafactor"
        assert pipeline.compose_step(cfg3, [], "sft", tmp_path, names).cfg.train.optimizer == "adamw"


def test_bad_step_settings_name_the_key(tmp_path):
    from sectune.errors import ConfigError
    from sectune.stages import pipeline

    names = ["sft", "infer"]
    cfg = compose(["stage=pipeline", "pipeline.overrides.sft.train.max_stepz=3"])
    with pytest.raises(ConfigError, match=r"pipeline\.overrides\.sft\.train\.max_stepz"):
        pipeline.compose_step(cfg, [], "sft", tmp_path, names)
    cfg = compose(["stage=pipeline", "pipeline.overrides.sft.train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"pipeline\.overrides\.sft\.train\.max_steps"):
        pipeline.compose_step(cfg, [], "sft", tmp_path, names)
    for bad, key in ((["pipeline.overrides.rll.train.max_steps=1"], "pipeline.overrides.rll"),
                     (["pipeline.steps=[sft,sftt]"], "pipeline.steps"), (["pipeline.steps=[sft,sft]"], "pipeline.steps")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            pipeline.check_steps(compose(["stage=pipeline", *bad]))
    # a step that would train on a held-out window (other split settings than the table's) is refused
    cfg = compose(["stage=pipeline", "pipeline.overrides.sft.dataset.max_samples=40"])
    steps = [pipeline.compose_step(cfg, [], n, tmp_path, names) for n in names]
    with pytest.raises(ConfigError, match=r"step sft would train on \d+ of the \d+ held-out test windows.*max_samples=40"):
        pipeline.check_held_out(steps, steps[-1].cfg, None)


def test_typo_in_a_per_step_override_stops_before_any_step(tmp_path):
    run_dir = tmp_path / "p"
    res = run([*SMALL, "pipeline.steps=[sft,infer]", "pipeline.overrides.infer.infer.batch_sise=2"], run_dir)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "pipeline.overrides.infer.infer.batch_sise" in res.stderr
    assert res.result["status"] == "failed" and not (run_dir / "sft").exists()


@pytest.mark.parametrize("steps, step, needs", [
    ("[infer,sft]", "infer", "sft"), ("[sft,infer,rl]", "infer", "rl"), ("[sft,infer,dpo]", "infer", "dpo"),
    ("[rl,sft]", "rl", "sft"), ("[sft,rl,reward]", "rl", "reward"), ("[dpo,sft]", "dpo", "sft"), ("[evaluate,sft]", "evaluate", "sft"),
])
def test_a_step_listed_before_the_step_it_takes_from_is_an_error(steps, step, needs):
    from sectune.errors import ConfigError
    from sectune.stages import pipeline

    with pytest.raises(ConfigError, match=rf"^pipeline\.steps=\[.*\]: {step} takes .* from the {needs} step, which runs after it; "
                                          rf"list {needs} before {step}$"):
        pipeline.check_steps(compose(["stage=pipeline", f"pipeline.steps={steps}"]))


def test_step_orders_that_hand_on_or_need_nothing_are_accepted():
    from sectune.stages import pipeline

    for steps in ("[sft,reward,rl,dpo,infer]", "[sft,dpo,infer]", "[reward,sft]", "[infer]", "[sft,infer]", "[sft,evaluate]"):
        assert pipeline.check_steps(compose(["stage=pipeline", f"pipeline.steps={steps}"])) == steps[1:-1].split(",")
    # evaluate takes sft's run dir only when evaluate.model_dir is unset (pipeline.handoffs)
    assert pipeline.check_steps(compose(["stage=pipeline", "pipeline.steps=[evaluate,sft]", "evaluate.model_dir=/elsewhere"])) == ["evaluate", "sft"]


def test_infer_before_sft_stops_before_any_step(tmp_path):
    run_dir = tmp_path / "p"
    res = run([*SMALL, "pipeline.steps=[infer,sft]"], run_dir)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == ("sectune: error: pipeline.steps=[infer, sft]: infer takes the policy that answers: "
                                                   "the newest of rl → dpo → sft among this pipeline's steps (infer.model_dir) from the sft "
                                                   "step, which runs after it; list sft before infer")
    assert res.result["status"] == "failed" and not (run_dir / "sft").exists() and not (run_dir / "infer").exists()


def test_a_later_steps_bad_value_stops_the_pipeline_before_its_first_step(tmp_path):
    run_dir = tmp_path / "p"
    res = run([*SMALL, "pipeline.steps=[sft,rl]", "pipeline.overrides.rl.rl.temperature=0"], run_dir)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == ("sectune: error: pipeline step rl: rl.temperature=0.0: must be > 0 "
                                                   "(GRPO samples its completions)")
    assert res.result["status"] == "failed" and not (run_dir / "sft").exists()


def test_a_weighted_reward_model_without_a_reward_step_stops_before_the_first_step(tmp_path):
    """[sft, rl] with rl.rewards.reward_model weighted (auth_grpo's 0.1) trained SFT in full, then failed at rl."""
    run_dir = tmp_path / "p"
    res = run([*SMALL, "pipeline.steps=[sft,rl]", "pipeline.overrides.rl.rl.rewards.reward_model=0.1"], run_dir)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(
        "sectune: error: pipeline step rl: rl.rewards.reward_model=0.1 weighs a reward model, but rl.reward_model is not set")
    assert res.result["status"] == "failed" and not (run_dir / "sft").exists()


# ----------------------------------------------------------------------------- end to end
def test_the_infer_step_on_held_out_windows_cut_from_generated_logs_says_so_in_its_result_json(tmp_path):
    """An audit (a fresh clone without ../shared): `make run`'s sft, reward, rl and dpo steps recorded generated_data in
    their result.json, its infer step none, though it answered the held-out windows the pipeline cut from the same
    generated logs: its JSON and schema rates read as an analyst's on real logs."""
    run_dir = tmp_path / "p"
    res = run([*SMALL, "pipeline.steps=[sft,infer]", f"paths.shared_data={tmp_path / 'none'}"], run_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    got = {s: json.loads((run_dir / s / "result.json").read_text()).get("generated_data") for s in ("sft", "infer")}
    assert got["sft"] and got["infer"] == got["sft"]


def test_a_folder_of_held_out_windows_keeps_saying_they_were_generated_to_a_later_run_that_reads_it(tmp_path, monkeypatch):
    """The note travels with the windows (a hidden file, which stage=infer does not read as a log): `stage=infer
    infer.input_file=<pipeline dir>/heldout/windows` run on its own records the generated logs too; real windows, none."""
    from sectune import runner
    from sectune.evaluation.analyst_eval import Window
    from sectune.evaluation.pipeline_heldout import write_windows
    from sectune.infer_inputs import read_inputs

    windows = [Window("w1", "synthetic", "p", "Dec 10 sshd[1]: Failed password for root\n", {})]
    stand_in = [{"dataset": "auth_logs", "path": str(tmp_path / "cache" / "auth")}]
    write_windows(tmp_path / "gen", windows, stand_in)
    write_windows(tmp_path / "real", windows)
    monkeypatch.setattr(runner, "resolve_stage", lambda name: lambda ctx: {"metrics": {"n": len(read_inputs(ctx.cfg.infer.input_file))}})
    for name, want in (("gen", stand_in), ("real", None)):
        code, _ = runner.run(compose(["stage=infer", "logger=none", f"infer.input_file={tmp_path / name}"]), tmp_path / f"r_{name}")
        result = json.loads((tmp_path / f"r_{name}" / "result.json").read_text())
        assert code == 0 and result["metrics"]["n"] == 1 and result.get("generated_data") == want, name


@requires_real_data
@requires_rl
@pytest.mark.slow  # ~15 s: two pipelines (make test stays under 10 minutes; make test-all runs it)
@pytest.mark.skipif(not HAS_DPO, reason="stage=dpo is not in this checkout")
def test_a_step_after_one_that_trained_again_starts_afresh_instead_of_resuming_the_old_inputs_checkpoints(tmp_path):
    """train.resume=auto after changing the sft step: sft trained again, then dpo resumed its checkpoint trained from
    the old sft weights, against the new reference, without a word (an audit, session 42)."""
    run_dir = tmp_path / "p"
    args = [*SMALL, "pipeline.steps=[sft,dpo]", "pipeline.heldout_table=false", "dataset.max_samples=16",
            "pipeline.overrides.dpo.train.max_steps=3", "pipeline.overrides.dpo.train.save_steps=1", "pipeline.overrides.dpo.train.batch_size=2"]
    assert run([*args, "pipeline.overrides.dpo.debug.fail_at_step=2"], run_dir).returncode != 0
    assert (run_dir / "dpo" / "checkpoints" / "checkpoint-1").is_dir()
    again = run([*args, "pipeline.overrides.sft.train.learning_rate=0.002", "train.resume=auto"], run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step 2/2 dpo: train.resume=auto: sft trained in this run" in again.stdout and "trains afresh" in again.stdout
    assert "resuming from" not in again.stdout
    assert json.loads((run_dir / "dpo" / "result.json").read_text())["status"] == "succeeded"


@requires_real_data
@requires_rl
def test_failed_rl_step_then_rerun_continues_without_retraining(tmp_path):
    run_dir = tmp_path / "p"
    steps = ["sft", "reward", "rl", *(["dpo"] if HAS_DPO else []), "infer"]
    args = [*SMALL, f"pipeline.steps=[{','.join(steps)}]", *RL_SMALL, "pipeline.overrides.dpo.train.max_steps=2"]

    broken = run([*args, "pipeline.overrides.rl.debug.fail_at_step=1"], run_dir)
    assert broken.returncode != 0
    res = broken.result
    assert res["status"] == "failed" and "'rl' failed" in res["error"] and "fail_at_step" in res["error"], res
    for step in ("sft", "reward"):
        done = json.loads((run_dir / step / "result.json").read_text())
        assert done["status"] == "succeeded", (step, done)
    assert json.loads((run_dir / "rl" / "result.json").read_text())["status"] == "failed"
    assert (run_dir / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "infer").exists() and not (run_dir / "report.md").exists()
    before = {s: _mtime(run_dir / s / "result.json") for s in ("sft", "reward")}

    fixed = run(args, run_dir)  # the same command without the fault
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    for s in ("sft", "reward"):
        assert f"step {steps.index(s) + 1}/{len(steps)} {s}: skipped" in fixed.stdout
        assert _mtime(run_dir / s / "result.json") == before[s], f"{s} was retrained"
    res = fixed.result
    assert res["status"] == "succeeded"
    assert {s: res["artifacts"][s] for s in steps} == {s: s for s in steps}
    for s in steps:
        assert json.loads((run_dir / s / "result.json").read_text())["status"] == "succeeded"
    rl = json.loads((run_dir / "rl" / "result.json").read_text())
    assert rl["metrics"]["train_steps"] == 2
    infer = json.loads((run_dir / "infer" / "result.json").read_text())
    assert json.loads((run_dir / "infer" / "analyses.json").read_text())[0]["model_used"] == "rl"
    m = res["metrics"]
    for k in ("heldout_json_valid_rate", "heldout_schema_valid_rate", "heldout_verdict_macro_f1", "sft_verdict_macro_f1",
              "baseline_verdict_macro_f1", "rl_verdict_macro_f1"):
        assert isinstance(m[k], (int, float)), (k, m)
    assert m["json_valid_rate"] == infer["metrics"]["json_valid_rate"]  # the last step's metrics are repeated
    assert m["heldout_windows"] == 4 and m["steps_skipped"] == 2

    report = (run_dir / "report.md").read_text()
    for row in ("base (untrained tiny_llama)", "| SFT |", "SFT+GRPO", "rule engine", "TF-IDF + LR", "majority class", "| Linux |", "| OpenSSH |"):
        assert row in report, row
    if HAS_DPO:
        assert "SFT+DPO" in report and isinstance(m["dpo_verdict_macro_f1"], (int, float))
    table = json.loads((run_dir / "heldout.json").read_text())
    assert {w["source"] for w in table["windows"]} == {"Linux", "OpenSSH"}
    rules = next(r for r in table["rows"] if r["kind"] == "rules")
    assert rules["verdict_accuracy"] == 1.0 and rules["field_f1"] == 1.0  # it wrote the annotations
    # the best policy is chosen on the validation windows, never on the test table's own numbers
    val = table["validation_scores"]
    assert set(val) == {r["name"] for r in table["rows"] if r["kind"] == "policy" and r["step"] not in (None, "base") and not r["constrained"]}
    assert table["best_policy"] in val and table["best_policy_chosen_on"] == "verdict macro-F1 on the 4 validation windows"
    assert val[table["best_policy"]]["verdict_macro_f1"] == max(v["verdict_macro_f1"] for v in val.values())
    assert m["heldout_val_verdict_macro_f1"] == val[table["best_policy"]]["verdict_macro_f1"]  # what a sweep ranks by
    assert "The best policy was chosen by verdict macro-F1 on the 4 validation windows, never on these test windows." in report
    # the bar's claim with its noise: the best policy vs TF-IDF + LR, a paired bootstrap interval over the windows
    best = next(r for r in table["rows"] if r["name"] == table["best_policy"])
    lo, hi = best["vs_tfidf_lr_ci95"]
    assert lo <= best["vs_tfidf_lr_diff"] <= hi and (m["heldout_vs_baseline_ci95_low"], m["heldout_vs_baseline_ci95_high"]) == (lo, hi)
    assert f"{best['name']} against TF-IDF + LR: {best['vs_tfidf_lr_diff']:+.3f} verdict macro-F1, 95% CI {lo:+.3f}" in report
    # and what GRPO added to the SFT policy (the SFT+GRPO >= SFT), with its interval
    rl = next(r for r in table["rows"] if r["step"] == "rl" and not r["constrained"])
    sft = next(r for r in table["rows"] if r["step"] == "sft")
    assert rl["vs_sft_diff"] == pytest.approx(rl["verdict_macro_f1"] - sft["verdict_macro_f1"]) and m["rl_vs_sft_verdict_macro_f1"] == rl["vs_sft_diff"]
    assert m["rl_vs_sft_ci95_low"] <= rl["vs_sft_diff"] <= m["rl_vs_sft_ci95_high"] and "SFT+GRPO against SFT: " in report

    report_text = (run_dir / "report.md").read_text()
    (run_dir / "report.md").write_text("STALE TABLE FROM AN EARLIER CONFIG")  # heldout.json was written before it
    again = run(args, run_dir)  # nothing left to do: every step skipped, the table reused
    assert again.returncode == 0, again.stderr[-2000:]
    assert (run_dir / "report.md").read_text() == report_text and "STALE" not in again.stdout  # rendered from heldout.json
    said = [line for line in again.stdout.splitlines() if line.startswith("sectune: pipeline: step")]
    assert len(said) == len(steps) and all(": skipped (" in line for line in said), said
    assert "held-out table: nothing it depends on changed" in again.stdout
    assert again.result["metrics"]["heldout_verdict_macro_f1"] == m["heldout_verdict_macro_f1"]

    # the pipeline dir copied elsewhere is the same run: the steps handed each other paths under the old dir,
    # yet nothing is retrained and the table is reused (before, every step from reward on ran again)
    moved = tmp_path / "elsewhere" / "p"
    shutil.copytree(run_dir, moved)
    there = run(args, moved)
    assert there.returncode == 0, there.stderr[-2000:]
    said = [line for line in there.stdout.splitlines() if line.startswith("sectune: pipeline: step")]
    assert len(said) == len(steps) and all(": skipped (" in line for line in said), said
    assert "held-out table: nothing it depends on changed" in there.stdout


@requires_real_data
def test_resume_auto_inside_a_pipeline_step(tmp_path):
    run_dir = tmp_path / "p"
    args = [*FAST, "stage=pipeline", "pipeline.steps=[sft]", "pipeline.heldout_table=false", "dataset.max_samples=30",
            "dataset.val_fraction=0", "train.batch_size=2", "pipeline.overrides.sft.train.max_steps=4",
            "pipeline.overrides.sft.train.save_steps=2"]
    broken = run([*args, "pipeline.overrides.sft.debug.fail_at_step=3"], run_dir)
    assert broken.returncode != 0 and "'sft' failed" in broken.result["error"]
    ckpt = run_dir / "sft" / "checkpoints" / "checkpoint-2"
    assert (ckpt / "trainer_state.json").is_file()
    # mark the checkpoint: a run that resumes from it carries its log history on, a fresh one cannot
    state = json.loads((ckpt / "trainer_state.json").read_text())
    first = next(r for r in state["log_history"] if r.get("step") == 1 and "loss" in r)
    first["loss"] = 123.25
    (ckpt / "trainer_state.json").write_text(json.dumps(state))

    resumed = run([*args, "train.resume=auto"], run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = dict(json.loads((run_dir / "sft" / "train_history.json").read_text())["train"])
    assert history[1] == 123.25, "the sft step did not resume from its checkpoint"
    assert sorted(history) == [1, 2, 3, 4]
    assert resumed.result["metrics"]["train_steps"] == 4


@requires_rl
def test_seed_000_presets_compose_every_step(tmp_path):
    """+experiment=auth_grpo (the 8B real-model path), its tiny twin (make run) and auth_dpo, step by step."""
    from sectune.errors import ConfigError
    from sectune.stages import pipeline

    def steps_of(overrides):
        cfg = compose(overrides)
        names = pipeline.check_steps(cfg)
        return {n: pipeline.compose_step(cfg, pipeline.step_overrides_base(overrides), n, tmp_path, names).cfg for n in names}

    real = steps_of(["+experiment=auth_grpo"])
    assert list(real) == ["sft", "reward", "rl", "infer"]
    for c in real.values():
        assert (c.model.name, c.quantization.name, c.lora.name) == ("deepseek_r1_distill_llama_8b", "nf4", "r4_attention")
        assert c.quantization.bnb_4bit_use_double_quant and c.model.max_seq_length == 1024 and c.model.device_map == "auto"
        assert c.train.batch_size == 1 and c.train.learning_rate == 2e-5
    assert (real["sft"].train.grad_accum, real["sft"].train.optimizer) == (16, "adafactor")
    assert (real["rl"].train.grad_accum, real["rl"].loss.name, real["rl"].rl.lr_scale) == (4, "grpo", 0.5)
    assert real["rl"].rl.rewards.reward_model > 0 and real["rl"].rl.reward_model == str(tmp_path / "reward")
    assert (real["reward"].train.optimizer, real["reward"].train.weight_decay, real["reward"].reward.fallback) == ("adamw", 0.01, "heuristic")

    tiny = steps_of(["+experiment=auth_grpo_tiny"])
    assert list(tiny) == ["sft", "reward", "rl", "dpo", "infer"]
    assert {c.model.name for c in tiny.values()} == {"tiny_llama"} and {c.quantization.name for c in tiny.values()} == {"none"}
    # the from-scratch tiny analyst: full-weight SFT, then LoRA adapters on those weights for RL and DPO
    assert tiny["sft"].lora.name == "none" and {tiny[s].lora.name for s in ("rl", "dpo")} == {"r16_all_linear"}
    assert tiny["dpo"].dpo.init_from == str(tmp_path / "sft") and tiny["sft"].model.tiny.num_layers == 4
    # the tiny reward model trains all the SFT weights (reward.init_from=sft → this pipeline's sft dir); seed 000's
    # starts from the base model
    assert (tiny["reward"].lora.name, tiny["reward"].reward.init_from) == ("none", str(tmp_path / "sft"))
    assert real["reward"].reward.init_from is None
    # the tiny reward model trains in fp32, as it did before its forward went through accelerate's autocast
    assert tiny["reward"].train.precision == "fp32" and tiny["sft"].train.precision == "bf16"
    with pytest.raises(ConfigError, match="reward.init_from=sft names this pipeline's sft step, but pipeline.steps runs none before reward"):
        steps_of(["+experiment=auth_grpo_tiny", "pipeline.steps=[reward,rl,infer]"])
    # SFT trains on the cut spans and the table (the infer step's config) fits TF-IDF + LR on the same windows;
    # the preference and RL steps keep the plain windows; no repetition penalty on the copy-heavy answers
    assert {n: c.dataset.subwindows for n, c in tiny.items()} == {"sft": 1, "reward": 0, "rl": 0, "dpo": 0, "infer": 1}
    # only the SFT warms up on generated windows; the later steps start from its weights
    assert {n: c.sft.warmup_lines for n, c in tiny.items()} == {"sft": 10000, "reward": 0, "rl": 0, "dpo": 0, "infer": 0}
    assert {c.generation.repetition_penalty for c in tiny.values()} == {1.0} and real["infer"].generation.repetition_penalty == 1.2

    dpo = steps_of(["+experiment=auth_dpo"])
    assert list(dpo) == ["sft", "dpo", "infer"] and dpo["dpo"].loss.name == "dpo" and dpo["dpo"].train.grad_accum == 4


def test_step_digest_counts_paths_under_the_pipeline_dir_relative_to_it(tmp_path):
    from sectune.stages import pipeline

    (tmp_path / "elsewhere").write_text("a\n")
    (tmp_path / "other").write_text("other\n")

    def digest(root, other=tmp_path / "elsewhere"):
        cfg = compose(["stage=rl", f"rl.init_from={root}/sft", f"rl.reward_model={root}/reward", f"dataset.path={other}"])
        return pipeline.skip_digest(cfg, Path(root))

    assert digest("/a/run") == digest("/b/moved/run")
    # a data file outside the pipeline counts by what it holds (session 44: by its place, which a re-clone moves)
    assert digest("/a/run") != digest("/a/run", other=tmp_path / "other")
    # a sibling whose name starts like the pipeline's is not under it: /a/run2 stays a path of its own
    cfg = compose(["stage=rl", "rl.init_from=/a/run2/sft"])
    assert pipeline.skip_digest(cfg, Path("/a/run")) != pipeline.skip_digest(compose(["stage=rl", "rl.init_from=/b/run2/sft"]), Path("/b/run"))


def test_step_digest_does_not_hold_the_checkouts_place(tmp_path):
    """Session 44: a pipeline's step digest held paths.cache_dir (<checkout>/.cache) and the data paths' places
    (<checkout>/../shared/data, a user's file), so a checkout moved or cloned again retrained every finished step. The
    data counts by its files (names, sizes, times: data_fingerprint): the same file elsewhere is the same run, another
    file (or the same one edited) is not."""
    import os
    import shutil

    from sectune import pipeline_record
    from sectune.stages import pipeline

    for place in ("a", "b"):
        (tmp_path / place / "shared").mkdir(parents=True)
        (tmp_path / place / "shared" / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    os.utime(tmp_path / "b" / "shared" / "pairs.jsonl", ns=(10**18, 10**18))
    shutil.copy2(tmp_path / "b" / "shared" / "pairs.jsonl", tmp_path / "a" / "shared" / "pairs.jsonl")  # copied, its time kept

    def cfg(place, *extra):
        root = tmp_path / place
        return compose(["stage=reward", "dataset=auth_preferences", f"paths.cache_dir={root}/.cache", f"paths.shared_data={root}/shared",
                        f"dataset.path={root}/shared/pairs.jsonl", *extra])

    def digest(place, *extra):
        return pipeline.skip_digest(cfg(place, *extra), tmp_path / place / "outputs" / "pipe")

    assert digest("a") == digest("b")
    assert digest("a") != digest("a", "train.max_steps=7")
    (tmp_path / "b" / "shared" / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "b", "rejected": "a"}\n')  # edited
    assert digest("a") != digest("b")
    # a step recorded before (its digest held the places) in a moved checkout: the saved config is the same apart from them
    (tmp_path / "step" / ".hydra").mkdir(parents=True)
    from omegaconf import OmegaConf

    OmegaConf.save(cfg("a", f"paths.cache_dir={tmp_path}/old/.cache"), tmp_path / "step" / ".hydra" / "config.yaml")
    from types import SimpleNamespace

    assert pipeline_record.same_but_newer_defaults(SimpleNamespace(dir=tmp_path / "step", cfg=cfg("a")))


def test_place_free_digests_count_data_by_its_bytes_not_its_size_and_time(tmp_path):
    """Session 44 (a review of the change above): without the data's place, a file counted by its name, size and time
    alone, so another file of one size and time (unpacked from one archive) was the same data for a pipeline step
    (skip_digest), a sweep job (place_free_digest) and a resume at another place (place.<key>); and a copy without its
    times (cp -r) was other data. The place-free digests count the files' bytes."""
    import os

    from sectune.run_digest import config_digest
    from sectune.stages import pipeline
    from sectune.training.checkpoints import data_places

    rows = {"a": '{"prompt": "p", "chosen": "a", "rejected": "b"}\n', "b": '{"prompt": "p", "chosen": "b", "rejected": "a"}\n'}
    for place, text in rows.items():  # one size, one time, other bytes
        (tmp_path / place / "shared").mkdir(parents=True)
        (tmp_path / place / "shared" / "pairs.jsonl").write_text(text)
        os.utime(tmp_path / place / "shared" / "pairs.jsonl", ns=(10**18, 10**18))

    def cfg(place):
        root = tmp_path / place
        return compose(["stage=reward", "dataset=auth_preferences", f"paths.cache_dir={root}/.cache", f"paths.shared_data={root}/shared",
                        f"dataset.path={root}/shared/pairs.jsonl"])

    def digests(place):
        c = cfg(place)
        return (pipeline.skip_digest(c, tmp_path / place / "outputs" / "pipe"), config_digest(c, portable=True),
                data_places(c, {"dataset.path": "x"})["place.dataset.path"])

    a, b = digests("a"), digests("b")
    assert all(x != y for x, y in zip(a, b)), (a, b)
    (tmp_path / "b" / "shared" / "pairs.jsonl").write_text(rows["a"])  # the same bytes, now at another time
    assert digests("b") == a


def test_a_contrastive_quick_check_step_is_not_the_step_a_run_without_debug_trains(tmp_path):
    """Session 44 (helper E saw it): skip_digest and the saved-config comparison dropped all of ``debug``, so a pipeline's
    contrastive step run with debug.enabled=true (4 steps on 16 triplets) was reused by the same pipeline run without it.
    Fault injection (debug.fail_at_step) still does not count, nor debug.enabled where no stage reads it."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from sectune import pipeline_record
    from sectune.stages import pipeline

    def cfg(*extra):
        return compose(["stage=contrastive", "loss=causal_contrastive", "dataset=injection_triplets", *extra])

    def digest(*extra):
        return pipeline.skip_digest(cfg(*extra), tmp_path / "pipe")

    assert digest() != digest("debug.enabled=true")
    assert digest("debug.enabled=true") != digest("debug.enabled=true", "debug.max_steps=8")
    assert digest() == digest("debug.fail_at_step=3")
    sft = ["stage=sft", "dataset=auth_logs"]
    assert pipeline.skip_digest(compose(sft), tmp_path) == pipeline.skip_digest(compose([*sft, "debug.enabled=true"]), tmp_path)
    (tmp_path / "step" / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg("debug.enabled=true"), tmp_path / "step" / ".hydra" / "config.yaml")
    assert not pipeline_record.same_but_newer_defaults(SimpleNamespace(dir=tmp_path / "step", cfg=cfg()))
    assert pipeline_record.same_but_newer_defaults(SimpleNamespace(dir=tmp_path / "step", cfg=cfg("debug.enabled=true")))
    OmegaConf.save(cfg(), tmp_path / "step" / ".hydra" / "config.yaml")
    assert not pipeline_record.same_but_newer_defaults(SimpleNamespace(dir=tmp_path / "step", cfg=cfg("debug.enabled=true")))
    assert pipeline_record.same_but_newer_defaults(SimpleNamespace(dir=tmp_path / "step", cfg=cfg("debug.fail_at_step=3")))


def test_a_newer_sectune_with_extra_default_keys_still_skips_finished_steps(tmp_path):
    """A step that succeeded under an older schema (no ``federated`` node, no ``rl.heldout_windows``) is
    the same step when the new keys sit at their defaults; any real difference still reruns it."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from sectune import pipeline_record

    cfg = compose(["stage=rl", "train.max_steps=3"])
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["federated"], old["rl"]["heldout_windows"]
    old["train"]["resume"] = "auto"  # how to run, not what: ignored
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(old), tmp_path / ".hydra" / "config.yaml")
    step = SimpleNamespace(dir=tmp_path, cfg=cfg)
    assert pipeline_record.same_but_newer_defaults(step)
    for change in (["train.max_steps=4"], ["rl.heldout_windows=5"], ["federated.rounds=7"]):
        assert not pipeline_record.same_but_newer_defaults(SimpleNamespace(dir=tmp_path, cfg=compose(["stage=rl", "train.max_steps=3", *change]))), change
    old["rl"]["gone_key"] = 1  # a key this sectune no longer has
    OmegaConf.save(OmegaConf.create(old), tmp_path / ".hydra" / "config.yaml")
    assert not pipeline_record.same_but_newer_defaults(step)


def test_a_step_trained_before_injection_text_groups_is_not_the_same_step_under_its_new_default(tmp_path):
    """dataset.injection_text_groups came with default similar; runs before it split the injection texts as containment
    does. A step trained then is the same step only under containment, not under the default that split otherwise."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from sectune import pipeline_record

    old = OmegaConf.to_container(compose(["stage=sft", "dataset=injection_triplets"]), resolve=True)
    del old["dataset"]["injection_text_groups"]
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(old), tmp_path / ".hydra" / "config.yaml")
    step = lambda *o: SimpleNamespace(dir=tmp_path, cfg=compose(["stage=sft", "dataset=injection_triplets", *o]))  # noqa: E731
    assert not pipeline_record.same_but_newer_defaults(step())
    assert pipeline_record.same_but_newer_defaults(step("dataset.injection_text_groups=containment"))


def test_a_key_listed_in_added_keys_compares_at_its_older_value_not_its_default(tmp_path, monkeypatch):
    """A step recorded before a key existed did what run_digest.ADDED_KEYS says runs did then: the same step under that
    value, another step under a new default that differs from it."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from sectune import pipeline_record, run_digest

    default = compose(["stage=rl"]).rl.heldout_windows
    monkeypatch.setattr(run_digest, "ADDED_KEYS", {**run_digest.ADDED_KEYS, "rl.heldout_windows": default + 3})
    old = OmegaConf.to_container(compose(["stage=rl"]), resolve=True)
    del old["rl"]["heldout_windows"]
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(old), tmp_path / ".hydra" / "config.yaml")
    step = lambda *o: SimpleNamespace(dir=tmp_path, cfg=compose(["stage=rl", *o]))  # noqa: E731
    assert pipeline_record.same_but_newer_defaults(step(f"rl.heldout_windows={default + 3}"))
    assert not pipeline_record.same_but_newer_defaults(step())


def test_a_moved_pipeline_dir_under_a_newer_sectune_still_skips_finished_steps(tmp_path):
    """Both at once: the step's saved config names the old pipeline dir (rl.init_from=<old>/sft) and lacks a key a
    newer sectune added at its default. Paths under one consistent old dir count as the same; any other path not."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from sectune import pipeline_record

    new_root = tmp_path / "moved" / "p"
    step_dir = new_root / "rl"
    (step_dir / ".hydra").mkdir(parents=True)

    def saved(init_from: str, reward_model: str) -> None:
        old = OmegaConf.to_container(compose(["stage=rl", "train.max_steps=3", f"rl.init_from={init_from}",
                                              f"rl.reward_model={reward_model}"]), resolve=True)
        del old["rl"]["heldout_windows"]
        OmegaConf.save(OmegaConf.create(old), step_dir / ".hydra" / "config.yaml")

    step = SimpleNamespace(dir=step_dir, cfg=compose(["stage=rl", "train.max_steps=3", f"rl.init_from={new_root}/sft",
                                                      f"rl.reward_model={new_root}/reward"]))
    saved("/old/run/sft", "/old/run/reward")
    assert pipeline_record.same_but_newer_defaults(step)
    for init_from, reward_model in (("/old/run/sft", "/other/run/reward"),   # two different old dirs
                                    ("/old/run/dpo", "/old/run/reward"),     # another step's dir
                                    ("/old/run/sft", "/old/run/reward_2")):
        saved(init_from, reward_model)
        assert not pipeline_record.same_but_newer_defaults(step), (init_from, reward_model)


def test_a_run_killed_while_recording_a_changed_step_does_not_pass_it_as_finished(tmp_path, monkeypatch):
    """Step A succeeded; a rerun with a changed config (B) dies while recording the step. Whatever was written
    by then, the next rerun with B must rerun the step, not reuse A's result (step.json goes first)."""
    from omegaconf import OmegaConf

    from sectune import runner
    from sectune import pipeline_record
    from sectune.stages import pipeline

    def step(max_steps: int):
        cfg = compose(["stage=rl", f"train.max_steps={max_steps}"])
        return pipeline.Step("rl", tmp_path / "p" / "rl", cfg, ["stage=rl", f"train.max_steps={max_steps}"])

    a, b = step(2), step(50)
    pipeline_record.record_step(a)
    runner.write_json_atomic(a.dir / "result.json", {"status": "succeeded", "config_digest": runner.config_digest(a.cfg)})
    assert pipeline_record.already_done(a) is not None and pipeline_record.already_done(b) is None

    written = []
    real_text, real_json = pipeline_record.write_text_atomic, pipeline_record.write_json_atomic

    def dies_after(n):
        def write(path, obj):
            if len(written) == n:
                raise KeyboardInterrupt("killed")
            written.append(path.name)
            (real_json if path.suffix == ".json" else real_text)(path, obj)
        return write

    for n in range(3):  # killed before the 1st, 2nd or 3rd file of B's record
        pipeline_record.record_step(a)
        written.clear()
        monkeypatch.setattr(pipeline_record, "write_text_atomic", dies_after(n))
        monkeypatch.setattr(pipeline_record, "write_json_atomic", dies_after(n))
        with pytest.raises(KeyboardInterrupt):
            pipeline_record.record_step(b)
        monkeypatch.undo()
        assert pipeline_record.already_done(b) is None, (n, written)
        assert OmegaConf.load(a.dir / ".hydra" / "config.yaml").train.max_steps == (50 if "config.yaml" in written else 2)
    pipeline_record.record_step(b)  # recorded whole: B is itself, not done until it runs
    assert pipeline_record.already_done(b) is None and json.loads((b.dir / "step.json").read_text())["config_digest"] == runner.config_digest(b.cfg)


def test_a_finished_step_is_not_reused_on_other_data_or_without_its_artifacts(tmp_path):
    """Real logs downloaded after a run on generated ones: every step was skipped (the config fallback for newer
    sectune defaults matched), and the table then scored models trained on the generated windows. A step whose
    adapter was deleted was skipped too."""
    import shutil as sh

    from sectune import pipeline_record, runner
    from sectune.stages import pipeline

    shared = tmp_path / "shared"
    shared.mkdir()

    def finished_step(name: str):  # a step that succeeded on the data as it is now
        over = ["stage=sft", "train.max_steps=2", f"paths.shared_data={shared}"]
        step = pipeline.Step("sft", tmp_path / name / "sft", compose(over), over)
        pipeline_record.record_step(step)
        (step.dir / "adapter").mkdir()
        runner.write_json_atomic(step.dir / "result.json", {"status": "succeeded", "config_digest": runner.config_digest(step.cfg),
                                                            "artifacts": {"adapter": "adapter"}})
        assert pipeline_record.already_done(step) is not None
        return step

    step = finished_step("p")
    sh.rmtree(step.dir / "adapter")
    assert pipeline_record.already_done(step) is None
    (step.dir / "adapter").mkdir()
    (shared / "loghub_openssh_2k").mkdir()
    log = shared / "loghub_openssh_2k" / "OpenSSH_2k.log"
    log.write_text("Dec 10 06:55:46 LabSZ sshd[1]: Invalid user a from 1.2.3.4\n")
    assert pipeline_record.already_done(step) is None  # its step.json and result.json still say "this config, succeeded"
    # a user's file edited in place to the same size (a word replaced by another as long): other data too
    step = finished_step("q")
    size, mtime = log.stat().st_size, log.stat().st_mtime_ns
    log.write_text(log.read_text().replace("Invalid user a", "Invalid user b"))
    os.utime(log, ns=(mtime + 1_000_000_000, mtime + 1_000_000_000))  # a second later, as an edit is
    assert log.stat().st_size == size and pipeline_record.already_done(step) is None


def test_a_step_is_not_reused_when_an_earlier_step_finished_after_it_started(tmp_path):
    """An attempt retrained sft and was stopped in dpo: dpo's earlier result (trained on the sft before) was put back
    and the next rerun skipped dpo and infer, exit 0."""
    from sectune import pipeline_record, runner
    from sectune.stages import pipeline

    def finished(name, started, done):
        over = [f"stage={name}", "train.max_steps=2", f"paths.shared_data={tmp_path / 'none'}"]
        step = pipeline.Step(name, tmp_path / "p" / name, compose(over), over)
        pipeline_record.record_step(step)
        runner.write_json_atomic(step.dir / "result.json", {"status": "succeeded", "config_digest": runner.config_digest(step.cfg),
                                                            "started": started, "finished": done})
        return step

    sft = finished("sft", "2026-12-06T10:00:00+00:00", "2026-12-06T10:05:00+00:00")
    dpo = finished("dpo", "2026-12-06T10:05:00+00:00", "2026-12-06T10:06:00+00:00")
    assert pipeline_record.already_done(dpo, [sft]) is not None
    sft = finished("sft", "2026-12-06T11:00:00+00:00", "2026-12-06T11:05:00+00:00")  # retrained; dpo's result is the old one
    assert pipeline_record.already_done(sft, []) is not None
    assert pipeline_record.already_done(dpo, [sft]) is None and pipeline_record.already_done(dpo) is not None
    runner.write_json_atomic(sft.dir / "result.json", {**json.loads((sft.dir / "result.json").read_text()), "finished": "garbled"})
    assert pipeline_record.already_done(dpo, [sft]) is None  # an unreadable time: run it again, the safe side


def test_an_infer_step_is_not_reused_once_its_input_file_is_edited(tmp_path):
    from sectune import pipeline_record, runner
    from sectune.stages import pipeline

    log = tmp_path / "auth.log"
    log.write_text("Dec 10 06:55:46 LabSZ sshd[1]: Invalid user a from 1.2.3.4\n")
    over = ["stage=infer", f"infer.input_file={log}", f"paths.shared_data={tmp_path / 'none'}"]
    step = pipeline.Step("infer", tmp_path / "p" / "infer", compose(over), over)
    pipeline_record.record_step(step)
    runner.write_json_atomic(step.dir / "result.json", {"status": "succeeded", "config_digest": runner.config_digest(step.cfg)})
    assert pipeline_record.already_done(step) is not None
    mtime = log.stat().st_mtime_ns
    log.write_text(log.read_text().replace("user a", "user b"))
    os.utime(log, ns=(mtime + 1_000_000_000, mtime + 1_000_000_000))
    assert pipeline_record.already_done(step) is None


def test_a_finished_step_whose_checkpoints_were_deleted_to_save_space_is_still_reused(tmp_path):
    from sectune import pipeline_record, runner
    from sectune.stages import pipeline

    over = ["stage=sft", "train.max_steps=2", f"paths.shared_data={tmp_path / 'none'}"]
    step = pipeline.Step("sft", tmp_path / "p" / "sft", compose(over), over)
    pipeline_record.record_step(step)
    (step.dir / "adapter").mkdir()
    runner.write_json_atomic(step.dir / "result.json", {"status": "succeeded", "config_digest": runner.config_digest(step.cfg),
                                                        "artifacts": {"adapter": "adapter", "checkpoints": "checkpoints",
                                                                      "loss_curve": "plots/loss_curve.png"}})
    assert pipeline_record.already_done(step) is not None  # only the weights count


def test_a_loss_or_dataset_choice_for_the_whole_pipeline_is_refused_not_dropped():
    """`stage=pipeline loss=simplified_ppo` ran GRPO: each step takes pipeline.loss.<step>, and the choice was dropped."""
    from sectune.errors import ConfigError
    from sectune.stages import pipeline

    with pytest.raises(ConfigError, match=r"^loss=simplified_ppo: stage=pipeline gives each step its own loss \(pipeline.loss.<step>, "
                                          r"e.g. pipeline.loss.rl=simplified_ppo\)"):
        pipeline.step_overrides_base(["stage=pipeline", "loss=simplified_ppo"])
    with pytest.raises(ConfigError, match=r"^dataset=hdfs: .*pipeline.dataset.sft=hdfs"):
        pipeline.step_overrides_base(["dataset=hdfs", "train.max_steps=2"])
    assert pipeline.step_overrides_base(["loss.beta=0.3", "dataset.max_samples=4"]) == ["loss.beta=0.3", "dataset.max_samples=4"]


def test_a_pipeline_step_in_a_sweep_is_not_scored_by_the_sweeps_objective(tmp_path, monkeypatch):
    """sweep.objective names the pipeline's number (heldout_val_verdict_macro_f1); each step's result lacks it, and every
    step was failed as an unscorable trial."""
    from sectune import sweeps
    from sectune.stages import pipeline

    monkeypatch.setattr(sweeps, "in_multirun", lambda: True)
    over = ["stage=plan", "sweep.objective=heldout_val_verdict_macro_f1", "logger=none"]
    step = pipeline.Step("plan", tmp_path / "p" / "plan", compose(over), over)
    step.dir.mkdir(parents=True)
    assert pipeline.run_step(step) == 0
    assert json.loads((step.dir / "result.json").read_text())["status"] == "succeeded"


def test_a_step_that_would_load_an_earlier_steps_policy_onto_another_model_stops_the_pipeline_before_any_step_runs(tmp_path):
    """An audit (session 25): `pipeline.overrides.sft.model=tiny_gpt2` trained a GPT-2 adapter, then the dpo step (on
    tiny_llama) could not load it: found after the SFT step had trained."""
    run = sectune([*SMALL, "pipeline.steps=[sft,dpo]", "pipeline.overrides.sft.model=tiny_gpt2"], tmp_path / "p")
    assert run.returncode == 2, run.stderr[-2000:]
    assert ("pipeline step dpo, before any step runs: it starts from the sft step's policy (dpo.init_from), which trains "
            "model=tiny_gpt2" in run.stderr and "this step loads model=tiny_llama" in run.stderr)
    assert not (tmp_path / "p" / "sft" / "result.json").exists()


def test_each_pipeline_step_reports_its_own_peak_gpu_memory(tmp_path, monkeypatch):
    """A step's result.json carried the largest GPU peak of every step before it (only peak RSS was restarted per step):
    seed 000's reward step on one GPU reported the SFT step's peak. Each step now restarts both."""
    import torch

    from sectune.stages import pipeline
    from sectune.training import engine

    calls = []
    monkeypatch.setattr(engine, "reset_peak_rss", lambda: calls.append("rss") or True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append("cuda"))
    engine.reset_peaks()
    assert calls == ["rss", "cuda"]

    steps = []
    monkeypatch.setattr(engine, "reset_peaks", lambda: steps.append(len(steps)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    over = ["stage=plan", "logger=none"]
    for name in ("a", "b"):
        step = pipeline.Step("plan", tmp_path / "p" / name, compose(over), over)
        step.dir.mkdir(parents=True)
        assert pipeline.run_step(step) == 0
    assert steps == [0, 1]


def test_a_steps_own_value_that_replaces_the_command_lines_is_said(tmp_path, capsys):
    """An audit (session 36): `+experiment=auth_grpo_tiny train.max_steps=1` still ran the reward, rl and dpo steps for
    20, 24 and 15 steps (the preset's pipeline.overrides come last, as documented), without a word at run time."""
    from sectune.stages import pipeline

    overrides = ["+experiment=auth_grpo_tiny", "train.max_steps=1", "lora=r4_attention"]
    cfg = compose(overrides)
    base = pipeline.step_overrides_base(overrides)
    names = list(cfg.pipeline.steps)
    step = pipeline.compose_step(cfg, base, "rl", tmp_path, names)
    assert step.cfg.train.max_steps == 24
    out = capsys.readouterr().out
    assert "pipeline step rl: " in out and "lora=r16_all_linear (pipeline.overrides.rl) replaces the command line's lora=r4_attention" in out
    assert "train.max_steps=24 (pipeline.overrides.rl) replaces the command line's train.max_steps=1" in out
    pipeline.compose_step(cfg, base, "infer", tmp_path, names)
    assert "replaces" not in capsys.readouterr().out


def test_the_pipelines_wandb_run_ends_as_the_pipeline_does_and_shares_its_steps_group(tmp_path):
    """The pipeline opened its W&B run, closed it (exit 0) before step 1 and reopened one only when every step succeeded: a
    failed or interrupted pipeline was "finished" in W&B, and its run sat in another group than its steps (a sweep's
    job-0 steps of every sweep shared group "0"). Trainer's callback also wrote its own ``debug: []`` over the run's
    ``debug`` settings, so a debug run read in W&B as a full one (an audit, session 39)."""
    from wandb_records import runs_in

    run_dir = tmp_path / "pipe"
    args = ["stage=pipeline", "pipeline.steps=[sft,infer]", "pipeline.heldout_table=false", "logger=wandb",
            "generation.preview_samples=0", "dataset.max_samples=16", "train.batch_size=4", "train.max_steps=2",
            "generation.max_new_tokens=8", "pipeline.heldout_max_windows=2"]
    env = {"WANDB_MODE": "offline"}
    failed = sectune([*args, "debug.fail_at_step=1"], run_dir, env=env)
    assert failed.returncode != 0, failed.stderr[-2000:]
    (own,), (sft,) = runs_in(run_dir), runs_in(run_dir / "sft")
    assert own["exit_code"] != 0 and own["summary"]["status"] == "failed", own
    assert sft["exit_code"] != 0 and sft["config"]["debug"]["fail_at_step"] == 1, sft["config"].get("debug")
    assert own["group"] == sft["group"] == f"{tmp_path.name}/pipe" and sft["name"] == f"{tmp_path.name}/pipe/sft"
    assert (own["job_type"], sft["job_type"]) == ("pipeline", "sft")

    done = sectune(args, run_dir, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    own = runs_in(run_dir)
    assert [r["exit_code"] for r in own] == [1, 0] and own[1]["summary"]["status"] == "succeeded"
    (infer,) = runs_in(run_dir / "infer")
    assert own[1]["group"] == infer["group"] == f"{tmp_path.name}/pipe"


def test_a_policy_that_did_not_start_from_the_sft_step_is_not_called_its_continuation(tmp_path):
    """GRPO from a fresh adapter on the base model (rl.init_from=null, rl.allow_fresh_adapter=true) was labelled
    "SFT+GRPO" and compared with SFT as what GRPO added to it (an audit, session 42)."""
    from types import SimpleNamespace

    from conftest import compose
    from sectune import runner
    from sectune.evaluation import pipeline_heldout as H

    def step(name, **metrics):
        d = tmp_path / name
        runner.write_json_atomic(d / "result.json", {"stage": name, "status": "succeeded", "metrics": metrics,
                                                     "artifacts": {"adapter": "adapter"}})
        return SimpleNamespace(name=name, cfg=compose(["logger=none", *(["stage=rl", "loss=grpo"] if name == "rl" else [])]), dir=d)

    eval_cfg = compose(["logger=none"])
    assert [r[0] for r in H.policy_rows([step("sft"), step("rl", fresh_adapter=0)], eval_cfg)][1:] == ["SFT", "SFT+GRPO"]
    assert [r[0] for r in H.policy_rows([step("sft"), step("rl", fresh_adapter=1)], eval_cfg)][1:] == ["SFT", "GRPO"]


def test_only_a_policy_that_continued_sft_is_measured_against_it():
    from sectune.evaluation.analyst_eval import Row
    from sectune.evaluation.analyst_scoring import compare

    truth = ["benign", "malicious", "suspicious", "benign"]
    rows = [Row("SFT", "policy", truth, step="sft"), Row("GRPO", "policy", ["benign"] * 4, step="rl"),
            Row("SFT+DPO", "policy", ["benign"] * 4, step="dpo"), Row("TF-IDF + LR (verdict only)", "baseline", truth)]
    scores = {r.name: {"verdict_macro_f1": 0.5} for r in rows}
    compare(rows, scores, truth, rows[3], rows[0], 0)
    assert "vs_sft_diff" in scores["SFT+DPO"] and "vs_sft_diff" not in scores["GRPO"]
