"""Each bad input: one clear line naming the file/key, a non-zero exit, nothing complete left."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import FAST, sectune
from sectune.data import auth_logs

ARGS = [*FAST, "train.max_steps=2"]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("auth") / "auth"
    auth_logs.build_auth_folder(out, tmp_path_factory.mktemp("nosrc"), seed=3)  # generated logs: fast, no real data
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _assert_failed_cleanly(run, *needles):
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    last = [ln for ln in run.stderr.strip().splitlines() if ln.startswith("sectune: error:")]
    assert len(last) == 1, run.stderr[-2000:]
    for needle in needles:
        assert needle in last[0], last[0]
    res = run.result
    assert res["status"] == "failed" and res["error"]
    assert not (run.run_dir / "adapter").exists() and not (run.run_dir / "model").exists()


def test_txt_without_json(good_folder, tmp_path):
    folder = _copy(good_folder, tmp_path / "d")
    victim = sorted((folder / "Auth_bin").glob("*.json"))[0]
    victim.unlink()
    run = sectune([*ARGS, f"dataset.path={folder}"], tmp_path / "run")
    _assert_failed_cleanly(run, victim.name)


def test_json_that_does_not_parse(good_folder, tmp_path):
    folder = _copy(good_folder, tmp_path / "d")
    victim = sorted((folder / "Auth_bin").glob("*.json"))[1]
    victim.write_text('{"verdict": "benign",\n  "failed_logins": oops}\n')
    run = sectune([*ARGS, f"dataset.path={folder}"], tmp_path / "run")
    _assert_failed_cleanly(run, victim.name, "line 2")


def test_json_failing_the_schema(good_folder, tmp_path):
    folder = _copy(good_folder, tmp_path / "d")
    victim = sorted((folder / "Auth_bin").glob("*.json"))[2]
    obj = json.loads(victim.read_text())
    obj["verdict"] = "catastrophic"
    victim.write_text(json.dumps(obj))
    run = sectune([*ARGS, f"dataset.path={folder}"], tmp_path / "run")
    _assert_failed_cleanly(run, victim.name, "verdict")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    run = sectune([*ARGS, f"dataset.path={tmp_path / 'empty'}"], tmp_path / "run")
    _assert_failed_cleanly(run, str(tmp_path / "empty"))


def test_missing_lora_target_lists_the_modules_the_model_has(good_folder, tmp_path):
    run = sectune([*ARGS, f"dataset.path={good_folder}", "lora.target_modules=[c_attn]"], tmp_path / "run")
    _assert_failed_cleanly(run, "c_attn", "q_proj", "gate_proj")


def test_max_seq_length_past_learned_positions_is_refused_before_training(good_folder, tmp_path, capsys):
    """GPT-2's positions are learned: model.max_seq_length past them trained until the first long batch hit an index
    error (an audit, session 25). Rotary positions (Llama) run past max_position_embeddings: a warning, not an error."""
    from transformers import GPT2Config, LlamaConfig

    from sectune.errors import ConfigError
    from sectune.models.modeling import check_positions

    run = sectune([*ARGS, f"dataset.path={good_folder}", "model=tiny_gpt2", "model.max_seq_length=4096"], tmp_path / "run")
    _assert_failed_cleanly(run, "model.max_seq_length=4096", "2048 learned positions")
    with pytest.raises(ConfigError, match="1024 learned positions"):
        check_positions(GPT2Config(n_positions=1024), 1025, "gpt2")
    check_positions(GPT2Config(n_positions=1024), 1024, "gpt2")
    assert capsys.readouterr().err == ""
    check_positions(LlamaConfig(max_position_embeddings=2048), 4096, "llama")
    assert "past llama's max_position_embeddings=2048" in capsys.readouterr().err


def test_real_preset_without_weights_says_how_to_provide_them(good_folder, tmp_path):
    run = sectune([*ARGS, f"dataset.path={good_folder}", "model=smollm_135m"], tmp_path / "run", env={"HF_HUB_OFFLINE": "1"})
    _assert_failed_cleanly(run, "HuggingFaceTB/SmolLM-135M", "model.name_or_path=")


def test_existing_result_is_not_corrupted_by_a_failing_rerun(good_folder, tmp_path):
    run_dir = tmp_path / "run"
    ok = sectune([*ARGS, f"dataset.path={good_folder}"], run_dir)
    assert ok.returncode == 0, ok.stderr[-2000:]
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    earlier = ok.result
    bad = sectune([*ARGS, f"dataset.path={tmp_path / 'nope'}"], run_dir)
    assert bad.returncode == 2
    # the earlier adapter is untouched, so result.json is the earlier run's again; the attempt's is result.failed.json
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert bad.result == earlier and earlier["status"] == "succeeded"
    assert json.loads((run_dir / "result.failed.json").read_text())["status"] == "failed"


def test_examples_left_with_no_answer_token_are_counted_apart_from_those_cut_short(good_folder, tmp_path):
    """TRL leaves out an example whose prompt alone fills model.max_seq_length; the warning said they all "lose the end
    of their answer" and result.json had no count, while the eval loss was over 3 of 43 windows (audit AB)."""
    import statistics

    from conftest import compose
    from sectune import data
    from sectune.models import modeling

    over = [f"dataset.path={good_folder}", "dataset.max_samples=24"]
    cfg = compose(over)
    splits = data.sft_splits(cfg)
    tok = modeling.load_tokenizer(cfg, modeling.model_path(cfg))
    prompt_len = {name: [len(ids) for ids in tok([r["prompt"] for r in splits[name]])["input_ids"]] for name in ("train", "validation")}
    L = int(statistics.median(prompt_len["train"] + prompt_len["validation"])) + 1
    expected = {name: sum(n >= L for n in lens) for name, lens in prompt_len.items()}
    assert 0 < expected["train"] < len(splits["train"]) and expected["validation"] < len(splits["validation"])
    run = sectune([*ARGS, *over, f"model.max_seq_length={L}"], tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.result["metrics"]["dropped_examples"] == sum(expected.values())
    assert f"left out, with no answer token once cut: {expected['train']} training" in run.stdout


def test_max_seq_length_shorter_than_every_prompt_says_which_setting(good_folder, tmp_path):
    run = sectune([*ARGS, f"dataset.path={good_folder}", "dataset.max_samples=12", "model.max_seq_length=4"], tmp_path / "run")
    _assert_failed_cleanly(run, "model.max_seq_length=4", "dropped", "raise model.max_seq_length")
    assert "num_samples" not in run.stderr and "Traceback" not in run.stderr


def test_an_adapter_folder_or_a_run_dir_as_the_model_is_named_as_such(good_folder, tmp_path):
    """model.name_or_path=<run>/adapter trained 0 parameters (transformers loaded the adapter onto its base) and then
    failed to save with a PEFT-version traceback; a run dir failed with a tokenizer-backend traceback."""
    adapter = tmp_path / "sft" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    run = sectune([*ARGS, f"dataset.path={good_folder}", "lora=none", f"model.name_or_path={adapter}"], tmp_path / "run")
    _assert_failed_cleanly(run, f"model.name_or_path={adapter}: a LoRA adapter, not model weights", "lora=none")
    (tmp_path / "sft" / "result.json").write_text("{}")
    run = sectune([*ARGS, f"dataset.path={good_folder}", f"model.name_or_path={tmp_path / 'sft'}"], tmp_path / "run2")
    _assert_failed_cleanly(run, "a sectune run dir, not a model folder", "saved a LoRA adapter (adapter/)")


def test_a_model_folder_with_pickled_code_or_its_own_code_is_refused_in_one_line_and_runs_nothing(tmp_path):
    """An audit (session 37): torch and transformers refused both (no code ran), but the run ended in a traceback whose
    only advice was the unsafe option (weights_only=False, trust_remote_code=True). Now one line naming the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import compose
    from sectune.errors import ModelNotAvailableError
    from sectune.models import modeling

    cfg = compose(["logger=none"])
    tiny = Path(modeling.model_path(cfg))
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny, pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    torch.save({"model.embed_tokens.weight": Evil()}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelNotAvailableError, match="pickled objects beyond tensors; sectune loads pickled weights with weights_only=True"):
        modeling._from_pretrained(AutoModelForCausalLM.from_pretrained, str(pickled), cfg)
    own_code = tmp_path / "own_code"
    shutil.copytree(tiny, own_code)
    conf = json.loads((own_code / "config.json").read_text())
    (own_code / "config.json").write_text(json.dumps({**conf, "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (own_code / "configuration_evil.py").write_text(f"import os\nos.system('touch {marker}')\n")
    with pytest.raises(ModelNotAvailableError, match="needs its own code .* runs only with model.trust_remote_code=true"):
        modeling._from_pretrained(AutoModelForCausalLM.from_pretrained, str(own_code), cfg)
    assert not marker.exists()


def test_a_model_with_nothing_trainable_is_refused():
    import torch

    from sectune.errors import ConfigError
    from sectune.models.modeling import trainable_parameters

    m = torch.nn.Linear(3, 2)
    assert trainable_parameters(m) == (8, 8)
    m.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters in Linear \\(8 frozen\\)"):
        trainable_parameters(m)


@pytest.mark.parametrize("preset, expect, wrapped", [("r4_attention", ["c_attn", "attn.c_proj"], {"attn.c_attn", "attn.c_proj"}),
                                                       ("r16_all_linear", ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
                                                        {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"})])
def test_the_llama_named_lora_presets_work_on_gpt2(preset, expect, wrapped, capsys):
    """model=tiny_gpt2 failed with every lora preset: their q_proj/v_proj/... are not GPT-2's module names."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import compose
    from sectune.models.modeling import apply_lora

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    peft = apply_lora(model, compose([f"lora={preset}", "model=tiny_gpt2"]))
    assert {".".join(n.split(".lora_A")[0].split(".")[-2:]) for n, _ in peft.named_parameters() if "lora_A" in n} == wrapped
    assert f"in tiny_gpt2's GPT-2 blocks that is {expect}" in capsys.readouterr().out


def test_without_network_a_hub_model_fails_at_once_not_after_the_downloads_retries(monkeypatch):
    """Offline, a hub preset took 50-56 s of visible retries to reach the same error."""
    import socket

    from conftest import compose
    from sectune.errors import ModelNotAvailableError
    from sectune.models import modeling

    def refused(*a, **k):
        raise OSError(111, "Connection refused")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(socket, "create_connection", refused)
    modeling.hub_unreachable.cache_clear()
    calls = []

    def loader(path, **kw):
        calls.append(kw.get("local_files_only", False))
        raise OSError("not in the cache")

    with pytest.raises(ModelNotAvailableError, match="huggingface.co unreachable: Connection refused"):
        modeling._from_pretrained(loader, "HuggingFaceTB/SmolLM-135M", compose(["model=smollm_135m"]))
    assert calls == [True]  # the local cache only: no download attempt
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy: nothing probed, the download decides
    modeling.hub_unreachable.cache_clear()
    assert modeling.hub_unreachable() is None
    modeling.hub_unreachable.cache_clear()


def test_a_load_error_that_announces_its_cause_keeps_the_cause():
    """rl.init_from=<a federated run> said only "(RuntimeError: Error(s) in loading state_dict for PeftModelForCausalLM:)"."""
    from sectune.errors import first_line

    e = RuntimeError("Error(s) in loading state_dict for PeftModelForCausalLM:\n\tsize mismatch for lora_A: [4, 64] vs [8, 64].\n\tmore")
    assert first_line(e) == "Error(s) in loading state_dict for PeftModelForCausalLM: size mismatch for lora_A: [4, 64] vs [8, 64]."
    assert first_line(ValueError("bad value\nsecond")) == "bad value" and first_line(KeyError()) == "KeyError"


def test_a_quantized_model_without_lora_is_refused_before_anything_loads_naming_the_keys():
    """An audit (session 25): quantization=nf4 lora=none failed after the data and the model had loaded, saying "no
    trainable parameters … check model.name_or_path", which never named quantization."""
    from conftest import compose
    from sectune.config_checks import check_values
    from sectune.errors import ConfigError

    for stage in ("stage=sft", "stage=dpo dataset=auth_preferences", "stage=reward dataset=auth_preferences"):
        with pytest.raises(ConfigError, match=r"lora=none: with quantization=nf4: quantized weights cannot be trained"):
            check_values(compose([*stage.split(), "quantization=nf4", "lora=none"]))
    check_values(compose(["stage=infer", "quantization=nf4", "lora=none"]))  # generation only: fine


@pytest.mark.parametrize("key", ["rl.init_from", "dpo.init_from"])
def test_an_init_from_adapter_without_its_weights_or_with_them_cut_short_is_named_before_any_model_loads(tmp_path, key):
    """An audit (session 25): a deleted adapter_model.safetensors gave Hugging Face's "Repo id must be in the form …"
    after the base model had loaded; a truncated one a SafetensorError."""
    from sectune.errors import ConfigError
    from sectune.run_records import init_source
    from sectune.stages import dpo

    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    load = (lambda: init_source(str(src), key)) if key == "rl.init_from" else (lambda: dpo.init_source(str(src), "adapter"))
    with pytest.raises(ConfigError, match=rf"{key}={src}: {src} has no adapter_model.safetensors"):
        load()
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64)}, src / "adapter_model.safetensors")
    assert Path(str(load()[1] if key == "rl.init_from" else load())) == src
    data = (src / "adapter_model.safetensors").read_bytes()
    (src / "adapter_model.safetensors").write_bytes(data[:-40])
    with pytest.raises(ConfigError, match=r"adapter_model.safetensors is damaged \(truncated"):
        load()


