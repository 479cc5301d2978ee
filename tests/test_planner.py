"""The memory planner: param counts agree with real models, the reference budget is plausible."""
import pytest
import torch

from sectune.training.planner import (
    ARCHS,
    GiB,
    Budget,
    estimate_memory,
    largest_block_bytes,
    lora_param_count,
    measure_arch,
    param_count,
)

REF = dict(quantization="nf4", lora_r=16, lora_targets="all_linear", dtype="bf16", seq_len=2048,
           batch_size=1, gradient_checkpointing=True, device="cuda")


def tiny_llama(tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=1000, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128))


def numel(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "adamw"])
def test_reference_llama2_7b_qlora_near_5_5_gb(optimizer):
    b = estimate_memory(ARCHS["llama2_7b"], optimizer=optimizer, **REF)
    assert isinstance(b, Budget)
    assert b.total == b.weights + b.adapters + b.optimizer_state + b.gradients + b.activations + b.runtime_overhead
    assert abs(b.total - 5.5 * GiB) <= 0.2 * 5.5 * GiB, b.to_markdown()
    if optimizer == "paged_adamw_8bit":  # the seed's setup also lands within 20% of 5.5e9 bytes
        assert abs(b.total - 5.5e9) <= 0.2 * 5.5e9, b.to_markdown()
    assert 3.0 * GiB < b.weights < 4.0 * GiB  # "7B from ~14GB to ~3.5GB"
    assert b.trainable_params == 39_976_960


def test_preset_param_counts_match_published_sizes():
    expect = {"smollm_135m": 134_515_008, "llama2_7b": 6_738_415_616, "llama31_8b": 8_030_261_248,
              "llama32_3b_instruct": 3_212_749_824, "gpt2_large": 774_030_080}
    for name, n in expect.items():
        assert param_count(ARCHS[name]) == n, name
    assert ARCHS["deepseek_r1_distill_llama_8b"] == ARCHS["llama31_8b"]


def test_the_qwen_and_mistral_presets_hold_their_published_sizes_and_qwens_qkv_bias_is_counted():
    # Qwen2.5-1.5B: 1,543,714,304 parameters (its q/k/v biases included); Mistral-7B-v0.3: 7,248,023,552; each preset's
    # arch is the planner's
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conftest import compose

    for name, n in (("qwen25_1_5b_instruct", 1_543_714_304), ("mistral_7b_instruct_v03", 7_248_023_552)):
        arch = dict(compose([f"model={name}"]).model.arch)
        assert arch == ARCHS[name] and param_count(arch) == n, name
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    arch = measure_arch(model.config)
    assert arch["qkv_bias"] is True and param_count(arch) == numel(model)


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_equals_tiny_llama(tie):
    model = tiny_llama(tie)
    arch = measure_arch(model.config)
    assert arch["tie_embeddings"] is tie and arch["num_kv_heads"] == 2
    assert param_count(arch) == numel(model)


def test_param_count_equals_tiny_gpt2():
    model = tiny_gpt2()
    assert param_count(measure_arch(model.config)) == numel(model)


def test_lora_params_equal_peft_tiny_llama():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    arch = measure_arch(model.config)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora_param_count(arch, 4, "attention") == trainable
    b = estimate_memory(arch, lora_r=4, lora_targets="attention", dtype="fp32", device="cpu")
    assert b.trainable_params == trainable and b.adapters == 4 * trainable


def test_lora_all_linear_equals_peft_tiny_gpt2():
    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2()
    arch = measure_arch(model.config)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    assert lora_param_count(arch, 4, "all_linear") == peft_model.get_nb_trainable_parameters()[0]
    assert lora_param_count(arch, 4, ["c_attn", "c_proj", "c_fc"]) == peft_model.get_nb_trainable_parameters()[0]


def test_quantization_orders_weights():
    kw = dict(REF, optimizer="adamw")
    w = {q: estimate_memory(ARCHS["llama31_8b"], **dict(kw, quantization=q)).weights for q in ("nf4", "int8", "none")}
    assert w["nf4"] < w["int8"] < w["none"]
    assert w["none"] == param_count(ARCHS["llama31_8b"]) * 2


