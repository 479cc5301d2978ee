"""Predicted training-memory budget from architecture numbers alone (``stage=plan``).

Why: loading a 7B model only to learn it does not fit wastes minutes and can OOM the box. The
budget is computed from the arch dict (the same numbers as the model's ``config.json``), the
quantization, LoRA and optimizer choices, and the batch shape; nothing is downloaded or allocated.

What is modelled (bytes, all components of the predicted peak):

* weights: every parameter counted from the arch (llama: q/k/v/o with GQA, gate/up/down, RMSNorms,
  embeddings, lm_head unless tied; gpt2: c_attn, attn.c_proj, c_fc, mlp.c_proj, LayerNorms,
  wte/wpe). nf4 = 0.5 B/param for the decoder linears + double-quantized blocksize-64 absmax;
  int8 = 1 B/param + one fp32 scale per output row. Embeddings, lm_head and norms stay in
  ``dtype`` (16-bit). ``upcast_non_quantized=True`` counts them in fp32 instead, which is what
  peft's ``prepare_model_for_kbit_training`` does to them.
* adapters: LoRA A/B, r*(in+out) per targeted linear, fp32 master copies (peft's default).
* gradients / optimizer_state: per trainable tensor. AdamW keeps m and v in the parameter's
  dtype (8 B/param for fp32 masters), paged 8-bit AdamW 2 B/param + blockwise absmax (tensors
  under 4096 elements keep 32-bit state, as bitsandbytes does), Adafactor factored rows+cols.
* activations: what autograd keeps per token per layer (SDPA/flash attention, no s^2 scores),
  the fp32 loss over seq x vocab logits (dominant for small models), and with gradient
  checkpointing only each layer's input plus one layer recomputed during backward.
* runtime_overhead: CUDA context + allocator slack on cuda, a smaller fixed margin on cpu.

It is an estimate: the lead compares it against measured peaks (bench/). Sizes are bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from sectune.errors import ConfigError

GiB = 1024**3
MiB = 1024**2

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANTIZATIONS = ("none", "nf4", "int8")
OPTIMIZERS = ("adamw", "adafactor", "paged_adamw_8bit")
CUDA_CONTEXT = 512 * MiB  # driver context + cuBLAS/cuDNN workspaces, outside torch's allocator
CPU_RUNTIME = 256 * MiB  # interpreter/libtorch buffers beyond the tensors themselves
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation on the churning (activation) memory
BNB_MIN_8BIT = 4096  # bitsandbytes keeps 32-bit state for tensors smaller than this
NF4_BLOCK = 64

#: Public config.json numbers of the model presets (copied into conf/model/*.yaml as model.arch).
ARCHS: dict[str, dict[str, Any]] = {
    "smollm_135m": dict(family="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                        intermediate_size=1536, vocab_size=49152, tie_embeddings=True),
    "gpt2_large": dict(family="gpt2", hidden_size=1280, num_layers=36, num_heads=20, num_kv_heads=20,
                       intermediate_size=5120, vocab_size=50257, tie_embeddings=True),
    "llama32_3b_instruct": dict(family="llama", hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8,
                                intermediate_size=8192, vocab_size=128256, tie_embeddings=True),
    "llama31_8b": dict(family="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       intermediate_size=14336, vocab_size=128256, tie_embeddings=False),
    "llama2_7b": dict(family="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      intermediate_size=11008, vocab_size=32000, tie_embeddings=False),
    "deepseek_r1_distill_llama_8b": dict(family="llama", hidden_size=4096, num_layers=32, num_heads=32,
                                         num_kv_heads=8, intermediate_size=14336, vocab_size=128256,
                                         tie_embeddings=False),
    "qwen25_1_5b_instruct": dict(family="llama", hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                                 intermediate_size=8960, vocab_size=151936, tie_embeddings=True, qkv_bias=True),
    "mistral_7b_instruct_v03": dict(family="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                    intermediate_size=14336, vocab_size=32768, tie_embeddings=False),
}

ATTENTION_MODULES = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj"), "gpt2": ("c_attn", "attn.c_proj")}


@dataclass
class Budget:
    """Predicted peak memory, by component, in bytes; ``total`` is their sum."""

    weights: int
    adapters: int
    optimizer_state: int
    gradients: int
    activations: int
    runtime_overhead: int
    total: int
    device: str = "cuda"
    params: int = 0
    trainable_params: int = 0
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, int, float]]:
        """(component, bytes, GiB) for each component and the total, in table order."""
        names = ["weights", "adapters", "optimizer_state", "gradients", "activations", "runtime_overhead", "total"]
        return [(n, getattr(self, n), getattr(self, n) / GiB) for n in names]

    def to_markdown(self) -> str:
        lines = ["| component | GiB | bytes |", "|---|---:|---:|"]
        for name, b, g in self.rows():
            name = f"**{name}**" if name == "total" else name
            lines.append(f"| {name} | {g:.2f} | {b:,} |")
        lines.append("")
        lines.append(f"params {self.params:,}, trainable {self.trainable_params:,} on {self.device}")
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def _dims(arch: dict) -> tuple[int, int, int, int, int]:
    h, nh = int(arch["hidden_size"]), int(arch["num_heads"])
    nkv = int(arch.get("num_kv_heads") or nh)
    hd = int(arch.get("head_dim") or h // nh)
    return h, nh * hd, nkv * hd, int(arch["intermediate_size"]), int(arch["vocab_size"])


def linear_shapes(arch: dict) -> list[tuple[str, int, int, bool]]:
    """(name, in_features, out_features, has_bias) of the linears in ONE decoder layer."""
    h, qd, kvd, i, _ = _dims(arch)
    fam = arch["family"]
    if fam == "llama":
        ab, mb = bool(arch.get("attention_bias", False)), bool(arch.get("mlp_bias", False))
        qb = ab or bool(arch.get("qkv_bias", False))  # Qwen2: q, k and v carry a bias, o_proj none
        return [("q_proj", h, qd, qb), ("k_proj", h, kvd, qb), ("v_proj", h, kvd, qb), ("o_proj", qd, h, ab),
                ("gate_proj", h, i, mb), ("up_proj", h, i, mb), ("down_proj", i, h, mb)]
    if fam == "gpt2":
        return [("c_attn", h, 3 * h, True), ("attn.c_proj", h, h, True), ("c_fc", h, i, True), ("mlp.c_proj", i, h, True)]
    raise ValueError(f"arch family {fam!r}: choose llama or gpt2")


def _other_tensors(arch: dict) -> list[tuple[int, ...]]:
    """Shapes of the parameters outside the decoder linears (embeddings, norms, lm_head)."""
    h, _, _, _, v = _dims(arch)
    L = int(arch["num_layers"])
    if arch["family"] == "llama":
        shapes = [(v, h)] + [(h,)] * (2 * L + 1)
        if not arch.get("tie_embeddings", False):
            shapes.append((v, h))
        return shapes
    pos = int(arch.get("max_position_embeddings", 1024))
    return [(v, h), (pos, h)] + [(h,)] * (4 * L + 2)  # wte, wpe, ln_1/ln_2 weight+bias, ln_f; lm_head tied


def param_count(arch: dict) -> int:
    """Parameter count as ``sum(p.numel() for p in model.parameters())`` reports it (ties once)."""
    L = int(arch["num_layers"])
    lin = sum(i * o + (o if b else 0) for _, i, o, b in linear_shapes(arch))
    other = sum(_numel(s) for s in _other_tensors(arch))
    return L * lin + other


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def lora_modules(arch: dict, targets: str | Sequence[str]) -> list[tuple[str, int, int, bool]]:
    """Per-layer linears LoRA wraps: ``attention``, ``all_linear`` or explicit leaf names."""
    shapes = linear_shapes(arch)
    if targets == "all_linear" or targets == "all-linear" or (not isinstance(targets, str) and list(targets) == ["all-linear"]):
        return shapes
    if targets == "attention":
        want = set(ATTENTION_MODULES[arch["family"]])
        return [s for s in shapes if s[0] in want]
    if isinstance(targets, str):
        raise ValueError(f"lora_targets={targets!r}: choose attention, all_linear or a list of module names")
    want = set(targets)  # leaf names: "c_proj" matches both gpt2 projections, as peft does
    return [s for s in shapes if s[0] in want or s[0].split(".")[-1] in want]


def lora_param_count(arch: dict, r: int, targets: str | Sequence[str] = "attention") -> int:
    """Trainable LoRA parameters, r*(in+out) per targeted linear per layer (peft's count)."""
    return int(arch["num_layers"]) * sum(r * (i + o) for _, i, o, _ in lora_modules(arch, targets))


def _opt_bytes(shapes: list[tuple[int, ...]], param_bytes: int, optimizer: str) -> int:
    total = 0
    for s in shapes:
        n = _numel(s)
        if optimizer == "adamw":
            total += 2 * n * param_bytes  # torch AdamW: exp_avg, exp_avg_sq like the parameter
        elif optimizer == "paged_adamw_8bit":
            total += n * (2 + 8 / 256) if n >= BNB_MIN_8BIT else 8 * n  # uint8 m,v + fp32 absmax/256
        elif optimizer == "adafactor":
            total += 4 * (s[0] + _numel(s[1:])) if len(s) >= 2 else 4 * n  # factored second moment
        else:
            raise ValueError(f"optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    return int(total)


def _linear_weight_bytes(layer: list, quantization: str, a: int) -> float:
    """Bytes of ONE decoder layer's linear weights (biases apart): ``a`` per element unquantized; nf4 0.5 + its
    double-quantized absmax (8-bit per 64 elements, fp32 per 256 blocks); int8 1 + an fp32 scale per output row (SCB)."""
    w = sum(i * o for _, i, o, _ in layer)
    if quantization == "nf4":
        return w * 0.5 + w / NF4_BLOCK * (1 + 4 / 256)
    if quantization == "int8":
        return w + 4 * sum(o for _, _, o, _ in layer)
    return w * a


def largest_block_bytes(arch: dict, quantization: str = "none", dtype: str = "bf16") -> int:
    """Bytes, as loaded (no fp32 upcast), of the largest piece accelerate places whole: one decoder layer (its linears
    quantized) or the vocab x hidden embedding / lm_head (never quantized). When a model does not fit its GPU cap,
    accelerate keeps this much of the cap free for the offloaded layer it copies in for each forward."""
    a = DTYPE_BYTES[dtype]
    h, _, _, _, v = _dims(arch)
    layer = linear_shapes(arch)
    norms = (2 if arch["family"] == "llama" else 4) * h  # llama: 2 RMSNorm weights; gpt2: ln_1/ln_2 weight + bias
    one_layer = _linear_weight_bytes(layer, quantization, a) + (sum(o for _, _, o, b in layer if b) + norms) * a
    return int(max(one_layer, v * h * a))


def scorer_weight_bytes(arch: dict, quantization: str = "none", dtype: str = "bf16") -> int:
    """Bytes, as loaded for scoring (no fp32 upcast: no ``prepare_model_for_kbit_training``), of a sequence-classification
    copy of this architecture: the decoder (its linears quantized), the embeddings and norms, a one-wide score head and no
    LM head. The GRPO step holds one beside the policy when a trained reward model is weighted (``rl.rewards.reward_model``)."""
    a = DTYPE_BYTES[dtype]
    h, _, _, _, v = _dims(arch)
    layer = linear_shapes(arch)
    L = int(arch["num_layers"])
    other = [s for s in _other_tensors(arch)]
    if arch["family"] == "llama" and not arch.get("tie_embeddings", False):
        other = other[:-1]  # the untied LM head (gpt2's is tied to the embeddings, counted once)
    biases = L * sum(o for _, _, o, b in layer if b)
    return int(L * _linear_weight_bytes(layer, quantization, a) + (biases + sum(_numel(s) for s in other) + h) * a)


def _layer_activation_per_token(arch: dict, a: int, lora: list, r: int | None, lora_dropout: float, dora: bool = False) -> float:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing)."""
    h, qd, kvd, i, _ = _dims(arch)
    if arch["family"] == "llama":
        # input, RMSNorm fp32 upcast+normalized, normed, q/k/v, rotated q/k, attention output
        attn = a * (2 * h + 3 * qd + 3 * kvd) + 8 * h
        mlp = a * 2 * h + 8 * h + 4 * i * a  # input, norm, normed; gate, up, silu(gate), product
    else:
        # ln_1 in/out, qkv, attn out, resid dropout mask; ln_2 in/out, c_fc out, gelu_new (~4 temps), mask
        attn = a * (2 * h + 3 * h + h) + h
        mlp = a * 2 * h + a * i * 5 + h
    extra = 0.0
    if r:
        for _, fin, fout, _ in lora:
            extra += r * a + (fin * (a + 1) if lora_dropout > 0 else 0)  # dropout(x) + mask, lora_A(x)
            if dora:  # DoRA's magnitude scales the base output and lora_B's: both kept for its gradient
                extra += 2 * fout * a
    return attn + mlp + extra


def estimate_memory(
    arch: dict,
    *,
    quantization: str = "none",
    lora_r: int | None = None,
    lora_targets: str | Sequence[str] = "attention",
    dtype: str = "bf16",
    optimizer: str = "adamw",
    seq_len: int = 512,
    batch_size: int = 1,
    gradient_checkpointing: bool = False,
    selective_checkpointing: bool = False,
    device: str = "cuda",
    lora_dropout: float = 0.05,
    upcast_non_quantized: bool = False,
    logit_tokens: int | None = None,
    score_head: bool = False,
    recompute_share: float = 1.0,
    lora_dora: bool = False,
) -> Budget:
    """Predicted peak training memory for one optimizer step; see the module docstring. ``logit_tokens``: the positions
    the LM head runs on (None: every token; GRPO's loss reads the completions' only, a score head none). ``score_head``:
    the model is a ``…ForSequenceClassification`` (stage=reward's): a one-wide score head and no LM head among its
    weights (counted there, seed 000's reward step planned 9.24 GiB on an H100 and allocated 6.36 at its peak).
    ``lora_dora``: DoRA (``lora.use_dora``): a trained magnitude per output row of each adapted linear, the base and
    adapter outputs it scales kept for its gradient, and each forward's W + BA (fp32) for the weight norm."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: choose cuda or cpu")
    if quantization != "none" and not lora_r:
        raise ValueError(f"quantization={quantization} needs LoRA: quantized weights cannot be trained directly")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"batch {batch_size} x seq {seq_len}: both must be >= 1")

    a = DTYPE_BYTES[dtype]
    L = int(arch["num_layers"])
    h, qd, kvd, inter, v = _dims(arch)
    layer = linear_shapes(arch)
    lin_w = L * sum(i * o for _, i, o, _ in layer)
    lin_b = L * sum(o for _, _, o, b in layer if b)
    other_shapes = _other_tensors(arch)
    if score_head:  # a ...ForSequenceClassification (the reward model): a one-wide score head, no LM head
        if arch["family"] == "llama" and not arch.get("tie_embeddings", False):
            other_shapes = other_shapes[:-1]
        other_shapes = [*other_shapes, (1, h)]
    other = sum(_numel(s) for s in other_shapes)
    notes: list[str] = []

    # -- weights
    keep = 4 if (upcast_non_quantized and quantization != "none") else a
    weights = L * _linear_weight_bytes(layer, quantization, a) + (lin_b + other) * keep
    if quantization == "nf4":
        notes.append("nf4 double-quant on decoder linears; embeddings, lm_head, norms unquantized")
    elif quantization == "int8":
        notes.append("int8 (LLM.int8) on decoder linears; embeddings, lm_head, norms unquantized")

    # -- trainable tensors, gradients, optimizer
    params = lin_w + lin_b + other
    if lora_r:
        mods = lora_modules(arch, lora_targets)
        shapes = [s for _, fin, fout, _ in mods for s in ((lora_r, fin), (fout, lora_r)) + (((fout,),) if lora_dora else ())] * L
        pbytes = 4  # peft keeps adapter weights in fp32
        trainable = sum(_numel(s) for s in shapes)
        adapters = trainable * pbytes
        notes.append(f"{'DoRA' if lora_dora else 'LoRA'} r={lora_r} on {', '.join(m[0] for m in mods)} ({trainable:,} params, fp32)")
    else:
        mods = []
        shapes = [s for _, fin, fout, b in layer for s in ([(fout, fin)] + ([(fout,)] if b else []))] * L
        shapes += other_shapes
        pbytes = a
        trainable = params
        adapters = 0
        notes.append(f"full fine-tune: all {params:,} params train in {dtype}")
    gradients = trainable * pbytes
    optimizer_state = _opt_bytes(shapes, pbytes, optimizer)

    # -- activations
    tokens = seq_len * batch_size
    per_layer = _layer_activation_per_token(arch, a, mods, lora_r, lora_dropout, lora_dora and bool(lora_r)) * tokens
    lt = tokens if logit_tokens is None else min(int(logit_tokens), tokens)
    logits = lt * v * (a + 4 + 4)  # logits, fp32 log-softmax, its fp32 gradient
    dequant = max(i * o for _, i, o, _ in layer) * a if quantization == "nf4" else 0  # one weight unpacked
    if lora_dora and lora_r:  # the weight norm's W + scale·BA and BA, fp32, one adapted linear at a time, and the
        # fp32 identity PEFT multiplies lora_A by to get BA (fin x fin: down_proj's is the largest)
        dequant += max(i * o for _, i, o, _ in mods) * 8 + max(i for _, i, _, _ in mods) ** 2 * 4
    edges = 3 * tokens * h * a  # embedding output, final norm, grad of the residual stream
    if selective_checkpointing and not gradient_checkpointing:
        # kept per layer: its input and every matmul / attention output; the rest is recomputed
        # LoRA adds two matmuls per wrapped linear, and their outputs are kept too: lora_A's (r
        # wide) and lora_B's (as wide as the layer's output). Without them a 3B bf16 LoRA step on an
        # H200 measured 1.55x the predicted activations; with them 1.05x (bench/gpu_memory.py).
        # DoRA's products with its magnitude are elementwise, recomputed; what it adds is matmuls: with lora_dropout the
        # base output again, on the undropped input (fout per token), and BA = lora_B(lora_A(I)), fin x (r + fout) per
        # adapted linear, kept by the checkpoint's matmul cache until that layer's backward though only its norm,
        # detached, reads it. bench/dora_memory.py --selective: 2.6x over-predicted counting 2 x fout per token kept
        # instead, 4.6x under without BA on a weight-heavy shape
        dora_tok = lora_dora and lora_dropout > 0
        lora_kept = sum(lora_r + fout * (2 if dora_tok else 1) for _, _, fout, _ in mods) if lora_r else 0
        kept = tokens * (h + qd + 2 * kvd + qd + h + 2 * inter + h + lora_kept) * a
        dora_ba = L * sum(fin * (lora_r + fout) for _, fin, fout, _ in mods) * a if lora_dora and lora_r else 0
        activations = L * kept + edges + max(logits, per_layer) + dequant + dora_ba
        notes.append("selective checkpointing: matmul and attention outputs kept, elementwise ops recomputed")
    elif gradient_checkpointing:
        # one layer recomputed + its grads, for the sequences one forward graph holds: ``recompute_share`` of the batch
        # (causal_contrastive's separate forwards: a third, each graph recomputed on its own)
        backward_ws = (per_layer + 2 * tokens * (h + inter) * a) * recompute_share + dequant
        activations = L * tokens * h * a + edges + max(logits, backward_ws)
        notes.append("gradient checkpointing: layer inputs kept, one layer recomputed at a time")
    else:
        activations = L * per_layer + edges + logits + dequant
    if quantization == "int8" and (gradient_checkpointing or selective_checkpointing):
        # bitsandbytes' int8 matmul keeps its input as a ctx attribute, not through save_for_backward,
        # so checkpointing cannot drop it: every layer's int8-linear inputs (attention and MLP norm
        # outputs, attention output, MLP product) stay for the whole step, in fp32 once
        # prepare_model_for_kbit_training has upcast the norms. Measured on CPU (h 512, 4 layers,
        # 16 x 512 tokens, full checkpointing): +0.31 GB over the same run unquantized; this term: +0.34 GB.
        activations += L * tokens * (2 * h + qd + inter) * 4
        notes.append("int8: each layer's int8-linear inputs are kept through checkpointing (bitsandbytes holds them on ctx)")
    notes.append(f"activations for batch {batch_size} x seq {seq_len}; logits {logits / GiB:.2f} GiB incl. fp32 loss"
                 + (f" (on {lt:,} of the {tokens:,} positions)" if lt != tokens else ""))

    # -- runtime
    if device == "cuda":
        runtime = CUDA_CONTEXT + ALLOCATOR_SLACK * (activations + gradients)
    else:
        runtime = CPU_RUNTIME
    comps = [int(x) for x in (weights, adapters, optimizer_state, gradients, activations, runtime)]
    return Budget(*comps, total=sum(comps), device=device, params=params, trainable_params=trainable, notes=notes)


#: the model types whose blocks are Llama's (q/k/v/o and gated gate/up/down projections, RMSNorm): the planner's
#: "llama" family; GPT-2 is its "gpt2" family. Every other layout (OPT, Falcon, GPT-NeoX, Phi-3's fused projections, ...)
#: was read as Llama's: a traceback for OPT and Falcon (no intermediate_size), Pythia's weights planned 1.28x over, and
#: its own module names refused as not Llama's (an audit, session 38).
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite", "smollm3")


class UnplannableModel(ConfigError):
    """A model whose layout the planner does not know: stage=plan refuses it, the stages' memory checks and
    stage=doctor go on without a plan, saying so."""


def measure_arch(hf_config) -> dict:
    """The arch dict for a transformers config object (Llama-like or GPT-2), e.g. a tiny local model."""
    mt = getattr(hf_config, "model_type", "")
    if mt != "gpt2" and mt not in LLAMA_LAYOUT:
        raise UnplannableModel(
            f"the memory planner knows Llama's layout ({', '.join(LLAMA_LAYOUT)}) and GPT-2's, not model_type {mt!r}; "
            "to plan it, set model.arch (family llama or gpt2, whichever is nearer; hidden_size, num_layers, num_heads, "
            "num_kv_heads, intermediate_size, vocab_size) in a model preset of your own (--config-dir my_conf)")
    if mt == "gpt2":
        h = hf_config.n_embd
        return dict(family="gpt2", hidden_size=h, num_layers=hf_config.n_layer, num_heads=hf_config.n_head,
                    num_kv_heads=hf_config.n_head, intermediate_size=hf_config.n_inner or 4 * h,
                    vocab_size=hf_config.vocab_size, tie_embeddings=True,
                    max_position_embeddings=hf_config.n_positions)
    h, nh = hf_config.hidden_size, hf_config.num_attention_heads
    arch = dict(family="llama", hidden_size=h, num_layers=hf_config.num_hidden_layers, num_heads=nh,
                num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or nh,
                intermediate_size=hf_config.intermediate_size, vocab_size=hf_config.vocab_size,
                tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))
    hd = getattr(hf_config, "head_dim", None)
    if hd and hd != h // nh:
        arch["head_dim"] = hd
    for k in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, k, False):
            arch[k] = True
    if mt == "qwen2" and not arch.get("attention_bias"):  # its q/k/v projections always carry a bias (no config key)
        arch["qkv_bias"] = True
    return arch
