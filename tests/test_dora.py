"""lora.use_dora: weight-decomposed LoRA (PEFT's use_dora) trained, saved with its magnitude vectors, reloaded, merged by
stage=export, sent whole by stage=federated, and refused where PEFT's DoRA breaks (8-bit weights on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, compose
from sectune import runner
from sectune.errors import ConfigError
from sectune.models import modeling

MAGNITUDE = "lora_magnitude_vector"


def sft(run_dir: Path, *extra: str) -> dict:
    code, _ = runner.run(compose(["stage=sft", *FAST, "train.max_steps=3", "dataset.max_samples=24", "lora.use_dora=true",
                                  *extra]), run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    assert code == 0, result.get("error")
    return result


def row_norms(cfg) -> dict[str, torch.Tensor]:
    """Each DoRA-adapted layer's weight row norms (what PEFT starts the layer's magnitude at), by adapter tensor name."""
    model = modeling.apply_lora(modeling.load_model(cfg, path=modeling.model_path(cfg)), cfg)
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items() if MAGNITUDE in k}


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_a_dora_run_trains_and_saves_its_magnitudes_which_reload_to_the_trained_logits(tmp_path, quantization):
    from peft import PeftModel

    result = sft(tmp_path, f"quantization={quantization}")
    m = result["metrics"]
    assert m["eval_loss"] < m["eval_loss_start"]  # it trained
    adapter = tmp_path / result["artifacts"]["adapter"]
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = compose([f"quantization={quantization}", "lora.use_dora=true"])
    start = row_norms(cfg)
    assert start and set(start) == {k for k in saved if MAGNITUDE in k}  # one per adapted layer, each saved
    assert max((saved[k] - start[k]).abs().max().item() for k in start) > 1e-4  # trained, not the initial norms
    # reloaded with plain PEFT: the trained magnitudes, and (unquantized: the run's probe of its in-memory trained model)
    # the trained model's logits
    model = PeftModel.from_pretrained(modeling.load_model(cfg, path=modeling.model_path(cfg)), str(adapter)).eval()
    loaded = {n.replace(".default.weight", ""): p for n, p in model.named_parameters() if MAGNITUDE in n}
    assert set(loaded) == set(start) and all(torch.equal(loaded[k], saved[k].to(loaded[k].dtype)) for k in start)
    probe = load_file(str(tmp_path / result["artifacts"]["probe_logits"])) if quantization == "none" else \
        {"input_ids": torch.tensor([[1, 5, 9, 13, 17, 21]]), "top_ids": torch.arange(8).expand(1, 6, 8)}
    ids = probe["top_ids"].long()
    with torch.no_grad():
        got = model(input_ids=probe["input_ids"]).logits.float().gather(-1, ids)
        if quantization == "none":
            torch.testing.assert_close(got, probe["top_logits"], rtol=1e-4, atol=1e-4)
        for name, p in model.named_parameters():  # the magnitudes put back at their start: other logits
            if MAGNITUDE in name:
                p.copy_(start[name.replace(".default.weight", "")])
        assert (model(input_ids=probe["input_ids"]).logits.float().gather(-1, ids) - got).abs().max() > 1e-3


def test_stage_export_merges_a_dora_adapter_into_weights_that_answer_as_it_does(tmp_path):
    from test_export import LOGS, adapter_logits, export, logits, plain, sft_step

    from safetensors.torch import save_file

    step = sft_step(tmp_path / "sft", ("lora.use_dora=true",))  # lora_B drawn at random: the adapter moves the model
    assert json.loads((step / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    weights = step / "adapter" / "adapter_model.safetensors"
    state = load_file(str(weights))
    g = torch.Generator().manual_seed(0)
    mags = [k for k in state if MAGNITUDE in k]  # trained magnitudes, not the row norms PEFT starts them at
    assert mags
    save_file({k: v * (1 + 0.2 * torch.rand(v.shape, generator=g)) if k in mags else v for k, v in state.items()}, str(weights))
    code, result = export(step, tmp_path / "out")
    assert code == 0, result.get("error")
    assert result["metrics"]["max_logit_diff"] < 1e-4
    with_adapter, base = adapter_logits(step, LOGS)
    assert (with_adapter - base).abs().max() > 1e-2
    assert torch.allclose(logits(plain(tmp_path / "out" / "model"), LOGS), with_adapter, atol=1e-4, rtol=0)


def test_federated_clients_send_and_load_the_magnitudes_with_lora_a_and_b():
    # FedAvg averages every array a client sends: with DoRA every trained tensor, the magnitudes too, must travel
    from sectune.training import federated

    cfg = compose(["+experiment=hdfs_federated_tiny", "logger=none", "lora.use_dora=true"])
    model = modeling.apply_lora(modeling.load_model(cfg, path=modeling.model_path(cfg)), cfg)
    state = federated.adapter_state(model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(state) == len(trained) and sum(MAGNITUDE in k for k in state) == sum(MAGNITUDE in n for n in trained) > 0
    moved = {k: v + 1 if MAGNITUDE in k else v for k, v in state.items()}
    federated.load_adapter_state(model, moved)
    assert all(torch.equal(v, moved[k]) for k, v in federated.adapter_state(model).items())


def test_dora_on_8bit_weights_on_the_cpu_is_refused_naming_the_key(tmp_path):
    from sectune.config_checks import check_values
    from sectune.run_records import warn_other_quantization

    with pytest.raises(ConfigError, match=r"^lora.use_dora=True: with quantization=int8 on the CPU"):
        check_values(compose(["quantization=int8", "lora.use_dora=true", "train.device=cpu"]))
    check_values(compose(["quantization=nf4", "lora.use_dora=true", "train.device=cpu"]))  # 4-bit: it trains (above)
    with pytest.raises(ConfigError, match=r"^lora.use_dora=True: has no effect"):
        check_values(compose(["lora=none", "lora.use_dora=true"]))
    # an unquantized run's DoRA adapter continued (dpo/rl/contrastive.init_from) on 8-bit weights on the CPU
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    cfg = compose(["stage=dpo", "quantization=int8", "train.device=cpu"])
    with pytest.raises(ConfigError, match=r"^dpo.init_from=x: the adapter in .* is a DoRA adapter .*quantization=int8 on the CPU"):
        warn_other_quantization(cfg, tmp_path / "adapter", "dpo.init_from=x")
    warn_other_quantization(compose(["stage=dpo", "quantization=nf4", "train.device=cpu"]), tmp_path / "adapter", "dpo.init_from=x")


def test_8bit_dora_on_the_cpu_fails_in_peft_as_the_refusal_says():
    # the reason for the refusal, kept honest: when a peft or bitsandbytes release fixes it, this fails and the refusal goes
    cfg = compose(["quantization=int8", "lora.use_dora=true", "train.device=cpu"])
    model = modeling.apply_lora(modeling.load_model(cfg, path=modeling.model_path(cfg)), cfg).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        model(input_ids=ids)
        with pytest.raises(AttributeError, match="NoneType"):
            model(input_ids=ids)