def test_gradient_checkpointing_lowers_activations():
    for name in ("llama2_7b", "smollm_135m", "gpt2_large"):
        on = estimate_memory(ARCHS[name], **dict(REF, quantization="none", optimizer="adamw"))
        off = estimate_memory(ARCHS[name], **dict(REF, quantization="none", optimizer="adamw", gradient_checkpointing=False))
        assert on.activations < off.activations, name


def test_selective_checkpointing_sits_between_none_and_full():
    for name in ("llama2_7b", "smollm_135m", "gpt2_large"):
        kw = dict(REF, quantization="none", optimizer="adamw", seq_len=4096)
        full = estimate_memory(ARCHS[name], **kw).activations
        sel = estimate_memory(ARCHS[name], **dict(kw, gradient_checkpointing=False, selective_checkpointing=True)).activations
        none = estimate_memory(ARCHS[name], **dict(kw, gradient_checkpointing=False)).activations
        assert full < sel < none, (name, full, sel, none)


def test_selective_checkpointing_keeps_both_lora_matmul_outputs():
    """Under selective checkpointing each LoRA-wrapped linear keeps lora_A's output (r wide) and
    lora_B's (the layer's output width): Llama-3.2-3B, r16 on all 7 linears, batch 4 x 1024, bf16.
    Left out, the plan was 1.45x below an H200's measured peak; counted, 1.10x."""
    kw = dict(dtype="bf16", seq_len=1024, batch_size=4, selective_checkpointing=True, optimizer="adamw", lora_dropout=0.05)
    with_lora = estimate_memory(ARCHS["llama32_3b_instruct"], lora_r=16, lora_targets="all_linear", **kw).activations
    without = estimate_memory(ARCHS["llama32_3b_instruct"], **kw).activations
    # 28 layers x 4096 tokens x [7 x 16 + (3072 + 1024 + 1024 + 3072 + 8192 + 8192 + 3072)] x 2 bytes
    assert with_lora - without == 28 * 4096 * (7 * 16 + 27648) * 2 == 6_367_477_760


def test_int8_inputs_are_kept_through_checkpointing():
    """bitsandbytes' int8 matmul holds its input on ctx, out of checkpointing's reach: with full
    checkpointing, int8 keeps 28 layers x 2048 tokens x (2 x 3072 + 3072 + 8192) fp32 values more
    than nf4 on Llama-3.2-3B (nf4's one unpacked weight sits inside the backward workspace, below
    the logits there); without checkpointing they are saved anyway, and only that weight differs."""
    kw = dict(lora_r=16, lora_targets="all_linear", dtype="bf16", seq_len=1024, batch_size=2, gradient_checkpointing=True)
    int8 = estimate_memory(ARCHS["llama32_3b_instruct"], quantization="int8", **kw).activations
    nf4 = estimate_memory(ARCHS["llama32_3b_instruct"], quantization="nf4", **kw).activations
    assert int8 - nf4 == 28 * 2048 * (2 * 3072 + 3072 + 8192) * 4 == 3_992_977_408
    no_ckpt = dict(kw, gradient_checkpointing=False)  # without checkpointing those inputs are saved anyway
    assert estimate_memory(ARCHS["llama32_3b_instruct"], quantization="int8", **no_ckpt).activations == \
        estimate_memory(ARCHS["llama32_3b_instruct"], quantization="nf4", **no_ckpt).activations - 3072 * 8192 * 2


def test_logits_dominate_small_models_and_scale_with_batch():
    one = estimate_memory(ARCHS["smollm_135m"], lora_r=4, dtype="bf16", seq_len=2048, gradient_checkpointing=True)
    two = estimate_memory(ARCHS["smollm_135m"], lora_r=4, dtype="bf16", seq_len=2048, batch_size=2, gradient_checkpointing=True)
    logits = 2048 * 49152 * (2 + 8)
    assert one.activations > logits and one.activations < 1.5 * logits
    assert two.activations > 1.9 * one.activations


