"""Bad inputs found by an audit of the CLI: each gets one line naming the key or file and a non-zero exit,
before any data or model loads where it can; and a failed rerun never costs a succeeded run its result."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from conftest import cli, compose, sectune
from sectune.errors import ConfigError


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate=0", "train.learning_rate"),
    ("train.learning_rate=-1", "train.learning_rate"),
    ("train.eval_batch_size=0", "train.eval_batch_size"),
    ("infer.batch_size=0", "infer.batch_size"),
    ("infer.window_lines=-1", "infer.window_lines"),
    ("stage=evaluate dataset=hdfs evaluate.bigram_alpha=0", "evaluate.bigram_alpha"),  # was NaN scores, then a traceback
    ("generation.max_new_tokens=0", "generation.max_new_tokens"),
    ("generation.top_p=0", "generation.top_p"),
    ("generation.repetition_penalty=0", "generation.repetition_penalty"),
    ("train.epochs=0", "train.epochs"),
    ("train.max_steps=0", "train.max_steps"),  # "succeeded" with an untrained adapter
    ("train.resume=autoo", "train.resume"),  # found after the model loaded
    # found after the data and the model loaded (and W&B started a run)
    ("train.optimizer=sgd", "train.optimizer"),
    ("train.precision=fp8", "train.precision"),
    ("train.packing=foo", "train.packing"),
    ("train.device=tpu", "train.device"),
    ("stage=classify classify.pooling=max", "classify.pooling"),
    ("stage=classify classify.subword_dropout=1.5", "classify.subword_dropout"),
    ("train.warmup_ratio=2", "train.warmup_ratio"),
    ("train.max_grad_norm=-1", "train.max_grad_norm"),
    ("train.save_steps=-1", "train.save_steps"),
    ("loss.label_smoothing=1.5", "loss.label_smoothing"),
    ("lora.r=0", "lora.r"),
    ("lora.alpha=-1", "lora.alpha"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("lora.bias=bogus", "lora.bias"),
    # the words before the last one say where the value is used (its stage, loss or preset)
    ("stage=dpo dataset=auth_preferences loss=dpo loss.beta=0", "loss.beta"),  # the DPO loss is log 2 for every pair: no gradient
    ("stage=dpo dataset=auth_preferences loss=dpo loss.beta=-0.1", "loss.beta"),
    ("stage=dpo dataset=auth_preferences loss=dpo dpo.sft_weight=-1", "dpo.sft_weight"),  # was found only after the models loaded
    ("stage=dpo dataset=auth_preferences loss=dpo loss=causal_lm", "loss"),  # DPO ran with causal_lm's beta 0.04, unchecked
    ("stage=rl loss=grpo rl.lr_scale=0", "rl.lr_scale"),
    ("stage=rl loss=simplified_ppo rl.lr_scale=-0.5", "rl.lr_scale"),
    ("stage=rl loss=grpo rl.temperature=0", "rl.temperature"),  # was a traceback from torch.multinomial
    ("stage=rl loss=grpo rl.top_p=0", "rl.top_p"),  # the same traceback
    ("stage=rl loss=grpo rl.top_p=1.5", "rl.top_p"),
    ("stage=rl loss=grpo rl.max_completion_length=0", "rl.max_completion_length"),  # was transformers' ValueError
    ("stage=rl loss=grpo rl.num_iterations=0", "rl.num_iterations"),  # trained 0 steps and saved the adapter
    ("stage=rl loss=grpo rl.num_generations=1", "rl.num_generations"),  # found after the memory check
    ("stage=rl loss=grpo rl.rewards.verdict=-1", "rl.rewards.verdict"),  # rewarded wrong verdicts, without a word
    ("stage=rl loss=grpo rl.rewards.reward_model=0.5", "rl.rewards.reward_model"),  # weighted, no rl.reward_model
    ("stage=rl loss=grpo rl.eval_steps=-1", "rl.eval_steps"),
    ("stage=rl loss=grpo rl.heldout_windows=-1", "rl.heldout_windows"),  # scored all windows but the last
    ("stage=rl loss=grpo loss.beta=-0.04", "loss.beta"),
    ("stage=rl loss=grpo loss.clip_epsilon=0", "loss.clip_epsilon"),
    ("quantization=nf4 quantization.bnb_4bit_quant_type=int4", "quantization.bnb_4bit_quant_type"),
    ("quantization=nf4 quantization.bnb_4bit_compute_dtype=bf32", "quantization.bnb_4bit_compute_dtype"),
    ("quantization=nf4 quantization.bnb_4bit_compute_dtype=auto", "quantization.bnb_4bit_compute_dtype"),
    ("quantization=nf4 quantization.load_in_8bit=true", "quantization.load_in_8bit"),
    ("sweep.direction=up", "sweep.direction"),
    ("stage=federated federated.batch_size=0", "federated.batch_size"),  # was silently train.batch_size
    ("stage=federated federated.lr_schedule=cosin", "federated.lr_schedule"),  # was found after Ray and round 0
    ("stage=federated federated.client_num_cpus=0", "federated.client_num_cpus"),  # crashed Ray's pool, then hung
    ("stage=federated federated.dp=true federated.dp_noise_multiplier=-1", "federated.dp_noise_multiplier"),  # Flower's traceback
    ("stage=contrastive loss=causal_contrastive train.eval_steps=10 train.save_steps=15", "train.save_steps"),  # after loading
    ("stage=federated federated.dp=true federated.dp_clipping_norm=0", "federated.dp_clipping_norm"),
    ("stage=federated federated.client_num_gpus=-1", "federated.client_num_gpus"),  # (and any > 0 on a machine without CUDA)
    ("dataset.split_seed=-1", "dataset.split_seed"),  # every dataset: numpy's seed range (was a traceback in classify)
    ("stage=classify dataset=text_label_csv dataset.skip_bad_lines=true", "dataset.skip_bad_lines"),  # was accepted, then ignored
    ("stage=reward dataset=auth_preferences dataset.skip_bad_lines=true", "dataset.skip_bad_lines"),
    # session 45 (a fuzz of every key's value): a traceback, a nan loss blamed on the learning rate after training, or
    # a setting silently taken for another
    ("generation.preview_samples=-1", "generation.preview_samples"),  # previewed every validation window but one
    ("stage=sft sft.warmup_lines=300 sft.warmup_epochs=nan", "sft.warmup_epochs"),  # transformers' ValueError traceback
    ("stage=sft sft.warmup_lines=-1", "sft.warmup_lines"),
    ("stage=contrastive loss=causal_contrastive debug.enabled=true debug.max_steps=0", "debug.max_steps"),  # an epoch, not a check
    ("stage=contrastive loss=causal_contrastive debug.enabled=true debug.max_samples=-1", "debug.max_samples"),
    ("stage=reward dataset=auth_preferences loss=bradley_terry loss.margin=nan", "loss.margin"),  # a nan loss
    ("stage=reward dataset=auth_preferences loss=bradley_terry loss.margin=inf", "loss.margin"),
    ("stage=rl loss=grpo loss.beta=inf", "loss.beta"),  # nan scores while sampling, "a learning rate too high"
    ("stage=rl loss=grpo rl.lr_scale=inf", "rl.lr_scale"),
    ("stage=federated federated.dp=true federated.dp_noise_multiplier=inf", "federated.dp_noise_multiplier"),  # a nan adapter
    ("stage=federated federated.dp=true federated.dp_clipping_norm=inf", "federated.dp_clipping_norm"),
    ("model.tiny.hidden_size=0", "model.tiny.hidden_size"),  # ZeroDivisionError traceback in the build
    ("model.tiny.intermediate_size=-1", "model.tiny.intermediate_size"),  # torch's negative-dimension traceback
    ("model.tiny.num_layers=0", "model.tiny.num_layers"),  # a model of no layer: "lora.target_modules not in model"
    ("model.tiny.max_position_embeddings=-1", "model.tiny.max_position_embeddings"),  # trained as a succeeded run
    ("model.tiny.init_std=nan", "model.tiny.init_std"),  # huggingface_hub's validation traceback
    ("model.tiny.init_std=-1", "model.tiny.init_std"),
    ("model.device_map=[1]", "model.device_map"),  # AttributeError traceback: a list is not a mapping of modules
    ("model.device_map=nan", "model.device_map"),
    ("stage=pipeline pipeline.heldout_batch_size=0", "pipeline.heldout_batch_size"),  # after every step: range() step 0
    ("stage=pipeline pipeline.heldout_batch_size=-1", "pipeline.heldout_batch_size"),  # no answer: sklearn's traceback
])
def test_values_no_run_can_use_are_errors_naming_the_key(override, key):
    from sectune.config_checks import check_values

    *context, bad = override.split()
    context += ["lora=r4_attention"] if key.startswith("lora.") else []  # lora.* matter only with an adapter
    check_values(compose(context))  # the defaults pass
    with pytest.raises(ConfigError, match=rf"^{key}="):
        check_values(compose([*context, bad]))


def test_simulated_federated_clients_on_cuda_need_a_gpu_share_from_ray():
    """Ray sets CUDA_VISIBLE_DEVICES="" in an actor that asks for no GPU: with train.device=cuda and
    federated.client_num_gpus=0 every client failed in round 1 ("no CUDA device is visible"), on a GPU machine."""
    from unittest import mock

    from sectune.config_checks import check_values

    with mock.patch("torch.cuda.is_available", return_value=True):
        with pytest.raises(ConfigError, match=r"^federated.client_num_gpus=0.0: with train.device=cuda"):
            check_values(compose(["stage=federated", "train.device=cuda"]))
        check_values(compose(["stage=federated", "train.device=cuda", "federated.client_num_gpus=0.2"]))
        check_values(compose(["stage=federated", "train.device=cuda", "federated.runtime=deployment"]))
        check_values(compose(["stage=federated"]))  # auto: the stage says the clients train on the CPU


def test_a_preference_stage_on_other_data_is_refused_before_anything_loads():
    """stage=dpo dataset=auth_logs was refused only after the model had loaded."""
    from sectune.config_checks import check_values

    for stage in (["stage=dpo", "loss=dpo"], ["stage=reward", "loss=bradley_terry"]):
        with pytest.raises(ConfigError, match=rf"^dataset=auth_logs: {stage[0]} trains on preference pairs: use dataset=auth_preferences"):
            check_values(compose([*stage, "dataset=auth_logs"]))
        check_values(compose([*stage, "dataset=auth_preferences"]))
    check_values(compose(["stage=dpo", "loss=dpo", "dataset=injection_preferences"]))


def test_stage_and_preset_values_are_checked_only_where_they_are_used():
    from sectune.config_checks import check_values

    check_values(compose(["stage=rl", "loss=simplified_ppo", "rl.lr_scale=0.5"]))
    # no sampling, no reward: a GRPO setting under simplified_ppo was ignored without a word (a missing reward model too)
    for bad in ("rl.temperature=0", "rl.max_completion_length=0", "rl.num_generations=8", "rl.reward_model=/no/such/run",
                "rl.rewards.verdict=1", "rl.keep_best=false"):
        with pytest.raises(ConfigError, match=rf"^{'rl.rewards' if 'rewards' in bad else bad.split('=')[0]}=.*is a GRPO setting; loss=simplified_ppo"):
            check_values(compose(["stage=rl", "loss=simplified_ppo", bad]))
    check_values(compose(["stage=rl", "loss=grpo", "loss.beta=0"]))  # GRPO without its KL term
    check_values(compose(["stage=sft", "rl.lr_scale=0", "loss.beta=0"]))
    check_values(compose(["quantization.bnb_4bit_quant_type=int4"]))  # quantization=none reads none of it
    check_values(compose(["quantization=int8", "quantization.bnb_4bit_compute_dtype=bf32"]))


def test_a_4bit_compute_dtype_takes_sectunes_or_torchs_names():
    import torch

    from sectune.models import modeling

    for name, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("fp32", torch.float32)):
        q = modeling.quantization_config(compose(["quantization=nf4", f"quantization.bnb_4bit_compute_dtype={name}"]))
        assert q.bnb_4bit_compute_dtype == dtype and q.bnb_4bit_quant_type == "nf4"
    with pytest.raises(ConfigError, match=r"^quantization.bnb_4bit_quant_type=int4: choose nf4 or fp4"):
        modeling.quantization_config(compose(["quantization=nf4", "quantization.bnb_4bit_quant_type=int4"]))


def test_4bit_settings_under_int8_are_said_to_be_unread(capsys):
    """An audit (session 41): quantization=int8 trained with bnb_4bit_quant_type=int4 (any 4-bit key) without a word; it
    is not refused (a sweep over quantization=int8,nf4 shares its 4-bit settings), it is said."""
    from sectune.models import modeling

    assert modeling.quantization_config(compose(["quantization=int8"])).load_in_8bit
    assert capsys.readouterr().err == ""
    modeling.quantization_config(compose(["quantization=int8", "quantization.bnb_4bit_quant_type=int4", "quantization.bnb_4bit_compute_dtype=fp32"]))
    assert ("quantization.bnb_4bit_quant_type=int4, quantization.bnb_4bit_compute_dtype=fp32: 4-bit settings; quantization=int8 "
            "(8-bit) reads none of them") in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["loss.temperature=0"], r"^loss.temperature=0.0: must be > 0"),
    (["loss.temperature=nan"], r"^loss.temperature=nan: must be > 0"),
    (["loss.lambda_separation=-1"], r"^loss.lambda_separation=-1.0: must be >= 0"),
    (["loss.lambda_task=nan"], r"^loss.lambda_task=nan: must be >= 0"),
    (["loss.lambda_consistency=0", "loss.lambda_separation=0", "loss.lambda_task=0"],
     r"^loss.lambda_consistency, loss.lambda_separation, loss.lambda_task: all 0"),
])
def test_contrastive_loss_weights_and_temperature_are_errors_naming_the_key(overrides, message):
    from sectune.stages import contrastive

    base = ["stage=contrastive", "loss=causal_contrastive", "dataset=injection_triplets"]
    contrastive.check_config(compose(base))
    contrastive.check_config(compose([*base, "loss.lambda_task=0", "loss.lambda_separation=0"]))  # one term is enough
    with pytest.raises(ConfigError, match=message):
        contrastive.check_config(compose([*base, *overrides]))


def test_the_unused_reward_chunk_size_is_gone():
    with pytest.raises(Exception, match=r"chunk_size"):  # Hydra: Key 'chunk_size' not in 'RewardConfig'
        compose(["reward.chunk_size=4"])


def test_cli_stops_on_a_zero_grpo_temperature_before_loading_anything(tmp_path):
    run = sectune(["stage=rl", "loss=grpo", "logger=none", "rl.temperature=0", "dataset.path=/nonexistent/never/read"], tmp_path / "run")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == "sectune: error: rl.temperature=0.0: must be > 0 (GRPO samples its completions)"
    assert run.result["status"] == "failed"


def test_a_bad_sweep_direction_stops_the_optuna_sweep_before_its_study(tmp_path):
    proc = cli(["-m", "hparams_search=sft_optuna", "stage=plan", "logger=none", "sweep.direction=up",
                f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["sectune: error: sweep.direction=up: choose minimize or maximize"]
    assert not (tmp_path / "sweep").exists()


def test_a_temperature_is_checked_when_sampling_and_refused_when_greedy_decoding_would_ignore_it():
    from sectune.config_checks import check_values

    check_values(compose([]))  # greedy with the default temperature and top_p: nothing to say
    for key in ("temperature=0.7", "top_p=0.5"):  # greedy decoding reads neither: the value did nothing
        with pytest.raises(ConfigError, match=rf"^generation.{key.split('=')[0]}=.*has no effect while generation.do_sample=false"):
            check_values(compose([f"generation.{key}"]))
    check_values(compose(["generation.temperature=0.7", "generation.do_sample=true"]))
    with pytest.raises(ConfigError, match=r"^generation.temperature=-1.0: must be > 0 when generation.do_sample=true"):
        check_values(compose(["generation.temperature=-1", "generation.do_sample=true"]))


def test_cli_stops_on_a_zero_learning_rate_before_loading_anything(tmp_path):
    run = sectune(["stage=sft", "logger=none", "train.learning_rate=0", "dataset.path=/nonexistent/never/read"], tmp_path / "run")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == "sectune: error: train.learning_rate=0.0: must be a number > 0"
    assert run.result["status"] == "failed"


def test_a_run_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        run = sectune(["stage=plan", "logger=none"], target)
        assert run.returncode == 2, run.stderr[-1500:]
        assert run.stderr.strip().splitlines() == [f"sectune: error: {target}: "
                                                  f"{'File exists' if target.name == 'afile' else 'Not a directory'}: "
                                                  "cannot create the run dir there (hydra.run.dir, or hydra.sweep.dir for -m)"]


def test_a_mistyped_config_option_names_the_option_and_what_there_is_not_the_run_dir(tmp_path):
    # Hydra's MissingConfigException is an OSError: it used to be reported as a run dir that cannot be created
    for args, missing, offered in ((["dataset=prompt_injection"], "dataset/prompt_injection", "prompt_injections"),
                                   (["+experiment=hdfs_detec"], "experiment/hdfs_detec", "hdfs_detect")):
        run = sectune([*args, "logger=none"], tmp_path / "run")
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and lines[0] == f"sectune: error: In 'config': Could not find '{missing}'", run.stderr[-1500:]
        assert f"\t{offered}" in lines and not any("run dir" in line or "search path" in line for line in lines)


def _succeeded_run(run_dir: Path, stage: str, artifacts: dict[str, str]) -> dict:
    for rel in artifacts.values():
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_text("kept")
    result = {"stage": stage, "status": "succeeded", "metrics": {"x": 1}, "artifacts": artifacts, "config_digest": "old"}
    (run_dir / "result.json").write_text(json.dumps(result))
    past = time.time() - 60
    for p in [run_dir, *run_dir.rglob("*")]:
        os.utime(p, (past, past))
    return result


def test_a_restored_contrastive_run_names_its_best_checkpoint_where_the_failed_rerun_set_it_aside(tmp_path):
    """A fresh rerun moves the succeeded run's checkpoints to checkpoints/earlier/ and fails: the result put back named
    checkpoints/checkpoint-2, a folder gone (or the failed attempt's own checkpoint-2). Left alone: a result whose
    checkpoints were not moved by this attempt (an older earlier/ holds another attempt's)."""
    from sectune.runner import relocate_set_aside
    from sectune.training.checkpoints import set_aside_earlier

    run_dir = tmp_path / "r"
    result = _succeeded_run(run_dir, "contrastive", {"adapter": "adapter/adapter_model.safetensors",
                                                      "best_checkpoint": "checkpoints/checkpoint-2/adapter_model.safetensors"})
    result["artifacts"]["best_checkpoint"] = "checkpoints/checkpoint-2"
    since = time.time() - 30
    assert relocate_set_aside(run_dir, result, since) == result  # nothing moved yet
    set_aside_earlier(run_dir / "checkpoints")  # the rerun's fresh start
    (run_dir / "checkpoints" / "checkpoint-2").mkdir()  # the failed attempt's own
    back = relocate_set_aside(run_dir, result, since)
    assert back["artifacts"]["best_checkpoint"] == "checkpoints/earlier/checkpoint-2"
    assert (run_dir / back["artifacts"]["best_checkpoint"] / "adapter_model.safetensors").read_text() == "kept"
    assert back["artifacts"]["adapter"] == result["artifacts"]["adapter"] and result["artifacts"]["best_checkpoint"] == "checkpoints/checkpoint-2"
    assert relocate_set_aside(run_dir, result, time.time() + 60) == result  # earlier/ older than this attempt: not its doing
    assert relocate_set_aside(run_dir, back, since) == back  # named there already


def test_a_failed_rerun_keeps_the_succeeded_runs_result_and_artifacts(tmp_path):
    """A rerun into a succeeded run's dir that fails before replacing anything (a typo'd data path):
    result.json is the earlier run's again, the attempt's own result is result.failed.json."""
    run_dir = tmp_path / "sft"
    run_dir.mkdir()
    earlier = _succeeded_run(run_dir, "sft", {"adapter": "adapter/adapter_model.safetensors"})
    run = sectune(["stage=sft", "logger=none", "train.max_steps=2", "dataset.path=/nonexistent/auth"], run_dir)
    assert run.returncode == 2 and "/nonexistent/auth" in run.stderr
    assert json.loads((run_dir / "result.json").read_text()) == earlier
    failed = json.loads((run_dir / "result.failed.json").read_text())
    assert failed["status"] == "failed" and "/nonexistent/auth" in failed["error"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_text() == "kept"
    # infer: the same for its answers (it used to delete analyses.json before loading a model)
    infer_dir = tmp_path / "infer"
    infer_dir.mkdir()
    earlier = _succeeded_run(infer_dir, "infer", {"output": "analyses.json"})
    run = sectune(["stage=infer", "logger=none", f"infer.model_dir={tmp_path / 'nope'}",
                   f"infer.input_file={tmp_path / 'nope.log'}"], infer_dir)
    assert run.returncode == 2
    assert json.loads((infer_dir / "result.json").read_text()) == earlier and (infer_dir / "analyses.json").read_text() == "kept"


def test_a_failed_rerun_puts_the_succeeded_runs_config_back_for_what_reads_it(tmp_path):
    """Hydra writes the attempt's .hydra/ before the stage starts: stage=evaluate, predict and the pipeline's skip check
    then read settings the artifacts were not made with (an HDFS model evaluated on another split, with exit 0).
    After a failed rerun that changed no artifact the succeeded run's config is back, the attempt's in .hydra/failed/."""
    log = tmp_path / "auth.log"
    log.write_text("Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186\n")
    run_dir = tmp_path / "infer"
    first = sectune(["stage=infer", "logger=none", f"infer.input_file={log}", "generation.max_new_tokens=4"], run_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    good = (run_dir / ".hydra/config.yaml").read_text()
    assert (run_dir / ".hydra/succeeded/config.yaml").read_text() == good
    again = sectune(["stage=infer", "logger=none", f"infer.input_file={tmp_path / 'nope.log'}", "generation.max_new_tokens=4"], run_dir)
    assert again.returncode == 2 and ".hydra/failed/" in again.stderr
    assert (run_dir / ".hydra/config.yaml").read_text() == good and str(log) in good
    assert "nope.log" in (run_dir / ".hydra/failed/config.yaml").read_text() and "nope.log" in (run_dir / ".hydra/failed/overrides.yaml").read_text()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "succeeded"


def test_a_failed_pipeline_step_rerun_gets_its_step_record_back_so_the_next_run_skips_it(tmp_path):
    from sectune.runner import keep_run_config, restore_run_config

    (tmp_path / ".hydra").mkdir()
    for name, text in (("step.json", '{"config_digest": "good"}'), (".hydra/config.yaml", "a: 1\n"), (".hydra/overrides.yaml", "[]\n")):
        (tmp_path / name).write_text(text)
    keep_run_config(tmp_path)
    (tmp_path / "step.json").write_text('{"config_digest": "typo"}')  # record_step, before the failed attempt ran
    (tmp_path / ".hydra/config.yaml").write_text("a: 2\n")
    assert "failed" in restore_run_config(tmp_path)
    assert json.loads((tmp_path / "step.json").read_text()) == {"config_digest": "good"}
    assert (tmp_path / ".hydra/config.yaml").read_text() == "a: 1\n" and (tmp_path / ".hydra/failed/config.yaml").read_text() == "a: 2\n"
    assert json.loads((tmp_path / ".hydra/failed/step.json").read_text()) == {"config_digest": "typo"}


def test_a_rerun_that_touched_an_artifact_reports_its_own_failure():
    from sectune.runner import artifacts_untouched

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d)
        result = _succeeded_run(run_dir, "sft", {"adapter": "adapter/w.safetensors", "preview": "samples/p.json",
                                                 "checkpoints": "checkpoints/c1/s.json"})
        since = time.time() - 30
        assert artifacts_untouched(run_dir, result, since)
        (run_dir / "checkpoints" / "c1" / "s.json").write_text("new")  # training state: a rerun saves its own
        assert artifacts_untouched(run_dir, result, since)
        # a contrastive run's best checkpoint lives under checkpoints/, which a fresh rerun sets aside (an audit, session
        # 25: a Ctrl-C'd rerun then left the succeeded contrastive run failed)
        assert artifacts_untouched(run_dir, {**result, "artifacts": {**result["artifacts"], "best_checkpoint": "checkpoints/gone"}}, since)
        (run_dir / "samples" / "p.json").write_text("new")  # written by the failed attempt
        assert not artifacts_untouched(run_dir, result, since)
        (run_dir / "samples" / "p.json").unlink()  # or deleted by it
        assert not artifacts_untouched(run_dir, result, time.time() + 60)
        assert not artifacts_untouched(run_dir, {**result, "artifacts": ["adapter"]}, since)
        # a result.json naming "../../.." walked the whole filesystem; a folder outside the run is not walked
        outside = Path(d).parent / f"{Path(d).name}_outside"
        (outside / "deep").mkdir(parents=True)
        try:
            (outside / "deep" / "new.txt").write_text("written after")
            past = time.time() - 60
            os.utime(outside, (past, past))
            assert artifacts_untouched(run_dir, {"artifacts": {"base_model": f"../{outside.name}"}}, since)
        finally:
            import shutil

            shutil.rmtree(outside)


def test_infer_passes_over_a_damaged_adapter_and_names_the_file(tmp_path):
    from sectune.models import modeling
    from sectune.stages import infer

    cfg = compose(["lora=r4_attention"])
    model = modeling.apply_lora(modeling.load_model(cfg), cfg)
    run_dir = tmp_path / "sft"
    model.save_pretrained(run_dir / "adapter")
    (run_dir / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "artifacts": {"adapter": "adapter"}}))
    assert infer.choose_model(str(run_dir)).used == "sft"
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"^evaluate.model_dir=.*sft: adapter/adapter_model.safetensors is damaged \(truncated"):
        infer.choose_model(str(run_dir), base_fallback=False, key="evaluate.model_dir")
    model.save_pretrained(run_dir / "adapter")
    (run_dir / "adapter" / "adapter_config.json").write_text('{"r": 4, ')  # was a JSONDecodeError traceback
    with pytest.raises(ConfigError, match=r"sft: adapter/adapter_config.json is damaged \(JSONDecodeError"):
        infer.choose_model(str(run_dir), base_fallback=False, key="evaluate.model_dir")
    (run_dir / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "artifacts": ["adapter"]}))
    assert "artifacts is not an object" in infer.choose_model(str(run_dir)).skipped[0]
    (run_dir / "result.json").write_text("[]")  # valid JSON, not a result
    with pytest.raises(ConfigError, match=r"result.json: not a sectune result \(a JSON list, not an object\)"):
        infer.choose_model(str(run_dir))


