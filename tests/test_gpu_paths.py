"""What sectune does on GPUs, checked without one: the rank's device under torchrun, fp16 master weights, device maps
under several processes (an audit of the CUDA-only branches, session 42)."""

from __future__ import annotations

import pytest
import torch

from conftest import compose
from sectune import config_checks
from sectune.errors import ConfigError
from sectune.models import lora, modeling
from sectune.training import distributed


def test_each_rank_binds_its_own_gpu_before_a_model_loads(monkeypatch):
    bound = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.bind_local_gpu() == 1 and bound == [1]
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: CUDA's current device is left alone
    assert distributed.bind_local_gpu() is None and bound == [1]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # gloo on CPUs: nothing to bind
    assert distributed.bind_local_gpu() is None and bound == [1]


def test_the_runner_binds_the_gpu_before_it_dispatches_a_stage():
    import inspect

    from sectune import runner

    src = inspect.getsource(runner.run)
    assert src.index("distributed.bind_local_gpu()") < src.index("_earlier_succeeded(")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_trainable_head_in_half_precision_gets_an_fp32_master_copy(precision):
    cfg = compose(["stage=classify", "model=tiny_llama", "model.dtype=fp16" if precision == "fp16" else "model.dtype=bf16",
                   f"train.precision={precision}", "lora=r4_attention", "train.device=cpu"])
    model = lora.apply_lora(modeling.load_model(cfg, task="seq_cls", num_labels=2), cfg, task_type="SEQ_CLS")
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and set(trainable.values()) == {torch.float32}, trainable
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.float16 if precision == "fp16" else torch.bfloat16}  # the base stays in model.dtype
    # a forward outside autocast (the reward model's pair scoring) meets half-precision hidden states: cast, not a crash
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert out.logits.dtype == (torch.float16 if precision == "fp16" else torch.bfloat16) and torch.isfinite(out.logits).all()
    # a trainable bias beside a frozen weight (lora.bias=all) stays in the module's dtype; an embedding trained whole gives
    # the layers its own dtype back (each crashed outside autocast: a review, session 42)
    gpt2 = compose(["stage=sft", "model=tiny_gpt2", "model.dtype=bf16", "train.precision=bf16", "lora=r4_attention", "lora.bias=all"])
    m2 = lora.apply_lora(modeling.load_model(gpt2), gpt2)
    biases = {p.dtype for n, p in m2.named_parameters() if p.requires_grad and n.endswith(".bias") and "lora_" not in n}
    assert biases == {torch.bfloat16}
    llama = compose(["stage=sft", "model=tiny_llama", "model.dtype=bf16", "train.precision=bf16", "lora=r4_attention",
                     "lora.modules_to_save=[embed_tokens]"])
    m3 = lora.apply_lora(modeling.load_model(llama), llama)
    assert {p.dtype for n, p in m3.named_parameters() if "modules_to_save" in n} == {torch.float32}
    with torch.no_grad():
        for m in (m2, m3):
            assert torch.isfinite(m(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
    cfg32 = compose(["stage=classify", "model=tiny_llama", "model.dtype=bf16", "train.precision=fp32", "lora=r4_attention"])
    m32 = lora.apply_lora(modeling.load_model(cfg32, task="seq_cls", num_labels=2), cfg32, task_type="SEQ_CLS")
    # without autocast an fp32 head would meet bf16 hidden states: left in model.dtype
    assert {p.dtype for n, p in m32.named_parameters() if p.requires_grad and "score" in n} == {torch.bfloat16}


def test_full_fine_tuning_of_fp16_weights_under_fp16_precision_is_refused():
    with pytest.raises(ConfigError, match="model.dtype.*fp16.*gradient scaler"):
        config_checks.check_values(compose(["stage=sft", "lora=none", "model.dtype=fp16", "train.precision=fp16"]))
    for ok in (["lora=none", "model.dtype=fp32", "train.precision=fp16"], ["model.dtype=fp16", "train.precision=fp16"],
               ["stage=infer", "lora=none", "model.dtype=fp16", "train.precision=fp16"]):
        config_checks.check_values(compose(["stage=sft", *ok] if not ok[0].startswith("stage") else ok))


def test_a_device_map_that_spreads_the_model_is_refused_under_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="model.device_map=auto.*2 processes"):
        config_checks.check_values(compose(["stage=sft", "model.device_map=auto"]))
    config_checks.check_values(compose(["stage=sft"]))  # null: each rank's own GPU
    monkeypatch.setenv("WORLD_SIZE", "1")
    config_checks.check_values(compose(["stage=sft", "model.device_map=auto"]))  # one process spreads one copy