def test_logit_tokens_count_the_lm_head_on_those_positions_only():
    """planner.estimate_memory(logit_tokens=N): the fp32 loss over the vocabulary on N positions, not on every token (GRPO's
    completions; a score head's none): without checkpointing the activations differ by exactly the logits' bytes."""
    common = dict(lora_r=4, dtype="bf16", seq_len=512, batch_size=4)
    every = estimate_memory(ARCHS["smollm_135m"], **common)
    some = estimate_memory(ARCHS["smollm_135m"], **common, logit_tokens=4 * 100)
    assert every.activations - some.activations == (4 * 512 - 4 * 100) * 49152 * (2 + 8)
    assert estimate_memory(ARCHS["smollm_135m"], **common, logit_tokens=10**9).activations == every.activations  # capped
    assert estimate_memory(ARCHS["smollm_135m"], **common, logit_tokens=0).activations < some.activations


def test_optimizers_and_full_finetune():
    arch = ARCHS["smollm_135m"]
    full = {o: estimate_memory(arch, dtype="fp32", optimizer=o, device="cpu") for o in ("adamw", "adafactor", "paged_adamw_8bit")}
    n = param_count(arch)
    assert full["adamw"].optimizer_state == 8 * n and full["adamw"].gradients == 4 * n
    assert full["adafactor"].optimizer_state < full["paged_adamw_8bit"].optimizer_state < full["adamw"].optimizer_state
    assert full["adamw"].adapters == 0 and full["adamw"].trainable_params == n
    cpu, cuda = full["adamw"], estimate_memory(arch, dtype="fp32", optimizer="adamw", device="cuda")
    assert cpu.runtime_overhead < cuda.runtime_overhead


def test_upcast_non_quantized_counts_fp32_embeddings():
    base = estimate_memory(ARCHS["llama2_7b"], optimizer="adamw", **REF)
    up = estimate_memory(ARCHS["llama2_7b"], optimizer="adamw", upcast_non_quantized=True, **REF)
    assert up.weights - base.weights == pytest.approx(2 * (2 * 32000 * 4096 + 65 * 4096), rel=1e-6)


def test_rejects_bad_choices():
    with pytest.raises(ValueError, match="needs LoRA"):
        estimate_memory(ARCHS["llama2_7b"], quantization="nf4", lora_r=None)
    with pytest.raises(ValueError, match="optimizer"):
        estimate_memory(ARCHS["llama2_7b"], lora_r=8, optimizer="sgd")
    with pytest.raises(ValueError, match="family"):
        param_count(dict(ARCHS["llama2_7b"], family="mamba"))
    for shape in (dict(seq_len=0), dict(seq_len=-5), dict(batch_size=0), dict(batch_size=-1)):
        with pytest.raises(ValueError, match="must be >= 1"):
            estimate_memory(ARCHS["llama2_7b"], lora_r=8, **shape)


def test_rows_and_markdown():
    b = estimate_memory(ARCHS["llama2_7b"], optimizer="paged_adamw_8bit", **REF)
    rows = b.rows()
    assert [r[0] for r in rows][-1] == "total" and rows[-1][1] == b.total
    md = b.to_markdown()
    assert md.startswith("| component |") and "**total**" in md and "optimizer_state" in md


def test_largest_block_is_the_lm_head_or_one_decoder_layer_as_accelerate_sizes_them():
    """The room accelerate keeps on the GPU for an offloaded layer: 8B Llama-3's lm_head, 128,256 x 4,096 x 2 B (nf4 leaves
    it unquantized); Llama-2-7B's decoder layer, (4 x 4,096^2 + 3 x 4,096 x 11,008) x 2 B + 2 RMSNorms x 4,096 x 2 B."""
    assert largest_block_bytes(ARCHS["llama31_8b"], "none", "bf16") == 128_256 * 4_096 * 2 == 1_050_673_152
    assert largest_block_bytes(ARCHS["llama31_8b"], "nf4", "bf16") == 1_050_673_152
    assert largest_block_bytes(ARCHS["llama2_7b"], "none", "bf16") == (4 * 4096**2 + 3 * 4096 * 11008) * 2 + 2 * 4096 * 2
    assert largest_block_bytes(ARCHS["llama2_7b"], "nf4", "bf16") == 262_144_000  # its 32,000-row embedding, once nf4
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.accelerate import compute_module_sizes

    for vocab in (1000, 100):  # the embedding, then (100 x 64 < one layer) a decoder layer, as transformers sizes them
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 intermediate_size=128, vocab_size=vocab))
        sizes, _ = compute_module_sizes(model, None, only_modules=False)
        blocks = [sizes[n] for n in ("model.embed_tokens", "model.layers.0", "lm_head")]
        assert largest_block_bytes(measure_arch(model.config), "none", "fp32") == max(blocks), (vocab, blocks)