def test_a_reward_model_cut_short_is_one_line_naming_the_file(tmp_path):
    """An audit (session 25): rl.reward_model on a truncated adapter file ended in a SafetensorError traceback, exit 1."""
    import torch
    from safetensors.torch import save_file

    from sectune.errors import ConfigError
    from sectune.models.reward_model import check_head

    (tmp_path / "adapter_config.json").write_text("{}")
    save_file({"base.score.weight": torch.ones(8, 4)}, tmp_path / "adapter_model.safetensors")
    check_head(tmp_path)
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ConfigError, match=r"adapter_model.safetensors is damaged"):
        check_head(tmp_path)


def test_loss_settings_the_rl_objective_does_not_read_are_refused():
    """An audit (session 25): simplified_ppo (supervised fine-tuning) took loss.beta / clip_epsilon / key_weight, and GRPO
    loss.key_weight, without a word (identical runs either way)."""
    from conftest import compose
    from sectune.config_checks import check_values
    from sectune.errors import ConfigError

    for loss, key in (("simplified_ppo", "beta=0.1"), ("simplified_ppo", "clip_epsilon=0.3"), ("simplified_ppo", "key_weight=5"),
                      ("grpo", "key_weight=5")):
        with pytest.raises(ConfigError, match=rf"loss.{key.split('=')[0]}=.*: is not read by loss={loss}"):
            check_values(compose(["stage=rl", f"loss={loss}", f"loss.{key}"]))
    check_values(compose(["stage=rl", "loss=grpo", "loss.beta=0.1", "loss.clip_epsilon=0.3"]))  # GRPO's own