def test_infer_output_file_under_a_file_is_refused_before_a_model_loads(tmp_path):
    from sectune.stages import infer

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"^infer.output_file=.*afile/deeper/out.json: .*afile is a file, not a folder"):
        infer.output_path(str(tmp_path / "afile" / "deeper" / "out.json"), tmp_path)
    assert infer.output_path(str(tmp_path / "new" / "out.json"), tmp_path) == tmp_path / "new" / "out.json"


def test_a_checkpoint_whose_trainer_state_is_not_an_object_is_damaged(tmp_path):
    from sectune.training import checkpoints

    (tmp_path / "trainer_state.json").write_text("[]")
    assert checkpoints.damaged_file(tmp_path) == ("trainer_state.json", "not a JSON object (list)")
    (tmp_path / "trainer_state.json").write_text("{}")  # was a TypeError traceback when resumed
    assert checkpoints.damaged_file(tmp_path)[0] == "trainer_state.json"
    (tmp_path / "trainer_state.json").write_text('{"global_step": 2}')
    assert checkpoints.damaged_file(tmp_path) is None


def test_sigterm_is_a_recorded_interruption_and_a_rerun_it_stopped_gives_the_earlier_result_back(tmp_path, monkeypatch, capsys):
    """A scheduler's preemption or time limit (SIGTERM), `timeout` or `kill` left result.json "running" for good, and a
    killed rerun in a succeeded run's dir hid that run (infer then answered with the base model)."""
    import signal

    from sectune import runner

    def killed(ctx):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return {}

    monkeypatch.setattr(runner, "resolve_stage", lambda name: killed)
    before = signal.getsignal(signal.SIGTERM)
    run_dir = tmp_path / "sft"
    run_dir.mkdir()
    earlier = _succeeded_run(run_dir, "sft", {"adapter": "adapter/adapter_model.safetensors"})
    code, _ = runner.run(compose(["logger=none"]), run_dir)
    assert code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert json.loads((run_dir / "result.json").read_text()) == earlier
    assert json.loads((run_dir / "result.failed.json").read_text())["error"] == "interrupted (SIGTERM)"
    assert "interrupted (SIGTERM)\n" in capsys.readouterr().err  # no checkpoints/ (not a training stage): no resume hint
    fresh = tmp_path / "fresh"
    code, _ = runner.run(compose(["logger=none"]), fresh)
    assert code == 143 and json.loads((fresh / "result.json").read_text())["status"] == "failed"