def test_offload_split_by_hand():
    """10 GiB of weights, 1 GiB of activations, a 4 GiB GPU cap and a 1 GiB largest block: 4 - 1 = 3 GiB stay, 7 GiB go to
    the CPU; the GPU side is 1 + 4 GiB."""
    from types import SimpleNamespace

    from sectune.errors import ConfigError
    from sectune.training.memory import offload_split

    budget = Budget(weights=10 * GiB, adapters=0, optimizer_state=0, gradients=0, activations=GiB, runtime_overhead=0, total=11 * GiB)

    def split(quant="none", folder=None, device_map="auto", **caps):
        model = SimpleNamespace(device_map=device_map, max_memory=caps, offload_folder=folder)
        return offload_split(model, quant, budget, 10 * GiB, GiB)

    off = split(**{"0": "4GiB", "cpu": "8GiB"})
    assert (off["offloaded"], off["gpu_bytes"], off["fits"]) == (7 * GiB, 5 * GiB, True)
    assert split(**{"0": "4GiB", "cpu": "6GiB"})["fits"] is False
    off = split(folder="/tmp/off", **{"0": "4GiB", "cpu": "6GiB"})
    assert (off["disk"], off["fits"]) == (GiB, True)
    off = split("nf4", **{"0": "4GiB", "cpu": "8GiB"})  # bitsandbytes gives the weights 90% of the cap: 3.6 - 1 GiB stay
    assert off["offloaded"] == int(10 * GiB - (int(0.9 * 4 * GiB) - GiB)) and not off["fits"] and "quantization=nf4" in off["refused"]
    assert split(**{"0": "11GiB"})["offloaded"] == 0 and split(**{"0": "11GiB"})["gpu_bytes"] == 11 * GiB
    # as before: no GPU entry, or a device_map that ignores max_memory
    assert split(cpu="8GiB") is None and split(device_map="cpu", **{"0": "4GiB"}) is None and split() is None
    with pytest.raises(ConfigError, match=r"model.max_memory.0='7 gigs': write a size accelerate reads"):
        split(**{"0": "7 gigs"})


def test_the_scoring_copy_of_a_model_is_its_decoder_embeddings_and_a_score_head_without_the_lm_head():
    """A 1-layer Llama, hidden 8, 2 heads (kv 2), MLP 16, vocab 10, untied, by hand: linears q,k,v,o 4 x 64 + gate, up,
    down 3 x 128 = 640 weights; embeddings 80 + 3 norms x 8 + a score head 8 = 112; no LM head. bf16: (640 + 112) x 2 =
    1,504 bytes. nf4: 640 x 0.5 + 640 / 64 x (1 + 4/256) = 330.16 for the linears, + 224 = 554."""
    from sectune.training.planner import scorer_weight_bytes

    arch = {"family": "llama", "hidden_size": 8, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 16,
            "vocab_size": 10, "tie_embeddings": False}
    assert scorer_weight_bytes(arch, "none", "bf16") == 1504
    assert scorer_weight_bytes(arch, "nf4", "bf16") == 554
    assert scorer_weight_bytes({**arch, "tie_embeddings": True}, "none", "bf16") == 1504  # tied: the head was the embeddings


def test_a_reward_model_is_planned_with_a_score_head_instead_of_the_lm_head():
    """estimate_memory(score_head=True): the weights of a ...ForSequenceClassification. The 1-layer Llama above, untied,
    bf16, full fine-tune: the LM head's 10 x 8 = 80 weights leave and a 1 x 8 score head comes: 72 fewer, x 2 bytes in the
    weights, and the same 72 fewer trainable parameters (their gradients, 2 bytes each; AdamW's two moments, 4)."""
    from sectune.training.planner import estimate_memory

    arch = {"family": "llama", "hidden_size": 8, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 16,
            "vocab_size": 10, "tie_embeddings": False}
    lm = estimate_memory(arch, seq_len=4, device="cpu", logit_tokens=0)
    rm = estimate_memory(arch, seq_len=4, device="cpu", logit_tokens=0, score_head=True)
    assert lm.weights - rm.weights == 72 * 2 and lm.trainable_params - rm.trainable_params == 72
    assert lm.gradients - rm.gradients == 72 * 2 and lm.optimizer_state - rm.optimizer_state == 72 * 4
    tied = {**arch, "tie_embeddings": True}  # tied: the head is the embeddings, which stay; the score head comes on top
    assert estimate_memory(tied, seq_len=4, device="cpu", score_head=True).weights - estimate_memory(tied, seq_len=4, device="cpu").weights == 8 * 2