@pytest.mark.parametrize("override, says", [
    ("model.max_seq_length=-1", "model.max_seq_length=-1: must be >= 1"),  # finished as a succeeded run
    ("train.logging_steps=0", "train.logging_steps=0: must be >= 1"),
    ("train.seed=-1", "train.seed=-1: must be in 0..4294967295"),
    ("train.num_workers=-1", "train.num_workers=-1: must be >= 0"),
    ("train.weight_decay=nan", "train.weight_decay=nan: must be a finite number >= 0"),
    ("train.neftune_noise_alpha=-1", "train.neftune_noise_alpha=-1.0: must be > 0"),
    ("train.eval_steps=-1", "train.eval_steps=-1: must be >= 0"),
    ("train.save_total_limit=-1", "train.save_total_limit=-1: must be >= 1"),
    ("dataset.max_samples=0", "dataset.max_samples=0: must be >= 1"),
    ("dataset.val_fraction=nan", "dataset.val_fraction=nan: must be in [0, 1)"),
    ("dataset.test_fraction=0.9", "dataset.val_fraction=0.15: + dataset.test_fraction=0.9 must be < 1"),
    ("loss.key_weight=-1", "loss.key_weight=-1.0: must be a finite number > 0"),
])
def test_values_that_crashed_after_loading_or_passed_silently_are_refused_before_anything_loads(override, says):
    """An audit (session 25): each crashed with a traceback after the data and model loaded, or was taken without a word."""
    from conftest import compose
    from sectune.config_checks import check_values
    from sectune.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        check_values(compose([override]))
    assert str(e.value).startswith(says), str(e.value)