def test_an_error_naming_an_attackers_file_reaches_the_console_with_its_escapes_escaped(tmp_path, monkeypatch, capsys):
    """A folder or file name an attacker chose (``\\x1b]0;…\\x07`` retitles a terminal, ``\\x1b[2J`` clears it) went raw
    into the error line (an audit of hostile inputs, session 26); result.json keeps the message as it was (JSON escapes it)."""
    from sectune import runner
    from sectune.errors import DataError

    name = "logs\x1b]0;PWNED\x07\x1b[2J"

    def stage(ctx):
        raise DataError(f"{name}: auth_logs folder does not exist")

    monkeypatch.setattr(runner, "resolve_stage", lambda _name: stage)
    code, _ = runner.run(compose(["logger=none"]), tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 2 and "\x1b" not in err and "\x07" not in err
    assert "sectune: error: logs\\x1b]0;PWNED\\x07\\x1b[2J: auth_logs folder does not exist" in err
    assert json.loads((tmp_path / "run" / "result.json").read_text())["error"] == f"{name}: auth_logs folder does not exist"


def test_a_second_command_into_a_run_dir_in_use_stops_and_leaves_the_running_ones_config(tmp_path, monkeypatch, capsys):
    """Two commands in one run dir both said done, one's result and checkpoints silently replacing the other's."""
    import fcntl

    from sectune import runner

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra/config.yaml").write_text("lr: 1\n")
    ran = []
    monkeypatch.setattr(runner, "resolve_stage", lambda name: lambda ctx: ran.append(ctx) or {})
    holder = runner._lock_run_dir(run_dir)  # the running command (a lock is per open file: this one conflicts)
    assert (run_dir / ".hydra/running/config.yaml").read_text() == "lr: 1\n"
    runner._LOCKS.clear()  # as if held by another process
    (run_dir / ".hydra/config.yaml").write_text("lr: 2\n")  # Hydra wrote the second command's config first
    (run_dir / "result.json").write_text('{"status": "running"}')
    code, _ = runner.run(compose(["logger=none"]), run_dir)
    err = capsys.readouterr().err
    assert code == 2 and not ran and f"{run_dir} is in use by another sectune run (pid {os.getpid()})" in err
    assert (run_dir / ".hydra/config.yaml").read_text() == "lr: 1\n" and (run_dir / "result.json").read_text() == '{"status": "running"}'
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    code, _ = runner.run(compose(["logger=none"]), run_dir)  # free again: runs, and leaves no lock held
    assert code == 0 and ran and not (run_dir / ".hydra/running").exists() and not runner._LOCKS

    # the other order: a refused command wrote its .hydra/ after this one's Hydra did, before this one took the lock
    # (two sweeps started in the same second): the lock holder writes its own back, so its result sits beside its config
    (run_dir / ".hydra/overrides.yaml").write_text("- lora.r=16\n")  # the refused sweep's
    own = {".hydra/overrides.yaml": "- lora.r=4\n", ".hydra/config.yaml": "lr: 1\n"}
    lock = runner._lock_run_dir(run_dir, own)
    assert (run_dir / ".hydra/overrides.yaml").read_text() == "- lora.r=4\n" == (run_dir / ".hydra/running/overrides.yaml").read_text()
    runner._unlock_run_dir(run_dir, lock)


def test_a_refused_commands_config_written_during_the_run_is_not_kept_as_the_runs_record(tmp_path, monkeypatch):
    """Under torchrun only rank 0 of a refused command puts the running run's .hydra/ back; its other ranks' Hydra could
    write theirs later, and a 40-step run kept a refused 3-step command's config in .hydra/succeeded/ (audit AA)."""
    from sectune import runner

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    own = {".hydra/overrides.yaml": "- train.max_steps=40\n", ".hydra/config.yaml": "steps: 40\n"}
    for rel, text in own.items():
        (run_dir / rel).write_text(text)
    monkeypatch.setattr(runner, "hydra_files", lambda cfg, d: own)

    def stage(ctx):  # a refused command's rank 1 writes its .hydra/ while this run trains
        (run_dir / ".hydra/overrides.yaml").write_text("- train.max_steps=3\n")
        (run_dir / ".hydra/config.yaml").write_text("steps: 3\n")
        return {}

    monkeypatch.setattr(runner, "resolve_stage", lambda name: stage)
    code, _ = runner.run(compose(["logger=none"]), run_dir)
    assert code == 0
    for rel, text in own.items():
        assert (run_dir / rel).read_text() == text
        assert (run_dir / ".hydra/succeeded" / rel.split("/")[-1]).read_text() == text


def test_a_damaged_run_config_is_named_not_a_yaml_traceback(tmp_path):
    from sectune.config import load_run_config
    from sectune.errors import DataError

    (tmp_path / ".hydra").mkdir()
    for text in ("model: {name: [\n", "- just\n- a list\n"):
        (tmp_path / ".hydra" / "config.yaml").write_text(text)
        with pytest.raises(DataError, match=r"config.yaml: not a (readable )?config"):
            load_run_config(tmp_path / ".hydra" / "config.yaml")


def test_a_run_of_another_config_into_a_succeeded_runs_dir_says_so_and_keeps_its_result(tmp_path, monkeypatch, capsys):
    """A rerun with other settings into a finished run's dir replaced it without a word (outside sweeps)."""
    from sectune import runner

    monkeypatch.setattr(runner, "resolve_stage", lambda name: lambda ctx: {"metrics": {"y": 2}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    earlier = _succeeded_run(run_dir, "sft", {"adapter": "adapter/adapter_model.safetensors"})
    code, _ = runner.run(compose(["logger=none"]), run_dir)
    assert code == 0 and "held a succeeded run of another config; this run replaces it" in capsys.readouterr().err
    assert json.loads((run_dir / "result.previous.json").read_text()) == earlier
    assert json.loads((run_dir / "result.json").read_text())["metrics"] == {"y": 2}


def test_a_run_whose_loss_ends_non_finite_is_failed_not_succeeded(tmp_path, monkeypatch):
    """Garbled checkpoint weights resumed to eval loss NaN, recorded as succeeded (infer would then use them)."""
    from sectune import runner

    monkeypatch.setattr(runner, "resolve_stage", lambda name: lambda ctx: {"metrics": {"eval_loss": float("nan"), "x": 1.0},
                                                                           "artifacts": {"adapter": "adapter"}})
    code, _ = runner.run(compose(["logger=none"]), tmp_path / "run")
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert code != 0 and res["status"] == "failed" and res["error"].startswith("eval_loss is nan: the trained weights are broken")


def test_a_run_whose_loss_ends_non_finite_sets_its_adapter_aside(tmp_path, monkeypatch):
    """Session 44: the failed run kept its NaN weights as adapter/ (the console said "done · adapter at …" first), a
    folder that looks like a trained adapter to whoever copies it out of the run dir. It is renamed adapter.nonfinite/,
    result.json's artifacts with it; a run whose loss stayed finite keeps its adapter/."""
    from sectune import runner

    def stage(loss):
        def fn(ctx):
            (ctx.run_dir / "adapter").mkdir()
            (ctx.run_dir / "adapter" / "adapter_config.json").write_text("{}")
            return {"metrics": {"train_loss": loss}, "artifacts": {"adapter": "adapter", "train_history": "train_history.json"}}
        return lambda name: fn

    monkeypatch.setattr(runner, "resolve_stage", stage(float("nan")))
    run = tmp_path / "run"
    code, _ = runner.run(compose(["logger=none"]), run)
    res = json.loads((run / "result.json").read_text())
    assert code != 0 and res["status"] == "failed" and res["error"].endswith("(its adapter/ is now adapter.nonfinite/)")
    assert not (run / "adapter").exists() and (run / "adapter.nonfinite" / "adapter_config.json").is_file()
    assert res["artifacts"] == {"adapter.nonfinite": "adapter.nonfinite", "train_history": "train_history.json"}
    monkeypatch.setattr(runner, "resolve_stage", stage(0.5))
    code, _ = runner.run(compose(["logger=none"]), tmp_path / "good")
    assert code == 0 and (tmp_path / "good" / "adapter" / "adapter_config.json").is_file()


def test_a_run_dirs_saved_config_cannot_switch_on_remote_code_or_read_the_environment(tmp_path, monkeypatch, capsys):
    """A shared run dir whose .hydra/config.yaml said trust_remote_code: true ran the model folder's code on evaluate,
    and one with ${oc.env:HF_TOKEN} in a path put the token into the error and result.json."""
    from sectune.config import load_run_config
    from sectune.errors import DataError

    monkeypatch.setenv("HF_TOKEN", "hf_fakefakefake")
    (tmp_path / ".hydra").mkdir()
    saved = tmp_path / ".hydra" / "config.yaml"
    saved.write_text("model: {name: m, trust_remote_code: true, learning_rate: 0.1}\ntrain: {learning_rate: '${model.learning_rate}'}\n"
                     "paths: {shared_data: '${sectune_shared_data:}'}\n")
    cfg = load_run_config(saved)
    assert cfg.model.trust_remote_code is False and cfg.train.learning_rate == 0.1 and cfg.paths.shared_data
    assert "loads the model with it off" in capsys.readouterr().out
    # not only a YAML true: 1, 'true', even 'false' passed a check for True and reached from_pretrained as bool(value),
    # which ran a shared run dir's model folder code (an audit, session 37)
    from omegaconf import OmegaConf

    from sectune.models.modeling import _hub_kwargs

    for value in ("1", "'true'", "'false'", "'on'", "yes"):
        saved.write_text(f"model: {{name: m, trust_remote_code: {value}, revision: null}}\n")
        cfg = load_run_config(saved)
        assert cfg.model.trust_remote_code is False and _hub_kwargs(cfg)["trust_remote_code"] is False, value
    assert _hub_kwargs(OmegaConf.create({"model": {"revision": None, "trust_remote_code": "false"}}))["trust_remote_code"] is False
    saved.write_text("dataset: {path: '/data/${oc.env:HF_TOKEN}.csv'}\n")
    with pytest.raises(DataError, match=r"calls the resolver\(s\) oc.env") as e:
        load_run_config(saved)
    assert "hf_fake" not in str(e.value)


def test_an_artifact_that_is_a_symlink_is_replaced_as_a_link_never_followed(tmp_path):
    """run_dir/adapter a symlink to a folder elsewhere: rmtree refused it after training (traceback, the adapter left
    in a temporary folder). The link is replaced; what it pointed to is untouched."""
    from sectune.models.modeling import replace_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not sectune's")
    out, tmp = tmp_path / "run" / "adapter", tmp_path / "run" / ".adapter.tmp1"
    tmp.mkdir(parents=True)
    (tmp / "adapter_model.safetensors").write_text("new")
    out.symlink_to(elsewhere, target_is_directory=True)
    replace_dir(tmp, out)
    assert not out.is_symlink() and (out / "adapter_model.safetensors").read_text() == "new"
    assert (elsewhere / "keep.txt").read_text() == "not sectune's"


def test_an_interrupted_sweep_job_stops_the_sweep_and_each_job_reports_its_own_peak(tmp_path, monkeypatch):
    """Ctrl-C or a scheduler's SIGTERM stopped only the current job and the sweep went on to the next; and a sweep's
    jobs, sharing one process, each reported the sweep's running peak RSS."""
    import signal

    from sectune import runner, sweeps
    from sectune.training import engine

    resets = []
    monkeypatch.setattr(sweeps, "in_multirun", lambda: True)
    monkeypatch.setattr(engine, "reset_peak_rss", lambda: resets.append(1) or True)
    monkeypatch.setattr(runner, "resolve_stage", lambda name: lambda ctx: {"metrics": {"x": 1.0}})
    code, _ = runner.run(compose(["logger=none"]), tmp_path / "job0")
    assert code == 0 and resets == [1]

    def killed(ctx):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(runner, "resolve_stage", lambda name: killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run(compose(["logger=none"]), tmp_path / "job1")
    assert json.loads((tmp_path / "job1" / "result.json").read_text())["error"] == "interrupted (SIGTERM)"


def test_a_stage_listed_as_single_process_refuses_several_processes(monkeypatch):
    """config_checks.SINGLE_PROCESS_STAGES names the stages not correct under torchrun (federated: Flower is its engine):
    refused by name."""
    from sectune import config_checks

    monkeypatch.setitem(config_checks.SINGLE_PROCESS_STAGES, "reward", "its ranks would end with different models")
    args = ["stage=reward", "dataset=auth_preferences"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^stage=reward under 2 processes: its ranks would end with different models"):
        config_checks.check_values(compose(args))
    monkeypatch.setenv("WORLD_SIZE", "1")
    config_checks.check_values(compose(args))


def test_federated_under_several_processes_is_refused_and_a_pipeline_with_it_before_any_step_trains(tmp_path, monkeypatch):
    """Under torchrun every rank ran the whole Flower simulation (its own Ray cluster, every client, every round) into the
    same run dir. Refused by name, and a pipeline holding a federated step is refused before its first step trains."""
    from sectune import config_checks
    from sectune.stages import pipeline

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^stage=federated under 2 processes: Flower runs its clients"):
        config_checks.check_values(compose(["+experiment=hdfs_federated_tiny"]))
    cfg = compose(["stage=pipeline", "pipeline.steps=[sft,federated]"])
    with pytest.raises(ConfigError, match=r"^pipeline.steps: federated: stage=federated under 2 processes"):
        pipeline.check_steps(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert pipeline.check_steps(cfg) == ["sft", "federated"]
    config_checks.check_values(compose(["+experiment=hdfs_federated_tiny"]))


@pytest.mark.parametrize("stage", ["reward", "classify"])
def test_reward_and_classify_run_under_several_processes(stage, monkeypatch):
    """They were refused (reward's ranks ended with different models, classify's raced on its files); fixed and checked
    against one process by tests/test_distributed.py."""
    from sectune.config_checks import check_values

    monkeypatch.setenv("WORLD_SIZE", "2")
    check_values(compose([f"stage={stage}"] + (["dataset=auth_preferences"] if stage == "reward" else [])))


def test_infer_refuses_a_sweep_job_whose_reused_run_was_replaced(tmp_path):
    """sweep.skip_done links a job's artifacts into the run it reused; once that dir held another config's run,
    infer answered with the other config's adapter under the first config's metrics."""
    from sectune.stages import infer

    source, job = tmp_path / "sw1" / "0", tmp_path / "sw3" / "0"
    (source / "adapter").mkdir(parents=True)
    job.mkdir(parents=True)
    (source / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "config_digest": "r4",
                                                    "artifacts": {"adapter": "adapter"}}))
    (job / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "config_digest": "r4", "skipped": True,
                                                 "reused_from": str(source), "artifacts": {"adapter": "../../sw1/0/adapter"}}))
    (source / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "config_digest": "r16",
                                                    "artifacts": {"adapter": "adapter"}}))  # the sweep dir rerun with r=16
    with pytest.raises(ConfigError, match=r"it reused .*sw1/0, which now holds another run"):
        infer.choose_model(str(job), base_fallback=False, key="infer.model_dir")


