"""Every option of every config group composes; typos and wrong types fail naming the key."""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import cli, compose, sectune
from sectune.paths import PROJECT_ROOT
from sectune.tracking import REDACTED, redact

GROUPS = ["model", "quantization", "lora", "loss", "dataset", "stage", "logger"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (PROJECT_ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    node = cfg[group]
    assert node.name == option  # each option declares its own name: results name what ran
    # Interpolations resolve (paths, learning rate from the model preset).
    assert isinstance(cfg.train.learning_rate, float)
    assert cfg.paths.shared_data


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (PROJECT_ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    cfg = compose([f"+experiment={experiment}"])
    assert cfg.stage.name


def test_real_presets_name_hub_models_and_arch():
    for option in _options("model"):
        cfg = compose([f"model={option}"])
        if option.startswith("tiny"):
            assert cfg.model.name_or_path is None and cfg.model.tiny is not None
        else:
            assert "/" in cfg.model.name_or_path, option  # a hub id
            assert cfg.model.arch.hidden_size > 0
            assert cfg.model.trust_remote_code is False


def test_learning_rate_follows_model_preset_unless_overridden():
    assert compose([]).train.learning_rate == pytest.approx(1e-2)
    assert compose(["model=llama2_7b"]).train.learning_rate == pytest.approx(2e-4)
    assert compose(["model=llama2_7b", "train.learning_rate=5e-5"]).train.learning_rate == pytest.approx(5e-5)


def test_typo_in_override_fails_naming_the_key():
    run = sectune(["lora.rr=3", "--cfg", "job"])
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == "sectune: error: Could not override 'lora.rr'. Key 'rr' not in 'LoraConfig' (key lora.rr)"
    assert "+lora.rr" not in run.stderr  # Hydra's hint, which would add the typo beside the setting it meant


def test_an_appended_key_the_schema_lacks_is_an_error_not_an_ignored_setting(tmp_path):
    """``+train.learning_rat=1e-3`` (what Hydra's hint for the typo says to type) trained to the end at the default rate."""
    run = sectune(["stage=plan", "logger=none", "+train.learning_rat=1e-3"], tmp_path / "run")
    assert run.returncode == 2 and run.result["status"] == "failed"
    assert run.stderr.strip().splitlines()[-1].startswith("sectune: error: train.learning_rat: not a sectune setting (Key 'learning_rat' not in")
    ok = sectune(["stage=plan", "logger=none", "+pipeline.overrides.sft.train.max_steps=3"], tmp_path / "ok")  # an open mapping
    assert ok.returncode == 0, ok.stderr[-1500:]
    # `--cfg job` printed the appended key as a setting and exited 0 (Hydra prints without running the task)
    shown = sectune(["+lora.rr=3", "--cfg", "job"])
    assert shown.returncode == 2 and "rr: 3" in shown.stdout
    assert shown.stderr.strip().splitlines()[-1].startswith("sectune: error: lora.rr: not a sectune setting")
    fine = sectune(["+pipeline.overrides.sft.train.max_steps=3", "hydra.run.dir=/nonexistent/x", "--cfg", "job"])
    assert fine.returncode == 0 and "max_steps: 3" in fine.stdout, fine.stderr[-1500:]


def test_wrong_type_fails_naming_the_key():
    run = sectune(["train.batch_size=eight", "--cfg", "job"])
    assert run.returncode != 0
    assert "train.batch_size" in run.stderr


def test_cfg_job_prints_composed_config_and_help_lists_groups():
    job = sectune(["lora=r16_all_linear", "--cfg", "job"])
    assert job.returncode == 0, job.stderr
    assert "r: 16" in job.stdout and "alpha: 32" in job.stdout
    helped = sectune(["--help"])
    assert helped.returncode == 0
    for group in GROUPS:
        assert f"{group}:" in helped.stdout
    assert "r4_attention" in helped.stdout and "llama32_3b_instruct" in helped.stdout


def test_redact_hides_secret_keys_and_values():
    cfg = {"a": {"hub_token": "abc", "api_key": "k", "name": "x"}, "b": ["hf_" + "A" * 34, "fine"], "password": None}
    out = redact(cfg)
    assert out["a"]["hub_token"] == REDACTED and out["a"]["api_key"] == REDACTED and out["a"]["name"] == "x"
    assert out["b"] == [REDACTED, "fine"]
    assert out["password"] is None  # nothing to hide


@pytest.mark.parametrize("override", ["+hf.token.value=SEKRIT_A1", "+hf_token_value=x", "+api_keys=[a,b]", "+authorization=x",
                                      "+hf_auth=x", "+pass=x", "+x=xoxb-1234567890-abc", "+y=AKIAABCDEFGHIJKLMNOP",
                                      "+z=glpat-abcdefghijklmnopqrst", "+x=${oc.env:HF_TOKEN}",
                                      # a shell line in the SLURM launcher's setup list was saved in multirun.yaml
                                      "hydra.launcher.setup=[source a,'export WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567']",
                                      "hydra.launcher.setup=['export HF_TOKEN=abc']", "hydra.launcher.setup=['echo sk-abcdefghijklmnopqrstuv']"])
def test_secrets_the_first_check_let_through_are_refused(override):
    """An audit found these saved in .hydra/ (refused only later, by the key check) or never refused."""
    from sectune.tracking import secret_overrides

    assert secret_overrides([override]) == [f"{override.partition('=')[0]}=…"]


def test_a_secret_a_preset_sets_in_env_set_is_refused_before_hydra_saves_it(tmp_path):
    """A --config-dir preset's hydra.job.env_set: the value was in .hydra/hydra.yaml and every sweep job's files."""
    (tmp_path / "cd" / "experiment").mkdir(parents=True)
    (tmp_path / "cd" / "experiment" / "leak.yaml").write_text(
        "# @package _global_\nhydra:\n  job:\n    env_set:\n      HF_TOKEN: hf_fakefakefakefakefakefakefake\n")
    for flags, args in (([], ["hydra.run.dir=" + str(tmp_path / "run")]),
                        (["-m"], ["hydra.sweep.dir=" + str(tmp_path / "sweep"), "train.batch_size=1,2"])):
        run = cli([*flags, "--config-dir", str(tmp_path / "cd"), "+experiment=leak", "stage=plan", "logger=none", *args])
        assert run.returncode == 2 and "hydra.job.env_set sets HF_TOKEN from a config file" in run.stderr, run.stderr[-1500:]
        assert "hf_fake" not in run.stderr + run.stdout
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_a_secret_any_key_of_a_preset_holds_is_refused_before_hydra_saves_it(tmp_path):
    """paths.shared_data: https://alice:pw@host/share in a --config-dir preset went to .hydra/ and result.json."""
    (tmp_path / "cd" / "experiment").mkdir(parents=True)
    (tmp_path / "cd" / "experiment" / "leak.yaml").write_text(
        "# @package _global_\npaths:\n  shared_data: https://alice:s3cretpw@host.example/share\n"
        "logger:\n  entity: hf_fakefakefakefakefakefakefake\n")
    run = cli(["--config-dir", str(tmp_path / "cd"), "+experiment=leak", "stage=plan", "logger=none", "hydra.run.dir=" + str(tmp_path / "run")])
    assert run.returncode == 2, run.stderr[-1500:]
    assert "sectune: error: logger.entity, paths.shared_data: a secret set by a config file" in run.stderr, run.stderr[-1500:]
    assert "s3cretpw" not in run.stderr + run.stdout and "hf_fake" not in run.stderr + run.stdout and not (tmp_path / "run").exists()


def test_a_secret_in_a_launcher_presets_shell_lines_or_the_shared_data_variable_is_refused(tmp_path):
    """An audit (session 36): `export WANDB_API_KEY=…` in a --config-dir launcher preset's setup lines went into
    multirun.yaml, submitit's pickles and the sbatch script (the same line on the command line was refused), and
    SECTUNE_SHARED_DATA=https://alice:pw@host/… into result.json and console.log."""
    (tmp_path / "cd" / "hydra" / "launcher").mkdir(parents=True)
    (tmp_path / "cd" / "hydra" / "launcher" / "mycluster.yaml").write_text(
        "defaults:\n  - slurm\nsetup:\n  - module load cuda/12.4\n  - export WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567\n")
    run = cli(["--config-dir", str(tmp_path / "cd"), "-m", "hydra/launcher=mycluster", "stage=plan", "logger=none",
               "train.batch_size=1,2", "hydra.sweep.dir=" + str(tmp_path / "sweep")])
    assert run.returncode == 2 and "sectune: error: hydra.launcher.setup.1: a secret set by a config file" in run.stderr, run.stderr[-1500:]
    assert "0123456789abcdef" not in run.stderr + run.stdout and not (tmp_path / "sweep").exists()
    env = {**os.environ, "SECTUNE_SHARED_DATA": "https://alice:hunter2@files.example.com/share"}
    run = cli(["stage=plan", "logger=none", "hydra.run.dir=" + str(tmp_path / "run")], env=env)
    assert run.returncode == 2 and "SECTUNE_SHARED_DATA (the environment variable paths.* read)" in run.stderr, run.stderr[-1500:]
    assert "hunter2" not in run.stderr + run.stdout and not (tmp_path / "run").exists()


def test_credentials_in_a_presets_env_set_value_or_its_sweeper_storage_are_refused_before_hydra_saves_them(tmp_path):
    """An audit (session 37): a proxy URL with a password in hydra.job.env_set and an Optuna study's
    hydra.sweeper.storage with one reached .hydra/hydra.yaml (and a sweep's multirun.yaml); on the command line both
    were refused. Every hydra.* key a preset sets is now checked as the command line is."""
    (tmp_path / "cd" / "site").mkdir(parents=True)
    (tmp_path / "cd" / "site" / "proxy.yaml").write_text(
        "# @package _global_\nhydra:\n  job:\n    env_set:\n      HTTPS_PROXY: http://carol:ProxyPw2@proxy.corp:3128\n")
    (tmp_path / "cd" / "hparams_search").mkdir(parents=True)
    (tmp_path / "cd" / "hparams_search" / "shared_db.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /hparams_search/sft_optuna\nhydra:\n  sweeper:\n"
        "    storage: postgresql://optuna:DbPassw0rd@db.example/optuna\n")
    for preset, named in (("+site=proxy", "hydra.job.env_set sets HTTPS_PROXY"), ("hparams_search=shared_db", "hydra.sweeper.storage: a secret")):
        run = cli(["--config-dir", str(tmp_path / "cd"), preset, "hydra.mode=RUN", "stage=plan", "logger=none",
                   "hydra.run.dir=" + str(tmp_path / "run")])
        assert run.returncode == 2 and named in run.stderr, run.stderr[-1500:]
        assert "Pw2" not in run.stderr + run.stdout and "Passw0rd" not in run.stderr + run.stdout and not (tmp_path / "run").exists()
    # a preset's ordinary hydra settings are not secrets
    (tmp_path / "cd" / "site" / "plain.yaml").write_text(
        "# @package _global_\nhydra:\n  job:\n    env_set:\n      HTTPS_PROXY: http://proxy.corp:3128\n")
    run = cli(["--config-dir", str(tmp_path / "cd"), "+site=plain", "stage=plan", "logger=none", "hydra.run.dir=" + str(tmp_path / "plain")])
    assert run.returncode == 0, run.stderr[-1500:]


def test_settings_that_mention_tokens_or_keys_are_not_secrets():
    from sectune.tracking import secret_overrides

    fine = ["generation.max_new_tokens=64", "model.tiny.extra_tokens=[' 1']", "dataset.num_log_keys=28", "loss.key_weight=5",
            "model.tokenizer=x", "+x=${oc.env:HOME}", "dataset.text_column=text",
            "hydra.launcher.setup=[source .venv/bin/activate,'export WANDB_MODE=offline','export OMP_NUM_THREADS=8']"]
    assert [o for o in fine if secret_overrides([o])] == []


def test_a_secret_on_the_command_line_is_refused_before_anything_is_written(tmp_path):
    """Hydra would save it in .hydra/ (a sweep: multirun.yaml, submitit's pickles) and W&B records argv."""
    from sectune.tracking import secret_overrides

    fake = "hf_" + "FAKE" * 8
    run = sectune(["stage=plan", "logger=none", f"+hf_token={fake}"], tmp_path / "run")
    assert run.returncode == 2 and "+hf_token=…" in run.stderr and "HF_TOKEN" in run.stderr
    assert fake not in run.stdout + run.stderr and not (tmp_path / "run").exists()
    sweep = cli(["-m", "stage=plan", "logger=none", "+wandb.api_key=abc123", "train.seed=1,2", f"hydra.sweep.dir={tmp_path / 'm'}"])
    assert sweep.returncode == 2 and "+wandb.api_key=…" in sweep.stderr and not (tmp_path / "m").exists()
    # a token-shaped value under any key; never an ordinary key that merely contains the word
    assert secret_overrides([f"logger.tags=[x,{fake}]", "+model.auth_key=s", "++x.password=p", "~y.secret=1"]) == [
        "logger.tags=…", "+model.auth_key=…", "++x.password=…", "~y.secret=…"]
    assert secret_overrides(["generation.max_new_tokens=5", "model.tiny.extra_tokens=[a,b]", "loss.weighted_keys=[verdict]",
                             "+model.token=", "train.seed=1,2", "-m", "hydra.run.dir=/tmp/x"]) == []
    # inside a dict value, as Hydra's env_set takes one (it was written to .hydra/hydra.yaml and W&B's argv)
    assert secret_overrides(["++hydra.job.env_set={WANDB_API_KEY:abc}", f"++hydra.job.env_set={{X:{fake}}}"]) == [
        "++hydra.job.env_set=…", "++hydra.job.env_set=…"]
    assert secret_overrides(["++hydra.job.env_set={OMP_NUM_THREADS:1}", 'model.max_memory={0:"7GiB",cpu:"30GiB"}']) == []


@pytest.mark.parametrize("override", [
    "dataset.path=https://alice:s3cr3tpass@data.example.org/auth.tgz",  # credentials in a URL
    "dataset.path=/data/hf_" + "A" * 34 + "/auth",  # a token inside a path
    "lora.r=choice(4,hf_" + "B" * 34 + ")",  # inside a sweep function
    "hydra.launcher.setup=['hf auth login --token hfxyzplain']",  # the word after --token
    "hydra.launcher.setup=['wandb login local-" + "0123456789abcdef" * 2 + "01234567']",  # a self-hosted W&B key
    "hydra.launcher.setup=['echo " + "0123456789ABCDEF" * 2 + "01234567|wandb login']",  # uppercase hex, piped
    "hydra.launcher.setup=['git clone https://oauth2:glpat-abcdefghijklmnopqrst@gitlab.example.org/x.git']"])
def test_a_secret_inside_a_value_is_refused(override):
    """An audit (session 25): only a whole value shaped like a token was refused; inside a path, a URL, a sweep
    function or after --token/login it was saved in .hydra/, multirun.yaml, result.json and W&B's argv."""
    from sectune.tracking import secret_overrides

    assert secret_overrides([override]) == [f"{override.partition('=')[0]}=…"]


def test_a_commit_hash_under_a_revision_key_is_not_a_secret_and_redact_masks_only_the_secret_inside_a_value():
    from sectune.tracking import secret_overrides

    sha = "0123456789abcdef" * 2 + "01234567"
    assert secret_overrides([f"model.revision={sha}", f"++model.commit={sha}", "hydra.launcher.setup=['wandb login --relogin']",
                             "hydra.launcher.setup=['huggingface-cli login --token $HF_TOKEN']", "dataset.path=https://host/x"]) == []
    assert secret_overrides([f"+x={sha}"]) == ["+x=…"]  # the same 40 hex under another key: a W&B key's shape
    out = redact({"path": "https://alice:pw@host/a", "rev": "/data/hf_" + "C" * 34 + "/x", "ok": "/data/auth"})
    assert out["path"] == f"https://{REDACTED}@host/a" and out["rev"] == f"/data/{REDACTED}/x" and out["ok"] == "/data/auth"


def test_trust_remote_code_set_on_the_command_line_is_said_and_kept_in_result_json(tmp_path):
    run = sectune(["stage=plan", "logger=none", "model.trust_remote_code=true"], tmp_path / "run")
    assert run.returncode == 0, run.stderr[-1500:]
    assert "model.trust_remote_code=true" in run.stderr
    assert any("trust_remote_code" in w for w in json.loads((tmp_path / "run" / "result.json").read_text())["warnings"])


def test_a_model_name_cannot_place_the_tiny_model_outside_the_cache(tmp_path):
    from sectune.models.tiny import ensure_tiny_model

    spec = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 32,
            "vocab_size": 300, "max_position_embeddings": 64, "seed": 0}
    out = ensure_tiny_model("../../escape/x", "llama", spec, tmp_path / "no_shared_data", tmp_path / "cache")
    assert out.parent == tmp_path / "cache" / "models" and (out / "BUILD_INFO.json").is_file()
    assert not (tmp_path / "escape").exists()


def test_building_a_tiny_model_leaves_the_callers_rng_alone(tmp_path):
    """A run that builds the tiny model first must train like one that finds it cached (same RNG)."""
    import torch

    from sectune.models.tiny import ensure_tiny_model

    spec = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 32,
            "vocab_size": 300, "max_position_embeddings": 64, "seed": 0}
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    out = ensure_tiny_model("t", "llama", spec, tmp_path / "no_shared_data", tmp_path / "cache")
    assert (out / "BUILD_INFO.json").is_file()
    torch.testing.assert_close(torch.rand(4), expected)


def test_tiny_init_std_is_a_config_key_and_reaches_the_model(tmp_path):
    """model.tiny.init_std composes (it used to be rejected as unknown) and is the built model's initializer_range."""
    import json

    from omegaconf import OmegaConf

    from sectune.models.tiny import ensure_tiny_model

    cfg = compose(["model.tiny.init_std=0.05", "model.tiny.hidden_size=16", "model.tiny.num_layers=1",
                   "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.intermediate_size=32",
                   "model.tiny.vocab_size=300", "model.tiny.max_position_embeddings=64"])
    spec = OmegaConf.to_container(cfg.model.tiny)
    assert spec["init_std"] == 0.05
    out = ensure_tiny_model("t", "llama", spec, tmp_path / "no_shared_data", tmp_path / "cache")
    assert json.loads((out / "config.json").read_text())["initializer_range"] == 0.05


def test_wandb_online_that_cannot_start_falls_back_to_offline_with_one_warning(tmp_path, monkeypatch, capsys):
    """A W&B key on a node without network: wandb.init timed out after ~100 s and the run died with a traceback."""
    import wandb

    from sectune import tracking

    calls = []

    def fake_init(mode, **kw):
        calls.append(mode)
        if mode == "online":
            raise wandb.errors.CommError("Timed out while retrying: no such host")
        return "offline-run"

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert tracking.start(compose(["logger=wandb"]), tmp_path) == "offline-run" and calls == ["online", "offline"]
    err = capsys.readouterr().err
    assert "W&B could not start online (CommError: Timed out while retrying" in err and "logging offline" in err
    assert __import__("os").environ["WANDB_MODE"] == "offline"
    calls.clear()
    monkeypatch.setattr(wandb, "init", lambda mode, **kw: (_ for _ in ()).throw(ValueError("bad dir")))
    with pytest.raises(ValueError):  # offline failures are not hidden
        tracking.start(compose(["logger=wandb", "logger.mode=offline"]), tmp_path)


def test_models_load_without_hub_kernels(tmp_path):
    """transformers 5.2x kernelizes every from_pretrained by default (on a GPU: layers swapped for kernels
    downloaded from the hub). A sectune process loads with torch's own layers unless the user opts in."""
    import os
    import subprocess
    import sys

    from sectune.models.tiny import ensure_tiny_model

    spec = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 32,
            "vocab_size": 300, "max_position_embeddings": 64, "seed": 0}
    out = ensure_tiny_model("t", "llama", spec, tmp_path / "no_shared_data", tmp_path / "cache")
    code = ("import sectune, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(%r); "
            "print('use_kernels', m.use_kernels)\n"
            "import kernels\n"  # what bitsandbytes asks at import, on AVX512-bf16 CPUs: refused, no network lookup
            "try:\n    kernels.get_kernel('kernels-community/quantization-bitsandbytes', version=1)\n"
            "except RuntimeError as e:\n    print('refused', 'USE_HUB_KERNELS=1' in str(e))\n") % str(out)
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-2:] == ["use_kernels False", "refused True"]
    # bitsandbytes logged that refusal as a failure to fix ("pip install kernels") at every import; it is sectune's choice
    quiet = subprocess.run([sys.executable, "-c", "import sectune, bitsandbytes"], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0 and "gemm_4bit_forward" not in quiet.stderr, quiet.stderr[-2000:]


def test_the_readmes_max_memory_override_composes_with_gpu_indices_as_numbers():
    """README's example failed in every form (int key vs a str-keyed schema; a null default crashed the merge)."""
    cfg = compose(["model=llama32_3b_instruct", '++model.max_memory={0:"7GiB",cpu:"30GiB"}'])
    assert dict(cfg.model.max_memory) == {0: "7GiB", "cpu": "30GiB"}
    assert dict(compose(["+experiment=auth_grpo"]).model.max_memory) == {"0": "7GiB", "cpu": "48GiB"}
    assert not compose([]).model.max_memory  # no caps by default


def test_the_readmes_max_memory_example_runs_and_without_plus_plus_the_error_says_how(tmp_path):
    """It composed, and then every run died in the config digest (json cannot order the keys 0 and "cpu");
    without ++ Hydra's "Key '0' is not in struct" said nothing about how to give the mapping."""
    from sectune.runner import config_digest

    over = ["model=llama32_3b_instruct", "quantization=nf4", "model.device_map=auto", '++model.max_memory={0:"7GiB",cpu:"30GiB"}']
    assert config_digest(compose(over)) == config_digest(compose(over)) != config_digest(compose(over[:3]))
    run = sectune(["stage=plan", "logger=none", *over], tmp_path / "run")
    assert run.returncode == 0 and run.result["status"] == "succeeded", run.stderr[-1500:]
    bad = sectune(["stage=plan", "logger=none", 'model.max_memory={0:"7GiB"}', "--cfg", "job"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "model.max_memory is a mapping of your own keys: add them with ++ (++model.max_memory={...} or ++model.max_memory.<key>=<value>)")
    typo = sectune(["stage=plan", "logger=none", "model.max_memor=1", "--cfg", "job"])
    assert typo.returncode == 2 and "++" not in typo.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("overrides, message", [
    (["quantization.load_in_4bit=true"], "quantization.load_in_4bit=True: does nothing with quantization=none"),
    (["++model.max_memory={cpu: 8GiB}"], "model.max_memory={'cpu': '8GiB'}: is used only with model.device_map"),
    (["model.offload_folder=/tmp/off"], "model.offload_folder=/tmp/off: is used only with model.device_map"),
    (["lora=none", "lora.r=16"], "lora.r=16: has no effect: LoRA is off"),
    (["train.warmup_ratio=1.0"], "train.warmup_ratio=1.0: must be in [0, 1)"),
    (["stage=reward", "dataset=auth_preferences", "loss.label_smoothing=0.1"], "loss.label_smoothing=0.1: stage=reward does not use it"),
    (["stage=rl", "loss=grpo", "loss.label_smoothing=0.1"], "loss.label_smoothing=0.1: stage=rl does not use it"),
    (["stage=dpo", "loss=dpo", "dataset=auth_preferences", "loss.label_smoothing=0.5"], "loss.label_smoothing=0.5: must be < 0.5 for stage=dpo"),
    (["stage=sft", "debug.enabled=true"], "debug.enabled=True: only stage=contrastive has a debug mode"),
    (["stage=federated", "dataset=hdfs", "train.resume=auto"], "train.resume=auto: stage=federated does not resume"),
    (["stage=evaluate", "dataset=hdfs", "evaluate.data_path=/x.csv"], "evaluate.data_path=/x.csv: scores a classify run"),
    # an audit (session 32): values handed to a library as they are, which crashed with its traceback (some after training)
    (["train.lr_scheduler=cosinee"], "train.lr_scheduler=cosinee: choose one of linear, cosine,"),
    (["model.attn_implementation=flash"], "model.attn_implementation=flash: choose one of eager, sdpa,"),
    (["model.device_map=gpu7"], "model.device_map=gpu7: choose auto, balanced"),
    (["train.empty_cache_steps=-1"], "train.empty_cache_steps=-1: must be >= 1"),
    (["logger.mode=offlin"], "logger.mode=offlin: choose one of online, offline, disabled, shared"),
    (["logger=none", "logger.mode=offline"], "logger.mode=offline: is W&B's; logger=none does not read it"),
    (["stage=classify", "dataset=cic_iot_2023_merged", "evaluate.rf_estimators=-5"], "evaluate.rf_estimators=-5: must be >= 1"),
    (["stage=evaluate", "dataset=injection_triplets", "evaluate.max_samples=0"], "evaluate.max_samples=0: must be >= 1"),
    (["stage=classify", "dataset=cic_iot_2023_merged", "dataset.render_precision=-1"], "dataset.render_precision=-1: must be >= 0"),
    (["model.tiny.num_heads=3"], "model.tiny.num_heads=3: must divide model.tiny.hidden_size=128"),
    (["model.tiny.num_kv_heads=3"], "model.tiny.num_kv_heads=3: must divide model.tiny.num_heads=4"),
    (["stage=federated", "dataset=hdfs", "federated.ray_num_cpus=-2"], "federated.ray_num_cpus=-2: must be >= 1"),
    (["stage=federated", "dataset=hdfs", "federated.lr_min_ratio=-1"], "federated.lr_min_ratio=-1.0: must be in [0, 1]"),
    (["stage=federated", "dataset=hdfs", "federated.eval_every=0"], "federated.eval_every=0: must be >= 1"),
    (["stage=pipeline", "pipeline.heldout_max_windows=0"], "pipeline.heldout_max_windows=0: must be >= 1"),
    (["stage=reward", "dataset=auth_preferences", "reward.memory_limit_gb=-1"], "reward.memory_limit_gb=-1.0: must be > 0"),
    (["stage=reward", "dataset=auth_preferences", "loss=dpo"], "loss=dpo: stage=reward trains a Bradley-Terry reward model"),
    (["stage=reward", "dataset=auth_preferences", "loss=grpo"], "loss=grpo: stage=reward trains a Bradley-Terry reward model"),
    (["stage=doctor", "doctor.min_free_disk_gb=-1"], "doctor.min_free_disk_gb=-1.0: must be >= 0"),
    # session 41 (an audit of resume): a ValueError traceback after loading
    (["stage=reward", "dataset=auth_preferences", "train.group_by_length=true"], "train.group_by_length=True: stage=reward batches pairs"),
    (["stage=contrastive", "loss=causal_contrastive", "dataset=injection_triplets", "train.group_by_length=true"],
     "train.group_by_length=True: stage=contrastive batches pairs or triplets"),
    # session 40 (an audit of settings combined): a transformers traceback after loading; no warm-up; ~sqrt(batch) less noise
    (["train.lr_scheduler=reduce_lr_on_plateau"], "train.lr_scheduler=reduce_lr_on_plateau: changes the rate when the validation"),
    # session 42 (an audit of resume): greedy steps on evaluation too; stage=rl runs no Trainer evaluation at all
    (["train.lr_scheduler=greedy"], "train.lr_scheduler=greedy: changes the rate when the validation"),
    (["stage=rl", "loss=grpo", "train.lr_scheduler=reduce_lr_on_plateau", "train.eval_steps=1"],
     "train.lr_scheduler=reduce_lr_on_plateau: changes the rate on Trainer's validation loss, which stage=rl never computes"),
    (["stage=rl", "loss=simplified_ppo", "train.lr_scheduler=greedy", "train.eval_steps=1"], "train.lr_scheduler=greedy: changes the rate on"),
    (["train.lr_scheduler=greedy", "train.eval_steps=5", "train.warmup_ratio=0.1"], "train.warmup_ratio=0.1: has no effect with train.lr_scheduler=greedy"),
    (["train.lr_scheduler=reduce_lr_on_plateau", "train.eval_steps=5", "dataset.val_fraction=0"], "train.lr_scheduler=reduce_lr_on_plateau"),
    (["train.lr_scheduler=constant", "train.warmup_ratio=0.5"], "train.warmup_ratio=0.5: has no effect with train.lr_scheduler=constant"),
    (["train.neftune_noise_alpha=5"], "train.neftune_noise_alpha=5.0: with train.packing=padding_free: NEFTune divides"),
    # session 44 (an audit of weight handling): TRL's ValueError traceback once the data and the model had loaded
    (["stage=sft", "lora.target_modules=[q_proj,v_proj,lm_head]"], "lora.target_modules=['q_proj', 'v_proj', 'lm_head']: stage=sft cannot train LoRA on lm_head"),
])
def test_settings_a_run_would_ignore_are_refused_naming_the_key(overrides, message):
    """Each of these was accepted and changed nothing (an audit of every setting against the code that reads it)."""
    from sectune.config_checks import check_values
    from sectune.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        check_values(compose(overrides))
    assert str(e.value).startswith(message), str(e.value)


def test_the_learning_rate_schedules_sectune_accepts_are_transformers_own():
    from transformers.trainer_utils import SchedulerType

    from sectune.config_effects import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


def test_the_settings_those_checks_leave_alone_still_run():
    from sectune.config_checks import check_values

    for ok in (["stage=dpo", "loss=dpo", "dataset=auth_preferences", "loss.label_smoothing=0.1"], ["stage=sft", "loss.label_smoothing=0.1"],
               ["stage=rl", "loss=simplified_ppo", "loss.label_smoothing=0.1"], ["lora=r16_all_linear", "lora.r=32"],
               ["model.device_map=auto", "++model.max_memory={cpu: 8GiB}"], ["stage=contrastive", "loss=causal_contrastive", "debug.enabled=true"],
               ["model.device_map=cuda:1", "model.attn_implementation=eager", "train.lr_scheduler=cosine_with_min_lr"],
               ["model.attn_implementation=kernels-community/flash-attn"], ["++model.device_map={lm_head: cpu}"], ["logger.mode=online"],
               ["model=tiny_gpt2", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=3"],
               ["train.lr_scheduler=reduce_lr_on_plateau", "train.eval_steps=5"], ["train.lr_scheduler=constant_with_warmup", "train.warmup_ratio=0.5"],
               ["train.neftune_noise_alpha=5", "train.packing=none"], ["stage=classify", "train.lr_scheduler=reduce_lr_on_plateau"],
               ["train.lr_scheduler=greedy", "train.eval_steps=5"], ["stage=sft", "lora.modules_to_save=[lm_head]"],
               ["stage=federated", "dataset=hdfs", "lora.target_modules=[q_proj,lm_head]"]):
        check_values(compose(ok))


def test_messages_name_the_model_a_user_set_not_the_preset_it_replaced(tmp_path):
    """With only model.name_or_path set, every message called the user's own model by the preset it replaced
    (``model=tiny_llama``); the preset's own model keeps the preset's name."""
    from sectune.models.modeling import model_label

    assert model_label(compose([]).model) == "model=tiny_llama"
    assert model_label(compose(["model.name_or_path=/models/mine"]).model) == "model.name_or_path=/models/mine"
    assert model_label(compose(["model=smollm_135m"]).model) == "model=smollm_135m"
    assert model_label(compose(["model=smollm_135m", "model.name_or_path=HuggingFaceTB/SmolLM-135M"]).model) == "model=smollm_135m"
    assert model_label(compose(["model=smollm_135m", "model.name_or_path=HuggingFaceTB/SmolLM-360M"]).model) == \
        "model.name_or_path=HuggingFaceTB/SmolLM-360M"


def test_a_model_folder_that_is_not_there_is_named_as_a_missing_folder_not_a_hub_download(tmp_path):
    """model.name_or_path=/runs/old/model (deleted) said it was "not in the local Hugging Face cache" and to run
    `hf download /runs/old/model`."""
    from sectune.errors import ModelNotAvailableError
    from sectune.models import modeling

    cfg = compose([f"model.name_or_path={tmp_path / 'gone' / 'model'}"])
    with pytest.raises(ModelNotAvailableError, match=r"^model.name_or_path='[^']*gone/model': no such folder$"):
        modeling.load_tokenizer(cfg)
    for name in ("/a/b", "./m", "../m", "~/m", "runs/x/model"):
        assert modeling.looks_like_a_path(name), name
    for name in ("meta-llama/Llama-2-7b-hf", "gpt2", "HuggingFaceTB/SmolLM-135M"):
        assert not modeling.looks_like_a_path(name), name


@pytest.mark.parametrize("args, says", [
    (["--config-dir", "no_such_dir", "--cfg", "job"], "no_such_dir' not found (--config-dir / -cd)"),
    (["-m", "stage=plan", "--cfg", "job"], "drop -m and give each swept key one value"),
])
def test_a_command_line_hydra_cannot_run_is_one_line_and_exit_2(args, says):
    """A missing --config-dir was a bare line and exit 1; -m with --cfg job a ValueError traceback."""
    run = cli(args)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("sectune: error: ") and says in last


def test_a_preset_that_is_not_valid_yaml_is_named_with_its_line_and_exit_2(tmp_path):
    """A --config-dir preset with a YAML syntax error was yaml's traceback and exit 1 (an audit, session 32)."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "broken.yaml").write_text("# @package _global_\ntrain:\n  max_steps: [1\n")
    run = cli(["--config-dir", str(tmp_path), "+experiment=broken", "logger=none", "--cfg", "job"])
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-1500:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sectune: error: {tmp_path / 'experiment' / 'broken.yaml'}: line 4, column 1: not valid YAML (")


def test_a_missing_plugin_names_the_extra_that_brings_it():
    """Without the optuna/slurm extras Hydra said only "Could not find 'hydra/sweeper/optuna'"."""
    from sectune.cli import _extra_hint

    assert "pip install 'sectune[optuna]'" in _extra_hint("Could not find 'hydra/sweeper/optuna'")
    assert "pip install 'sectune[slurm]'" in _extra_hint("In 'hydra/launcher/local': Could not load 'hydra/launcher/submitit_local'")
    assert _extra_hint("Could not find 'model/tiny_llamma'") == ""


def test_version_names_sectune():
    run = cli(["--version"])
    assert run.returncode == 0 and run.stdout.startswith("sectune 0.") and "Hydra 1.3" in run.stdout


def test_deleting_a_node_or_nulling_a_group_is_one_line_and_a_succeeded_runs_record_stays(tmp_path):
    """An audit (session 25): `~train` failed with a traceback after Hydra had written the broken config over a succeeded
    run's .hydra/; `model=null` was a Hydra ValueError traceback; a sweep with a mistyped group option left an earlier
    sweep's multirun.yaml replaced by its own."""
    run = tmp_path / "run"
    ok = sectune(["stage=plan", "logger=none"], run)
    assert ok.returncode == 0, ok.stderr[-1500:]
    saved = (run / ".hydra" / "config.yaml").read_bytes()
    for args, says in ((["~train"], "~train: 'train' is a node every run has and cannot be deleted"),
                       (["~stage"], "'stage' is a node every run has"),
                       (["model=null"], "Config group override must be a string or a list")):
        p = cli(["stage=plan", "logger=none", *args, f"hydra.run.dir={run}"])
        assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr[-1500:]
    assert (run / ".hydra" / "config.yaml").read_bytes() == saved
    sweep = tmp_path / "sweep"
    first = cli(["-m", "stage=plan", "logger=none", "train.seed=1,2", f"hydra.sweep.dir={sweep}"])
    assert first.returncode == 0, first.stderr[-1500:]
    kept = (sweep / "multirun.yaml").read_bytes()
    typo = cli(["-m", "stage=plan", "logger=none", "lora=r4_attention,r4_atention", f"hydra.sweep.dir={sweep}"])
    assert typo.returncode == 2 and "r4_atention" in typo.stderr
    assert (sweep / "multirun.yaml").read_bytes() == kept


def test_fp32_training_on_weights_loaded_in_bf16_says_what_it_does_not_cover(capsys):
    """model.dtype and train.precision are separate keys: a bf16-loaded model asked for fp32 computes its frozen base in bf16
    (and with lora=none trains bf16 weights with bf16 optimizer state). The run says so (an audit, precision: it did not)."""
    from sectune.training import engine

    assert engine.precision_flags(compose(["train.precision=fp32", "model.dtype=bf16"])) == {"bf16": False, "fp16": False}
    err = capsys.readouterr().err
    assert "model.dtype=bf16" in err and "frozen base computes in bf16" in err and "model.dtype=fp32" in err
    assert "optimizer state" not in err  # LoRA: the adapter is peft's fp32
    engine.precision_flags(compose(["train.precision=fp32", "model.dtype=bf16", "lora=none"]))
    assert "trains bf16 weights with bf16 optimizer state" in capsys.readouterr().err
    for quiet in (["train.precision=fp32"], ["train.precision=bf16", "model.dtype=bf16"]):  # tiny_llama loads fp32
        engine.precision_flags(compose(quiet))
        assert "warning" not in capsys.readouterr().err, quiet


def test_an_interpolation_to_a_missing_key_is_one_line_and_leaves_a_finished_runs_config_as_it_was(tmp_path):
    """An audit (session 36): 'dataset.max_samples=${dataset.maxsamples}' was first resolved after Hydra had written
    .hydra/: a traceback (exit 1), and a finished run's saved config overwritten with the typo under a result.json that
    still said succeeded."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("kept: as it was\n")
    for args in ([f"hydra.run.dir={run_dir}"], ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "train.batch_size=1,2"]):
        proc = cli([*args, "stage=plan", "logger=none", "dataset.max_samples=${dataset.maxsamples}"])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "sectune: error: dataset.max_samples: Interpolation key 'dataset.maxsamples' not found" in proc.stderr, proc.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "kept: as it was\n" and not (tmp_path / "sweep").exists()


def test_sft_and_classify_refuse_a_loss_they_do_not_train_and_impossible_lora_or_epoch_values():
    """An audit (session 36): stage=sft loss=dpo (or grpo, bradley_terry, ...) trained the causal-LM loss without a word;
    lora.target_modules=[] and train.epochs=inf passed the checks and failed inside the libraries."""
    from sectune.config_checks import check_values
    from sectune.errors import ConfigError

    for args, key in ((["stage=sft", "loss=dpo"], "loss"), (["stage=sft", "loss=causal_contrastive"], "loss"),
                      (["stage=classify", "loss=grpo"], "loss"), (["lora.target_modules=[]"], "lora.target_modules"),
                      (["train.max_steps=-1", "train.epochs=inf"], "train.epochs")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}="):
            check_values(compose(args))
    for ok in (["stage=sft"], ["stage=classify", "loss=cross_entropy"], ["stage=classify"]):
        check_values(compose(ok))


def test_lora_targets_of_a_linear_subclass_are_found():
    """Falcon's layers are FalconLinear, a subclass of nn.Linear: the check of lora.target_modules compared class names
    exactly, listed lm_head as the model's only linear layer and refused query_key_value and dense, which PEFT trains."""
    from transformers import FalconConfig, FalconForCausalLM

    from sectune.models import modeling

    model = FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    assert {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"} <= set(modeling.linear_module_names(model))
    peft = modeling.apply_lora(model, compose(["lora.target_modules=[query_key_value,dense]"]))
    trainable, _ = modeling.trainable_parameters(peft)
    layers = [m for name, m in peft.named_modules() if name.endswith(("query_key_value.base_layer", "dense.base_layer"))]
    assert len(layers) == 2 and trainable == sum(4 * (m.in_features + m.out_features) for m in layers)  # r=4 on each


def test_a_tokenizer_with_ids_past_the_models_embedding_is_one_line_before_anything_runs(tmp_path):
    """A pad token added to the tokenizer and the model never resized: SFT built its data, started evaluating and died
    with a bare IndexError from the embedding."""
    import shutil

    from transformers import AutoTokenizer

    from sectune.errors import ConfigError
    from sectune.models import modeling

    folder = tmp_path / "added_pad"
    shutil.copytree(modeling.model_path(compose([])), folder)
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    tok.add_special_tokens({"pad_token": "[PAD]", "additional_special_tokens": [f"<x{i}>" for i in range(vocab - len(tok) + 1)]})
    tok.save_pretrained(folder)
    with pytest.raises(ConfigError, match=rf"its tokenizer has {len(tok)} tokens \(pad '\[PAD\]' = id {tok.pad_token_id}\) but config.json's "
                                          rf"vocab_size is {vocab}: ids from {vocab} on have no embedding"):
        modeling.load_tokenizer(compose([f"model.name_or_path={folder}"]))


def test_a_wandb_login_to_the_server_wandb_uses_is_a_key(tmp_path, monkeypatch):
    """An audit (session 41): wandb 0.31 logs in to api.forge.coreweave.com (`wandb login` writes that host to ~/.netrc)
    and a self-hosted server is its own host, but sectune looked for a key under api.wandb.ai alone: every run of a
    logged-in user went offline without a word."""
    from urllib.parse import urlparse

    from sectune import tracking

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    netrc_file = tmp_path / ".netrc"

    def login(host):
        netrc_file.write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
        netrc_file.chmod(0o600)

    default = urlparse(tracking.wandb_base_url()).hostname
    login(default)
    assert tracking.has_api_key()
    login("elsewhere.example")
    assert not tracking.has_api_key()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.corp.example")  # wandb login --host https://wandb.corp.example
    assert tracking.wandb_base_url().startswith("https://wandb.corp.example")
    login("wandb.corp.example")
    assert tracking.has_api_key()
    login("api.wandb.ai")  # an older wandb's login still counts
    assert tracking.has_api_key()


def test_a_wandb_mode_in_the_environment_that_wandb_refuses_is_named_before_anything_runs(monkeypatch):
    """An audit (session 41): WANDB_MODE=Offline (or off) reached wandb.init: a pydantic traceback and a failed run."""
    from sectune.config_checks import check_values
    from sectune.errors import ConfigError

    monkeypatch.setenv("WANDB_MODE", "Offline")
    with pytest.raises(ConfigError, match=r"^WANDB_MODE \(the environment\)=Offline: choose one of online, offline, disabled, shared"):
        check_values(compose(["logger=wandb"]))
    check_values(compose(["logger=wandb", "logger.mode=offline"]))  # the command line wins: WANDB_MODE is not read
    check_values(compose(["logger=none"]))
    for ok in ("offline", "disabled", "dryrun"):
        monkeypatch.setenv("WANDB_MODE", ok)
        check_values(compose(["logger=wandb"]))


def test_the_reward_models_block_mask_needs_attention_that_reads_it():
    # the reward model scores a window's completions in one row under a 4D block mask, which transformers' flash-attention
    # kernels do not read as given: refused before anything loads (GRPO's own scoring falls back, so rules alone pass)
    from sectune.config_checks import check_values
    from sectune.errors import ConfigError

    fa2 = "model.attn_implementation=flash_attention_2"
    for args in (["stage=reward", "loss=bradley_terry", "dataset=auth_preferences", fa2],
                 ["stage=rl", "loss=grpo", "rl.reward_model=/x", "rl.rewards.reward_model=0.1", fa2]):
        with pytest.raises(ConfigError, match=r"^model.attn_implementation=flash_attention_2: .*block mask"):
            check_values(compose(args))
    check_values(compose(["stage=reward", "loss=bradley_terry", "dataset=auth_preferences", "model.attn_implementation=sdpa"]))
    check_values(compose(["stage=rl", "loss=grpo", fa2]))


def test_a_hub_model_on_the_tiny_preset_is_said_to_train_at_the_tiny_models_learning_rate(tmp_path):
    # `sectune model.name_or_path=Qwen/Qwen2.5-0.5B` fine-tuned it at the tiny preset's 1e-2 in fp32 without a word
    from sectune.config_effects import foreign_model_warning

    warning = foreign_model_warning(compose(["model.name_or_path=Qwen/Qwen2.5-0.5B"]))
    assert warning.startswith("model.name_or_path=Qwen/Qwen2.5-0.5B is not model=tiny_llama's tiny model") and "0.01" in warning
    assert foreign_model_warning(compose(["model.name_or_path=Qwen/Qwen2.5-0.5B", "train.learning_rate=2e-4"])) is None
    assert "; model=qwen25_1_5b_instruct is its preset, or set" in foreign_model_warning(
        compose(["model.name_or_path=Qwen/Qwen2.5-1.5B-Instruct"]))  # the preset of that very model is named
    assert foreign_model_warning(compose(["model=smollm_135m"])) is None  # a real preset: its own settings
    assert foreign_model_warning(compose(["stage=infer", "model.name_or_path=Qwen/Qwen2.5-0.5B"])) is None  # no training
    tiny_run = tmp_path / "model"  # a tiny run's own weights (the injection study's model.name_or_path=<SFT run>/model)
    tiny_run.mkdir()
    (tiny_run / "config.json").write_text(json.dumps({"hidden_size": 128, "num_hidden_layers": 2}))
    assert foreign_model_warning(compose([f"model.name_or_path={tiny_run}"])) is None
    (tiny_run / "config.json").write_text(json.dumps({"hidden_size": 896, "num_hidden_layers": 24}))  # a downloaded Qwen
    assert foreign_model_warning(compose([f"model.name_or_path={tiny_run}"])) is not None


def test_rank_stabilised_lora_scales_by_the_square_root_of_the_rank():
    # lora.use_rslora reaches PEFT (alpha / sqrt(r): a higher rank keeps its update's size), and is refused without LoRA
    import math

    from peft.tuners.lora import LoraLayer

    from sectune.config_checks import check_values
    from sectune.errors import ConfigError
    from sectune.models import modeling

    scales = {}
    for rs in (False, True):
        cfg = compose(["lora=r16_all_linear", f"lora.use_rslora={rs}"])
        model = modeling.apply_lora(modeling.load_model(cfg, path=modeling.model_path(cfg)), cfg)
        scales[rs] = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
    r, alpha = cfg.lora.r, cfg.lora.alpha
    assert scales == {False: {alpha / r}, True: {alpha / math.sqrt(r)}}
    with pytest.raises(ConfigError, match="^lora.use_rslora=True: has no effect"):
        check_values(compose(["lora=none", "lora.use_rslora=true"]))
