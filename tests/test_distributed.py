"""torchrun: one shared run dir (robust to stale notes), rank-0-only writes, same result as 1 process."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sectune.paths import PROJECT_ROOT
from sectune.training import distributed

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


def one_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m sectune ARGS`` as one process, through conftest.cli (forked from the worker's pre-imported server: ~10 s
    of imports less than a plain subprocess); the launchers' ranks below are plain processes, as they must be."""
    from conftest import cli

    return cli(args, cwd=cwd, timeout=600, env={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    single_dir = tmp_path_factory.mktemp("single") / "run"
    proc = one_process([*COMMON, "train.batch_size=4", f"hydra.run.dir={single_dir}"], PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return single_dir


# accelerate's launcher starts torch.distributed.run as torchrun does: its run is in the slow tier (-m slow), to keep make
# test near 10 minutes on 2 cores (9m51s with it, session 28); every later torchrun test here covers the same code path
@pytest.mark.parametrize("launcher", [pytest.param(n, marks=pytest.mark.slow) if n == "accelerate" else n for n in sorted(LAUNCHERS)])
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


# ------------------------------------------------------------------ stage=reward and stage=classify under torchrun


def _one_and_two_processes(tmp_path, args: list[str], batch: int) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The same run as 1 process × ``batch`` rows and as 2 gloo processes × ``batch``/2 (torchrun, one shared run dir)."""
    one, two = tmp_path / "one", tmp_path / "two"
    proc = one_process([*args, f"train.batch_size={batch}", f"hydra.run.dir={one}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([*LAUNCHERS["torchrun"], "-m", "sectune", *args, f"train.batch_size={batch // 2}", f"hydra.run.dir={two}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return one, two, proc


def _same_steps(one: Path, two: Path, steps: int, history: str = "train_history.json") -> None:
    """Loss and gradient norm step by step, at test_two_gloo_processes_match_single_process's tolerances."""
    h_one, h_two = (json.loads((d / history).read_text()) for d in (one, two))
    assert [s for s, _ in h_two["grad_norm"]] == [s for s, _ in h_one["grad_norm"]] == list(range(1, steps + 1))
    for (_, a), (_, b) in zip(h_two["grad_norm"], h_one["grad_norm"]):
        assert a == pytest.approx(b, rel=5e-3)
    assert len(h_two["train"]) == len(h_one["train"]) == steps
    for (_, a), (_, b) in zip(h_two["train"], h_one["train"]):
        assert a == pytest.approx(b, rel=2e-3)


def _same_weights(a: Path, b: Path) -> None:
    """Equal within float tolerance. Adam divides a gradient by its running magnitude, so an element whose gradient is
    ~0 (a LoRA A matrix while its B is still ~0) turns float noise of ~1e-9 into a step of up to the learning rate:
    a handful of such elements may differ by that much; every other one agrees to 1e-5 (without the all-reduce, most
    of them differ by ~the learning rate)."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    off = sum(int((~torch.isclose(wa[k].float(), wb[k].float(), rtol=1e-4, atol=1e-5)).sum()) for k in wa)
    total = sum(v.numel() for v in wa.values())
    assert off <= max(2, total // 1000), f"{off} of {total} weights differ"
    assert max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) < 0.03  # 2 steps × lr 0.01 + margin


def _same_files(one: Path, two: Path, *names: str) -> None:
    """The 2-process run dir holds the files the 1-process one does, no more (no half-written temporaries left by two
    ranks renaming onto one name), and one copy of each of ``names`` outside checkpoints/. (Trainer's checkpoints keep
    each rank's RNG state, ``rng_state_<rank>.pth``, where one process writes ``rng_state.pth``.)"""
    import re

    def files(d: Path) -> set[str]:
        return {re.sub(r"rng_state_\d+\.pth$", "rng_state.pth", str(p.relative_to(d))) for p in d.rglob("*")
                if p.is_file() and "wandb" not in p.parts}
    assert files(two) == files(one), files(two) ^ files(one)
    for name in names:
        found = [p for p in two.rglob(name) if "checkpoints" not in p.relative_to(two).parts]
        assert len(found) == 1, (name, found)


#: fp32: under bf16 autocast the two layouts round differently (step 2's loss ~1.7e-3 apart, at the tolerance); in fp32
#: they agree to ~1e-7, so what differs is the all-reduce, not rounding
REWARD = ["stage=reward", "loss=bradley_terry", "dataset=auth_preferences", "logger=none", "train.max_steps=2",
          "dataset.max_samples=40", "train.precision=fp32", "train.eval_batch_size=1", "train.device=cpu", "lora.dropout=0"]


@pytest.mark.slow  # a torchrun launch of ~25 s on 2 cores: make test-all (make test stays under 10 minutes)
def test_two_gloo_processes_train_the_reward_model_one_process_trains(tmp_path):
    """stage=reward under torchrun: the rewards come from a call of the DDP-wrapped model (it called the body and the head
    of the unwrapped model, so the ranks never all-reduced: step 1's grad norm 1.463 vs 1.333, and two different
    reward models), the held-out pairs are shared out and gathered, and rank 0 alone writes reward_model/."""
    one, two, proc = _one_and_two_processes(tmp_path, REWARD, batch=4)
    _same_steps(one, two, steps=2)
    m1, m2 = (json.loads((d / "result.json").read_text())["metrics"] for d in (one, two))
    assert m2["heldout_pairs"] == m1["heldout_pairs"] >= 10
    kinds = [k for k in m1 if k.startswith("reward_accuracy")]
    assert len(kinds) >= 4 and {k: m2[k] for k in kinds} == {k: m1[k] for k in kinds}  # same pairs, same verdicts
    for k in ("reward_margin", "reward_margin_start", "eval_loss", "score_mean", "score_std", "train_loss"):
        assert m2[k] == pytest.approx(m1[k], rel=2e-3, abs=1e-4), k
    _same_files(one, two, "result.json", "reward_model.json", "adapter_model.safetensors", "loss_curve.png",
              "train_history.json")
    assert proc.stdout.count("sectune: reward model at") == 1, proc.stdout[-3000:]
    _same_weights(one / "reward_model" / "adapter_model.safetensors", two / "reward_model" / "adapter_model.safetensors")


#: class weights that differ between the ranks' rows (Benign ×5), select_best with an evaluation + checkpoint every step
CLASSIFY = ["stage=classify", "dataset=cic_iot_2023_merged", "dataset.max_samples=400", "train.max_steps=3",
            "train.eval_steps=1", "train.learning_rate=3e-3", "loss=cross_entropy", "loss.class_weights={Benign:5.0}",
            "logger=none", "train.precision=fp32", "evaluate.rf_estimators=10", "train.eval_batch_size=1",
            "train.device=cpu", "lora.dropout=0"]


@pytest.mark.slow  # a torchrun launch of ~25 s on 2 cores: make test-all (make test stays under 10 minutes)
def test_two_gloo_processes_classify_as_one_process_does(tmp_path):
    """stage=classify under torchrun: the weighted loss is the global batch's (each rank's own weighted mean, averaged,
    drifted 4.5% by step 2), validation and test rows are scored across the ranks and gathered (every rank keeps the
    same best checkpoint), and rank 0 alone writes the splits, the adapter, the plots and the evaluation files (every
    rank wrote them, racing: a run failed renaming loss_curve.png)."""
    from sectune.paths import shared_data_dir

    sample = shared_data_dir() / "ciciot2023_merged39_family_sample" / "CICIoT2023_sample.csv"
    if not sample.is_file():
        pytest.skip(f"real CIC-IoT sample missing: {sample}")
    one, two, proc = _one_and_two_processes(tmp_path, CLASSIFY, batch=8)
    _same_steps(one, two, steps=3)
    m1, m2 = (json.loads((d / "result.json").read_text())["metrics"] for d in (one, two))
    for k in ("test_accuracy", "test_macro_f1", "val_accuracy", "val_macro_f1", "best_step", "best_val_macro_f1",
              "baseline_test_macro_f1"):
        assert m2[k] == m1[k], (k, m1[k], m2[k])
    rows1, rows2 = (json.loads((d / "evaluation" / "detailed_results.json").read_text())["rows"] for d in (one, two))
    assert len(rows2) == len(rows1) >= 40 and [r["pred"] for r in rows2] == [r["pred"] for r in rows1]
    assert len({r["pred"] for r in rows1}) >= 2  # a model that predicts more than one class: the comparison means something
    _same_files(one, two, "result.json", "labels.json", "normalizer.json", "classifier.json", "train.json",
              "test.json", "adapter_model.safetensors", "loss_curve.png", "train_history.json", "training_metrics.json",
              "confusion_matrix.png", "evaluation_report.txt", "detailed_results.json")
    assert proc.stdout.count("sectune: done ·") == 1, proc.stdout[-3000:]
    _same_weights(one / "adapter" / "adapter_model.safetensors", two / "adapter" / "adapter_model.safetensors")


#: evaluation (eval_causal_stability: early stopping's metric) and a checkpoint every step; 4 test windows generated
CONTRASTIVE = ["stage=contrastive", "loss=causal_contrastive", "dataset=injection_triplets", "dataset.max_samples=40",
               "logger=none", "train.max_steps=2", "train.eval_steps=1", "train.precision=fp32", "train.eval_batch_size=1",
               "train.device=cpu", "lora.dropout=0", "evaluate.max_samples=4", "generation.max_new_tokens=16"]


@pytest.mark.slow  # a torchrun launch of ~25 s on 2 cores: make test-all (make test stays under 10 minutes)
def test_two_gloo_processes_train_contrastive_as_one_process_does(tmp_path):
    """stage=contrastive under torchrun (it was refused: its forward ran the decoder's layers below DDP's wrapper, which
    never all-reduced): the forward goes through one call of the wrapper, so 2 ranks × 2 triplets step as 1 process ×
    4; the validation metrics and the train logs are over every rank's triplets, the attack's generations are shared
    out and gathered (the same answers), and rank 0 alone writes the adapter and injection_eval.json."""
    one, two, proc = _one_and_two_processes(tmp_path, CONTRASTIVE, batch=4)
    _same_steps(one, two, steps=2)
    h1, h2 = (json.loads((d / "train_history.json").read_text()) for d in (one, two))
    assert len(h1["eval"]) == 2 and [v for _, v in h2["eval"]] == pytest.approx([v for _, v in h1["eval"]], rel=1e-5)
    m1, m2 = (json.loads((d / "result.json").read_text())["metrics"] for d in (one, two))
    for k in ("causal_discrimination_start", "causal_discrimination", "causal_stability", "best_eval_causal_stability",
              "attack_success_rate", "clean_verdict_accuracy", "train_loss"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
    w1, w2 = (json.loads((d / "injection_eval.json").read_text())["end"]["windows"] for d in (one, two))
    assert len(w2) == len(w1) == 4 and [w["injected_answer"] for w in w2] == [w["injected_answer"] for w in w1]
    _same_files(one, two, "result.json", "injection_eval.json", "adapter_model.safetensors", "loss_curve.png", "train_history.json")
    assert proc.stdout.count("sectune: done ·") == 1, proc.stdout[-3000:]
    _same_weights(one / "adapter" / "adapter_model.safetensors", two / "adapter" / "adapter_model.safetensors")


# ------------------------------------------------------------------ what a rank other than 0 does (no launcher needed)


def test_a_rank_other_than_0_has_the_warm_up_windows_before_any_process_group_is_up(tmp_path, monkeypatch):
    """sft.warmup_lines under torchrun on a cold cache: rank 0 built the generated windows while the others waited at a
    barrier, a no-op before Trainer starts the process group, so rank 1 read a folder not built yet and the first
    torchrun run of +experiment=auth_grpo_tiny died ("auth_logs folder does not exist", then SIGTERM for rank 0)."""
    from conftest import compose
    from sectune.data import generated_auth_folder

    _env(monkeypatch, 1, MASTER_PORT="29999")
    out = generated_auth_folder(compose([f"paths.cache_dir={tmp_path}", "sft.warmup_lines=1500"]))
    assert (out / "BUILD_INFO.json").is_file() and any((out / "Auth_bin").iterdir())


def test_only_rank_0_writes_the_heuristic_reward_model(tmp_path, monkeypatch):
    """stage=reward's heuristic fallback (reward.force_fallback, or a model that does not fit) has no Trainer: every rank
    wrote reward_model/ through the same temporary folder, and a rank whose folder the other had just renamed away
    failed (FileNotFoundError on .reward_model.tmp/…; 3 torchrun runs of 6). Rank 1 now writes nothing; rank 0 does."""
    from conftest import compose
    from sectune.stages import reward

    cfg = compose(["stage=reward", "loss=bradley_terry", "dataset=auth_preferences", "logger=none"])
    _env(monkeypatch, 1, MASTER_PORT="29999")
    out = reward.heuristic(cfg, tmp_path, [], "test", "reward.force_fallback=true", 0.0)
    assert out["artifacts"] == {"reward_model": "reward_model"} and out["metrics"]["fallback"] == 1
    assert list(tmp_path.iterdir()) == []
    _env(monkeypatch, 0, MASTER_PORT="29999")
    reward.heuristic(cfg, tmp_path, [], "test", "reward.force_fallback=true", 0.0)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["heuristic_reward.json", "reward_model", "reward_model.json"]


def test_a_pipeline_rank_reads_a_steps_result_only_once_rank_0_has_written_it(tmp_path, monkeypatch):
    """Under torchrun every rank runs each pipeline step, but rank 0 alone writes the step's result.json, after the step's
    last collective, and the other ranks read it at once (did it succeed? what does it hand on?). With rank 0's write 3 s
    late (a slow shared filesystem), rank 1 stopped with "pipeline step 'sft' failed (exit 0): no result.json", and the
    succeeded sft step was left "running" (a rerun trains it again). A step that succeeded on a rank ends at a barrier;
    one that failed does not wait there (the other ranks may be inside a collective it left)."""
    from conftest import compose
    from sectune import runner
    from sectune.stages import pipeline

    said = []
    monkeypatch.setattr(distributed, "barrier", lambda: said.append("barrier"))
    step = pipeline.Step("sft", tmp_path / "sft", compose(["logger=none"]), [])
    for code in (0, 1):
        monkeypatch.setattr(runner, "run", lambda cfg, run_dir, code=code: (said.append(f"run {code}"), (code, None))[1])
        assert pipeline.run_step(step) == code
    assert said == ["run 0", "barrier", "run 1"]


def test_only_rank_0_answers_and_writes_in_stage_infer(tmp_path, monkeypatch):
    """stage=infer has no Trainer: under torchrun every rank generated every answer and wrote analyses.json, and the second
    rank's keep-the-earlier-answers step moved the first rank's fresh answers onto analyses.previous.json, over the earlier
    run's (a pipeline's infer step, a rerun in place: the earlier answers were lost, and a first run said it kept some).
    Rank 1 now returns at once; rank 0 answers and writes alone."""
    from conftest import compose
    from sectune.runner import RunContext
    from sectune.stages import infer

    log = tmp_path / "auth.log"
    log.write_text("Dec 10 06:55:46 LabSZ sshd[24200]: Failed password for root from 173.234.31.186 port 38926 ssh2\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "analyses.json").write_text("[]\n")  # an earlier run's answers
    cfg = compose(["stage=infer", "logger=none", f"infer.input_file={log}", "generation.max_new_tokens=4"])
    _env(monkeypatch, 1, MASTER_PORT="29999")
    out = infer.run(RunContext(cfg=cfg, run_dir=run_dir))
    assert out == {"metrics": {}, "artifacts": {}}
    assert sorted(p.name for p in run_dir.iterdir()) == ["analyses.json"] and (run_dir / "analyses.json").read_text() == "[]\n"


# ------------------------------------------------------------------ stage=pipeline under torchrun


#: sft → the heuristic reward model (no Trainer) → infer (no Trainer) and the held-out table, W&B offline
PIPELINE = ["stage=pipeline", "pipeline.steps=[sft,reward,infer]", "logger=wandb", "generation.preview_samples=0",
            "dataset.max_samples=60", "generation.max_new_tokens=24", "pipeline.heldout_max_windows=4",
            "pipeline.heldout_constrained=false", "pipeline.overrides.sft.train.max_steps=2",
            "pipeline.overrides.reward.reward.force_fallback=true", "train.batch_size=2", "train.device=cpu"]


@pytest.mark.slow  # a torchrun launch of ~25 s on 2 cores: make test-all (make test stays under 10 minutes)
def test_a_pipeline_under_torchrun_writes_each_file_once_from_rank_0(tmp_path):
    """Two gloo ranks through a pipeline whose later steps have no Trainer: each step's result.json, reward_model/ and
    analyses.json written once (by rank 0, after which the others go on), and W&B runs opened by rank 0 only: the pipeline
    reopened its own run for the summary on every rank, so rank 1 left a second, never finished run in the pipeline dir."""
    run_dir = tmp_path / "p"
    proc = subprocess.run([*LAUNCHERS["torchrun"], "-m", "sectune", *PIPELINE, f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**ENV, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("sectune: pipeline: done") == 1
    for d in (run_dir, *(run_dir / s for s in ("sft", "reward", "infer"))):
        assert json.loads((d / "result.json").read_text())["status"] == "succeeded", d
    assert sorted(p.name for p in (run_dir / "reward" / "reward_model").iterdir()) == ["heuristic_reward.json", "reward_model.json"]
    assert not (run_dir / "infer" / "analyses.previous.json").exists()  # a first run: no earlier answers to keep
    for step in ("sft", "reward", "infer"):
        assert len(list((run_dir / step / "wandb").glob("offline-run-*"))) == 1, step
    # the pipeline's own run, opened once its steps are over (rank 0's alone)
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


def test_a_sweep_job_that_fails_on_a_rank_ends_the_sweep_on_that_rank(tmp_path):
    """A -m sweep under torchrun whose job failed on one rank only (debug.fail_at_step on rank 1, as a CUDA OOM on one GPU
    would): that rank went on to the next job while rank 0 waited in the failed job's gradient all-reduce, whose peer
    had moved on: both hung (killed after 240 s; ddp_timeout's 30 min, then ranks in different jobs), job 0's result.json
    left "running". The failing rank now exits with the job's code and torchrun ends the others. Here: one process
    that believes it is rank 0 of 2 (no collective), whose job fails on a missing input."""
    from conftest import cli

    sweep = tmp_path / "sweep"
    proc = cli(["-m", "stage=infer", "logger=none", f"infer.input_file={tmp_path / 'nope1'},{tmp_path / 'nope2'}",
                f"hydra.sweep.dir={sweep}"], env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert json.loads((sweep / "0" / "result.json").read_text())["status"] == "failed"
    assert not (sweep / "1").exists()  # the next job never started
    assert "under 2 processes the sweep stops at its first failed job" in proc.stderr, proc.stderr[-3000:]


def test_a_failure_on_rank_1_alone_is_named_in_result_json(tmp_path):
    """Rank 1 dies after step 1 (debug.fail_on_rank=1, as a CUDA OOM on one GPU would); rank 0 then fails in step 2's
    gradient all-reduce with gloo's "Connection closed by peer", and that knock-on was what result.json recorded. It now
    names rank 1 and its error, keeps both ranks' errors, and leaves no hand-over file behind."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([*LAUNCHERS["torchrun"], "-m", "sectune", "logger=none", "generation.preview_samples=0",
                           "train.max_steps=3", "dataset.max_samples=8", "train.batch_size=1", "train.device=cpu",
                           "debug.fail_at_step=1", "debug.fail_on_rank=1", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode != 0
    res = json.loads((run_dir / "result.json").read_text())
    assert res["status"] == "failed"
    assert res["error"].startswith("rank 1 of 2: RuntimeError: debug.fail_at_step=1: simulated interruption"), res["error"]
    assert set(res["rank_errors"]) == {"0", "1"} and "debug.fail_at_step" not in res["rank_errors"]["0"], res["rank_errors"]
    assert distributed.is_knock_on(res["rank_errors"]["0"]), res["rank_errors"]["0"]
    assert not list(run_dir.glob(".sectune_rank*")), list(run_dir.iterdir())


def test_root_cause_prefers_the_first_error_that_is_not_a_knock_on(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    t = time.time()
    distributed.report_rank_error(tmp_path, "RuntimeError: Connection reset by peer")
    monkeypatch.setenv("RANK", "2")
    distributed.report_rank_error(tmp_path, "OutOfMemoryError: CUDA out of memory")
    monkeypatch.setenv("RANK", "0")
    cause, errors = distributed.root_cause(tmp_path, "interrupted (SIGTERM)", t + 1, wait_s=0)
    assert cause == "rank 2 of 3: OutOfMemoryError: CUDA out of memory (rank 0: interrupted (SIGTERM))"
    assert errors == {0: "interrupted (SIGTERM)", 1: "RuntimeError: Connection reset by peer",
                      2: "OutOfMemoryError: CUDA out of memory"}
    assert not list(tmp_path.iterdir())  # read once, then removed
    # rank 0's own error, earlier and not a knock-on, stays the cause; a file from an earlier launch is not read
    monkeypatch.setenv("RANK", "1")
    distributed.report_rank_error(tmp_path, "ValueError: later")
    monkeypatch.setenv("RANK", "2")
    distributed.report_rank_error(tmp_path, "ValueError: stale")
    stale = tmp_path / distributed.RANK_ERROR_FILE.format(2)
    os.utime(stale, (t - 10 ** 6, t - 10 ** 6))
    monkeypatch.setenv("RANK", "0")
    cause, errors = distributed.root_cause(tmp_path, "KeyError: 'x'", t - 5, wait_s=0)
    assert cause == "KeyError: 'x'" and errors == {0: "KeyError: 'x'", 1: "ValueError: later"}
    assert not stale.exists()  # an earlier launch's: removed, not read
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.root_cause(tmp_path, "E", t) == ("E", {})


def test_ctrl_c_on_every_rank_is_the_users_interrupt_not_another_ranks_failure(tmp_path, monkeypatch):
    """Ctrl-C reaches every rank of a launch; rank 1 recording it a moment before rank 0 made result.json say
    "rank 1 of 2: interrupted (SIGINT) (rank 0: interrupted (SIGINT))", a failure of rank 1's."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    t = time.time()
    distributed.report_rank_error(tmp_path, "interrupted (SIGINT)")
    monkeypatch.setenv("RANK", "0")
    cause, errors = distributed.root_cause(tmp_path, "interrupted (SIGINT)", t + 1, wait_s=0)
    assert cause == "interrupted (SIGINT)" and errors == {0: "interrupted (SIGINT)", 1: "interrupted (SIGINT)"}
    # a real failure on rank 1 before the interrupt is still named
    monkeypatch.setenv("RANK", "1")
    distributed.report_rank_error(tmp_path, "ValueError: bad row")
    monkeypatch.setenv("RANK", "0")
    cause, _ = distributed.root_cause(tmp_path, "interrupted (SIGINT)", t + 1, wait_s=0)
    assert cause == "rank 1 of 2: ValueError: bad row (rank 0: interrupted (SIGINT))"


def test_stage_evaluate_runs_on_rank_0_alone_without_a_process_group(tmp_path, monkeypatch):
    """stage=evaluate under torchrun has no Trainer, so no process group to share its scoring over: every rank scored
    everything (rank 0 alone writing). Rank 1 now returns at once, before it reads anything: the bad model dir below is
    rank 0's error to report."""
    from conftest import compose
    from sectune.errors import ConfigError
    from sectune.runner import RunContext
    from sectune.stages import evaluate

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose(["stage=evaluate", "logger=none", f"evaluate.model_dir={tmp_path / 'missing'}"])
    _env(monkeypatch, 1, MASTER_PORT="29999")
    assert evaluate.run(RunContext(cfg=cfg, run_dir=run_dir)) == {"metrics": {}, "artifacts": {}}
    assert not list(run_dir.iterdir())
    _env(monkeypatch, 0, MASTER_PORT="29999")
    with pytest.raises(ConfigError, match="not a directory"):
        evaluate.run(RunContext(cfg=cfg, run_dir=run_dir))


def test_an_error_every_rank_meets_is_said_once_by_rank_0(tmp_path):
    """Under torchrun every rank reads the same command, config and data, so a typo'd key, a malformed data line or a NaN
    loss failed on each rank and each printed the same `sectune: error:` line (2 copies with 2 processes, 8 with 8). A rank
    other than 0 now exits with the same code and leaves its error for rank 0's result.json, saying nothing itself (rank 0
    names a failure of its alone: test_a_failure_on_rank_1_alone_is_named_in_result_json). Here: processes that believe
    they are rank 1 (then 0) of 2, which fail before any collective."""
    from conftest import cli

    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "w", "chosen": "a", "rejected": "b"}\n{"prompt": "broken\n')
    cases = {"lora.rr=3": "Key 'rr' not in 'LoraConfig'",
             f"dataset.path={bad}": "pairs.jsonl: line 2: invalid JSON"}
    for arg, says in cases.items():
        run_dir = tmp_path / arg.split("=")[0]
        args = ["stage=dpo", "loss=dpo", "dataset=auth_preferences", "logger=none", arg, f"hydra.run.dir={run_dir}"]
        for rank in ("1", "0"):
            proc = cli(args, env={"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank})
            assert proc.returncode == 2, (arg, rank, proc.stderr[-2000:])
            assert proc.stderr.count("sectune: error:") == 1 and says in proc.stderr, (arg, rank, proc.stderr[-2000:])
            # a rank 1 with no rank 0 to end it (torchrun would, as rank 0 exits) says its line itself, marked, at the end
            assert ("sectune: error: (rank 1) " in proc.stderr) == (rank == "1"), (arg, rank, proc.stderr[-2000:])
    # rank 1's data error is left for rank 0 to name (and rank 0, failing the same way, names its own)
    res = json.loads((tmp_path / "dataset.path" / "result.json").read_text())
    assert res["status"] == "failed" and "line 2: invalid JSON" in res["error"] and "rank 1" not in res["error"], res


def test_a_rank_that_leaves_its_error_line_to_rank_0_stays_until_rank_0_can_say_it(monkeypatch, capsys):
    """torchrun ends the other ranks as soon as one exits: rank 1, silent since its error is rank 0's to say, exited at once
    while rank 0, a moment behind (a bad key under torchrun: rank 0 was SIGTERMed in 1 launch of 2 here), could be ended before its
    line, and the launch said nothing. Rank 1 now lingers at its exit (cut short when rank 0 exits first)."""
    import atexit

    from sectune import errors

    registered, slept = [], []
    monkeypatch.setattr(atexit, "register", lambda f, *a: registered.append((f, a)))
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(errors, "_lingering", False)
    monkeypatch.setattr(errors, "_left_to_rank_0", [])
    _env(monkeypatch, 1)
    errors.say_error("a")
    errors.say_error("b")
    assert capsys.readouterr().err == "" and registered == [(errors._linger_then_say, ())] and errors.RANK_LINGER_S >= 3
    _env(monkeypatch, 0)
    errors.say_error("a")
    assert capsys.readouterr().err == "sectune: error: a\n" and len(registered) == 1
    # still alive after the linger (rank 0 did not end the launch: it did not meet this error), rank 1 says its own lines
    _env(monkeypatch, 1)
    registered[0][0]()
    assert slept == [errors.RANK_LINGER_S] and capsys.readouterr().err == "sectune: error: (rank 1) a\nsectune: error: (rank 1) b\n"


def test_a_rank_1_error_rank_0_does_not_meet_is_not_lost_and_one_ended_while_it_lingers_says_nothing(tmp_path):
    """A review (session 43): rank 1 left every error line to rank 0, but an error of its own (its node's disk, its GPU's
    memory, its run dir) is not rank 0's: rank 0 then sits in a collective (NCCL: until its timeout) or is ended by
    torchrun before it names it, and the launch failed with no sectune line at all. A rank 1 still there after the linger
    says the line (marked with its rank); one ended during it (torchrun's SIGTERM as rank 0 exits, having said the line
    itself) says nothing."""
    import signal

    from sectune import errors

    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "w", "chosen": "a", "rejected": "b"}\n{"prompt": "broken\n')
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "OMP_NUM_THREADS": "1"}

    def start(run_dir: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "sectune", "stage=dpo", "loss=dpo", "dataset=auth_preferences", "logger=none",
                                 f"dataset.path={bad}", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    alone = start(tmp_path / "alone")
    _, err = alone.communicate(timeout=300)
    assert alone.returncode == 2 and err.count("sectune: error:") == 1, err[-2000:]
    assert "sectune: error: (rank 1) " in err and "pairs.jsonl: line 2: invalid JSON" in err, err[-2000:]
    ended = start(tmp_path / "ended")
    handed = tmp_path / "ended" / distributed.RANK_ERROR_FILE.format(1)
    deadline = time.time() + 300
    while not handed.exists() and ended.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert handed.exists(), ended.communicate()[1][-2000:]
    time.sleep(0.5)  # past the hand-over, into the linger
    assert ended.poll() is None
    ended.send_signal(signal.SIGTERM)
    _, err = ended.communicate(timeout=60)
    assert "sectune: error:" not in err and ended.returncode == -signal.SIGTERM, (ended.returncode, err[-2000:])
    assert errors.RANK_LINGER_S > 1


#: dropout on, so each rank's RNG state (checkpoint-N/rng_state_<rank>.pth) must come back too
RESUME = ["logger=none", "generation.preview_samples=0", "train.batch_size=2", "dataset.max_samples=24", "train.max_steps=6",
          "train.save_steps=2", "lora.dropout=0.1", "train.device=cpu"]


@pytest.mark.slow  # three torchrun launches, ~80 s on 2 cores
def test_a_torchrun_run_interrupted_and_resumed_under_torchrun_matches_one_never_interrupted(tmp_path):
    """An audit (session 43) of train.resume=auto under 2 gloo processes: sft, classify, reward and dpo each resumed to the
    same losses, gradient norms and adapter, bit for bit, as the uninterrupted 2-process run, with one result.json and
    each rank's RNG state in the checkpoint. This keeps it so for sft (the others share engine.train and the record)."""
    from safetensors.torch import load_file

    def launch(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*LAUNCHERS["torchrun"], "-m", "sectune", *RESUME, *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600, env={**ENV, "OMP_NUM_THREADS": "1"})

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert launch(straight).returncode == 0
    broken = launch(resumed, "debug.fail_at_step=3")
    assert broken.returncode != 0 and json.loads((resumed / "result.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in (resumed / "checkpoints" / "checkpoint-2").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    proc = launch(resumed, "train.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sectune: train.resume=auto: resuming from") == 1 and proc.stdout.count("sectune: done ·") == 1
    h1, h2 = (json.loads((d / "train_history.json").read_text()) for d in (straight, resumed))
    assert [s for s, _ in h2["train"]] == list(range(1, 7)) and h2["train"] == h1["train"] and h2["grad_norm"] == h1["grad_norm"]
    w1, w2 = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, resumed))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert json.loads((resumed / "result.json").read_text())["metrics"]["train_loss"] == pytest.approx(
        json.loads((straight / "result.json").read_text())["metrics"]["train_loss"], rel=1e-6)
    assert len(list(resumed.rglob("result.json"))) == 1 and not list(resumed.glob(".sectune_rank*"))


def test_an_earlier_launchs_rank_error_file_is_cleared_when_the_next_run_starts(tmp_path, monkeypatch):
    """Every rank failing alike (a malformed data line under torchrun), rank 0 read the others' error files before rank 1
    had written its own, which then stayed in the run dir (.sectune_rank1_error.json beside a later run's result.json,
    seen after a refused 1-into-2-process resume). Rank 0 clears an earlier launch's as a run starts; this launch's stay."""
    from conftest import compose
    from sectune import runner

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    stale = run_dir / distributed.RANK_ERROR_FILE.format(1)
    stale.write_text('{"time": 0, "error": "ValueError: an earlier launch"}')
    cfg = compose(["stage=dpo", "loss=dpo", "dataset=auth_preferences", "logger=none", f"dataset.path={tmp_path / 'missing.jsonl'}"])
    code, _ = runner.run(cfg, run_dir)
    assert code == 2 and not stale.exists(), sorted(p.name for p in run_dir.iterdir())
    # under torchrun: a file older than this launch goes, one of this launch's (a rank that failed first) stays
    _env(monkeypatch, 0, MASTER_PORT="29999")
    launched = distributed._launcher_identity()[1]
    fresh = run_dir / distributed.RANK_ERROR_FILE.format(2)
    for path, when in ((stale, launched - 60), (fresh, launched + 1)):
        path.write_text("{}")
        os.utime(path, (when, when))
    distributed.clear_earlier_rank_errors(run_dir)
    assert not stale.exists() and fresh.exists()