def test_a_run_on_generated_stand_in_data_says_so_in_result_json_and_a_real_data_run_does_not(tmp_path, monkeypatch, capsys, caplog):
    """On a fresh clone (no ../shared) the default run trains on generated logs: the console said so once per load
    (four times in a pipeline), result.json never, so its numbers could be read as real-data results."""
    from sectune import data, runner
    from tests.conftest import REAL_AUTH

    def stage(ctx):
        data.auth_logs_folder(ctx.cfg)
        data.auth_logs_folder(ctx.cfg)  # a second load (the held-out table's): no second notice
        return {"metrics": {"y": 1.0}}

    monkeypatch.setattr(runner, "resolve_stage", lambda name: stage)
    none = ["logger=none", f"paths.shared_data={tmp_path / 'none'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    code, _ = runner.run(compose(none), tmp_path / "gen")
    (gen,) = json.loads((tmp_path / "gen" / "result.json").read_text())["generated_data"]
    assert code == 0 and gen["dataset"] == "auth_logs" and str(tmp_path / "cache") in gen["path"]
    said = capsys.readouterr()
    assert said.out.count("has no real auth logs; using generated logs") == 1
    assert "generated synthetic logs" not in said.err + caplog.text  # the builder's own second wording is gone
    if not REAL_AUTH.exists():
        pytest.skip("no ../shared/data: the real-data half needs the real auth logs")
    code, _ = runner.run(compose(["logger=none", f"paths.cache_dir={tmp_path / 'cache'}"]), tmp_path / "real")
    assert code == 0 and "generated_data" not in json.loads((tmp_path / "real" / "result.json").read_text())


def test_result_json_names_the_data_a_run_read_as_absolute_paths(tmp_path, monkeypatch):
    """The saved config keeps ``${sectune_shared_data:}`` and a path relative to the folder the command ran from: neither
    says which files a number was computed on once the run dir is copied. result.json's ``data`` does."""
    from sectune import runner

    monkeypatch.setattr(runner, "resolve_stage", lambda name: lambda ctx: {"metrics": {"y": 1.0}})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    code, _ = runner.run(compose(["logger=none", "dataset.path=mine", f"paths.shared_data={tmp_path / 'shared'}"]), tmp_path / "r")
    got = json.loads((tmp_path / "r" / "result.json").read_text())["data"]
    assert code == 0
    assert got["dataset.path"] == str(tmp_path / "mine") and got["paths.shared_data"] == str(tmp_path / "shared")
    assert got["dataset.source_dir"] == str(tmp_path / "shared")  # the interpolation, resolved
    assert "infer.input_file" not in got and "evaluate.data_path" not in got  # unset keys are left out


def test_result_json_says_which_code_libraries_and_device_produced_its_numbers(tmp_path, monkeypatch):
    """A result.json said which data and config, not which sectune commit, torch/transformers/trl/peft versions or device:
    a number could not be tied to the code that made it once the checkout moved on."""
    import subprocess
    from importlib import metadata

    import sectune
    from sectune import runner
    from sectune.paths import PROJECT_ROOT

    monkeypatch.setattr(runner, "resolve_stage", lambda name: lambda ctx: {"metrics": {"y": 1.0}})
    code, _ = runner.run(compose(["logger=none"]), tmp_path / "r")
    env = json.loads((tmp_path / "r" / "result.json").read_text())["environment"]
    assert code == 0 and env["sectune"] == sectune.__version__
    assert env["packages"]["torch"] == metadata.version("torch") and env["packages"]["trl"] == metadata.version("trl")
    assert env["device"].startswith(("cpu: ", "cuda: "))
    # the device the run used: a train.device=cpu run on a GPU machine is no GPU result; a run refused before torch loaded
    # ran on none
    import sys
    from types import SimpleNamespace

    from sectune.run_records import environment

    gpu = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: True, get_device_name=lambda i: "H100", device_count=lambda: 2))
    monkeypatch.setitem(sys.modules, "torch", gpu)
    assert environment("auto")["device"] == "cuda: H100 x2" and environment("cpu")["device"].startswith("cpu: ")
    monkeypatch.delitem(sys.modules, "torch")
    assert environment("auto")["device"] is None
    head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI's clean clone is one)
        assert env["sectune_commit"].split("+")[0] == head.stdout.strip()[:12]