def test_dora_adds_its_magnitudes_its_kept_outputs_and_its_weight_norm():
    """lora.use_dora: one trained magnitude per output row of each adapted linear, the base and adapter outputs it scales
    kept for its gradient (2 x fout per token), and one linear's W + BA in fp32 at a time (bench/dora_memory.py: the
    extra measured 0.95 and 1.20 GiB on CPU against 1.15 predicted; without this term, 0 predicted)."""
    from sectune.training.planner import lora_modules

    arch = {"family": "llama", "hidden_size": 256, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
            "intermediate_size": 512, "vocab_size": 1000, "tie_embeddings": True}
    kw = dict(lora_r=8, lora_targets="all_linear", dtype="fp32", device="cpu", seq_len=64, batch_size=2, lora_dropout=0.0)
    lora, dora = estimate_memory(arch, **kw), estimate_memory(arch, **kw, lora_dora=True)
    mods = lora_modules(arch, "all_linear")
    rows = 3 * sum(fout for _, _, fout, _ in mods)
    assert dora.trainable_params - lora.trainable_params == rows
    assert dora.adapters - lora.adapters == rows * 4 and dora.gradients - lora.gradients == rows * 4
    norm = max(fin * fout for _, fin, fout, _ in mods) * 8 + max(fin for _, fin, _, _ in mods) ** 2 * 4  # + PEFT's identity
    assert dora.activations - lora.activations == 3 * 128 * 2 * sum(fout for _, _, fout, _ in mods) * 4 + norm
    assert estimate_memory(arch, **{**kw, "lora_r": None}, lora_dora=True).total == estimate_memory(arch, **{**kw, "lora_r": None}).total


def test_stage_plan_plans_dora_when_the_run_uses_it():
    from conftest import compose
    from sectune.stages.plan import estimate

    base = ["stage=plan", "logger=none", "model=llama31_8b", "quantization=nf4", "lora=r16_all_linear"]
    lora, dora = estimate(compose(base))[0], estimate(compose([*base, "lora.use_dora=true"]))[0]
    assert dora.trainable_params - lora.trainable_params == 32 * (3 * 4096 + 2 * 1024 + 2 * 14336)  # q/o/down, k/v, gate/up
    assert dora.total > lora.total


@pytest.mark.parametrize("hidden, inter, batch, seq, dropout, measured", [
    (1024, 2816, 8, 512, 0.0, 0.54), (1024, 2816, 8, 512, 0.05, 1.14), (2048, 5632, 1, 128, 0.0, 0.81)])
def test_dora_under_selective_checkpointing_is_planned_as_measured(hidden, inter, batch, seq, dropout, measured):
    """train.selective_checkpointing (the real presets' default): DoRA's products with its magnitude are recomputed, but
    the matmul cache keeps BA = lora_B(lora_A(I)), fin x fout per adapted linear, and with lora_dropout its second base
    matmul. DoRA's extra measured on CPU (bench/dora_memory.py --selective, 4 layers, fp32, LoRA r16 on all linears, GiB);
    counted as 2 x fout per token kept in every layer it was planned 1.43, 1.43 and 0.17 GiB."""
    arch = {"family": "llama", "hidden_size": hidden, "num_layers": 4, "num_heads": 16, "num_kv_heads": 4,
            "intermediate_size": inter, "vocab_size": 2048, "tie_embeddings": True}
    kw = dict(lora_r=16, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], dtype="fp32",
              device="cpu", seq_len=seq, batch_size=batch, lora_dropout=dropout, selective_checkpointing=True)
    peak = lambda b: b.adapters + b.gradients + b.activations  # noqa: E731
    extra = (peak(estimate_memory(arch, **kw, lora_dora=True)) - peak(estimate_memory(arch, **kw))) / 2**30
    assert 0.75 * measured <= extra <= 1.25 * measured, extra