def test_csv_errors_name_the_real_line_after_blank_lines_and_multiline_cells_and_say_how_to_fix_latin1(tmp_path):
    """The empty-cell error named the pandas row + 2 (line 4 for a cell on line 6); a Latin-1 export said
    "'utf-8' codec can't decode byte 0xe9 in position 3" (a position in pandas' buffer, no line)."""
    from sectune.data.text_classification import load_text_label_csv
    from sectune.errors import DataError

    f = tmp_path / "rows.csv"
    f.write_text('text,label\n\n"a\nmultiline",benign\n\nhello,\nok,benign\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}: line 6: empty 'label'$"):
        load_text_label_csv(f)
    f.write_text("text,label\nhello,a\n\nworld,b\n,\nfoo,a\n")  # a row of empty cells is a record: its own line
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}: line 5: empty 'text'$"):
        load_text_label_csv(f)
    f.write_bytes(b"text,label\nok,benign\ncaf\xe9 ist gut,benign\n")
    with pytest.raises(DataError, match=r"not UTF-8 text \(line 3, byte 0xe9\).*iconv -f latin1 -t utf-8 rows.csv"):
        load_text_label_csv(f)


def test_resuming_a_finished_run_is_the_same_run_not_another_config(tmp_path, monkeypatch, capsys):
    """train.resume=auto on a run dir whose run had finished warned that "another config" replaced it (the digest
    counts train.resume) and recorded train loss 0.0 (engine.run_train_loss: nothing left to train)."""
    from sectune import runner

    monkeypatch.setattr(runner, "resolve_stage", lambda name: lambda ctx: {"metrics": {"y": 1.0}})
    run_dir = tmp_path / "run"
    assert runner.run(compose(["logger=none"]), run_dir)[0] == 0
    assert runner.run(compose(["logger=none", "train.resume=auto"]), run_dir)[0] == 0
    assert "held a succeeded run of another config" not in capsys.readouterr().err
    assert not (run_dir / "result.previous.json").exists()
    assert runner.run(compose(["logger=none", "train.learning_rate=0.5"]), run_dir)[0] == 0
    assert "held a succeeded run of another config" in capsys.readouterr().err


def test_a_fail_on_rank_that_could_never_fail_is_refused_naming_the_key(monkeypatch):
    """debug.fail_on_rank without debug.fail_at_step, or naming a rank the launch does not have, did nothing."""
    from sectune import config_checks

    with pytest.raises(ConfigError, match=r"debug.fail_on_rank.*needs debug.fail_at_step"):
        config_checks.check_values(compose(["debug.fail_on_rank=0"]))
    with pytest.raises(ConfigError, match=r"debug.fail_on_rank.*must be a rank of this launch \(0 to 0\)"):
        config_checks.check_values(compose(["debug.fail_on_rank=1", "debug.fail_at_step=2"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    config_checks.check_values(compose(["debug.fail_on_rank=1", "debug.fail_at_step=2"]))


@pytest.mark.parametrize("dataset", ["auth_logs", "cic_iot_2023", "prompt_injections", "injection_triplets"])
def test_a_dataset_path_that_names_nothing_is_an_error_naming_the_key(tmp_path, monkeypatch, capsys, dataset):
    """Each reader said only the path ("/data/x: auth_logs folder does not exist", "flow CSV not found"), not which
    setting named it (an audit of the console, session 44): one line naming dataset.path, before any stage starts."""
    from sectune import runner

    monkeypatch.setattr(runner, "resolve_stage", lambda _name: pytest.fail("the stage started"))
    missing = tmp_path / "nope"
    code, _ = runner.run(compose(["logger=none", f"dataset={dataset}", f"dataset.path={missing}"]), tmp_path / "run")
    assert code == 2
    assert f"sectune: error: dataset.path={missing}: no such file or folder" in capsys.readouterr().err
