"""The LoRA side of a model: which layers an adapter can target, the adapter a run trains (PEFT), the parameters it
counts, and a merged view of its weights for a forward without the adapter's overhead. ``sectune.models.modeling``
re-exports these names (``modeling.apply_lora``)."""

from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig

from sectune.config import model_title
from sectune.errors import ConfigError


def linear_module_names(model) -> list[str]:
    """Leaf names of the layers LoRA can target: Linear and its subclasses (Falcon's FalconLinear, bitsandbytes'
    Linear4bit/8bitLt; exact class names missed Falcon's: an audit, session 38) and GPT-2's Conv1D."""
    names = set()
    for full, mod in model.named_modules():
        if full and (isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


#: Llama's module names (the lora presets') → GPT-2's: one fused c_attn for q, k and v; c_proj is both the attention's
#: output (attn.c_proj) and the MLP's down projection (mlp.c_proj: PEFT matches a dotted name's end); c_fc the MLP's up
#: projection (GPT-2 has no gate)
GPT2_NAMES = {"q_proj": "c_attn", "k_proj": "c_attn", "v_proj": "c_attn", "o_proj": "attn.c_proj",
              "gate_proj": "c_fc", "up_proj": "c_fc", "down_proj": "mlp.c_proj"}


def apply_lora(model, cfg: DictConfig, task_type: str = "CAUSAL_LM"):
    """Wrap with a fresh LoRA adapter, or return the model unchanged for ``lora=none``."""
    lc = cfg.lora
    if not lc.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    targets = list(lc.target_modules)
    if targets != ["all-linear"]:
        have = linear_module_names(model)
        missing = [t for t in targets if t not in have]
        if missing and getattr(model.config, "model_type", "") == "gpt2" and all(t in GPT2_NAMES for t in missing):
            mapped = list(dict.fromkeys(GPT2_NAMES.get(t, t) for t in targets))  # the lora presets name Llama's modules
            print(f"sectune: lora.target_modules {targets} are Llama's module names; in {model_title(cfg.model)}'s GPT-2 blocks "
                  f"that is {mapped} (c_attn holds q, k and v together)")
            targets, missing = mapped, [t for t in mapped if t.split(".")[-1] not in have]
        if missing:
            raise ConfigError(
                f"lora.target_modules: {missing} not in model {model_title(cfg.model)}; "
                f"its linear modules are {have} (or use lora.target_modules=[all-linear])"
            )
    fresh = [m for m in getattr(model, "_sectune_fresh", ()) if task_type == "SEQ_CLS"]
    if fresh:  # an adapter without them drew them at random at every load: other predictions each time (an audit, session 38)
        print(f"sectune: {', '.join(fresh)} not in the model's weights (initialised at random beside the head): "
              "trained and saved with the adapter, as the head is")
    peft_cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        bias=lc.bias,
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",  # its Conv1D layers store weights transposed
        task_type=task_type,
        modules_to_save=[*(lc.modules_to_save or ()), *fresh] or None,
        use_rslora=bool(lc.get("use_rslora", False)),
        use_dora=bool(lc.get("use_dora", False)),
    )
    model = get_peft_model(model, peft_cfg)
    if cfg.train.precision in ("bf16", "fp16"):
        # peft gives its LoRA layers an fp32 master copy, not modules_to_save (a classifier's or reward model's score
        # head): loaded in model.dtype=fp16 under fp16 mixed precision, its fp16 gradients made the GradScaler refuse the
        # first step ("Attempting to unscale FP16 gradients"; an audit, session 42); autocast computes it in half anyway
        # (a module trained whole, as modules_to_save copies are: a trainable bias beside a frozen weight, lora.bias=all,
        # stays as it is, or the module mixes dtypes; a review of this change, session 42)
        whole = [m for m in model.modules() if (own := list(m.parameters(recurse=False)))
                 and all(p.requires_grad for p in own) and any(p.dtype in (torch.float16, torch.bfloat16) for p in own)]
        for m in whole:
            was = next(p.dtype for p in m.parameters(recurse=False) if p.dtype in (torch.float16, torch.bfloat16))
            for p in m.parameters(recurse=False):
                p.data = p.data.float()
            # a forward outside autocast (the reward model's pair scoring, SFT's logit probe) fed it half-precision
            # hidden states ("expected m1 and m2 to have the same dtype"), and an fp32 embedding's output met bf16 layers:
            # inputs are cast to fp32, the output back to the model's dtype (a review of this change, session 42)
            m.register_forward_pre_hook(_floats_to(torch.float32))
            m.register_forward_hook(lambda mod, args, out, dtype=was: out.to(dtype) if torch.is_tensor(out) and out.is_floating_point() else out)
    return model


def _floats_to(dtype):
    def hook(module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    return hook


def quantized_module_count(model) -> int:
    """bitsandbytes' quantized linears (peft's LoRA wrapper of one has the same class name: it counted each twice)."""
    return sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") and type(m).__module__.startswith("bitsandbytes")
               for m in model.modules())


def _weights_in(p) -> int:
    """The weights a parameter holds: a 4-bit one stores two per byte (numel() is half its count; an nf4 model's
    total_params read 573,952 against int8's 985,600 for the same model), its quant_state has the real shape."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts of a model about to be trained; none trainable is a ConfigError (a run that
    trains nothing ran its steps with a zero gradient and then failed to save)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_weights_in(p) for p in model.parameters())
    if not trainable:
        raise ConfigError(f"no trainable parameters in {type(model).__name__} ({total:,} frozen): nothing would be trained; "
                          "check model.name_or_path (model weights, not an adapter) and the lora group")
    return trainable, total


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


#: merged_lora's limit on the copy of base weights it keeps for the exact restore (bytes)
MERGE_COPY_LIMIT = 1 << 30


def _shared(model, bases) -> list:
    """The targeted base layers whose weight is also another parameter (an LM head tied to the input embeddings, LoRA on
    ``lm_head``): folded in, the adapter changes that other parameter too (decoding read logits 4.9 apart on a tiny tied
    model: an audit, session 44)."""
    import collections

    uses = collections.Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    return [b for b in bases if isinstance(getattr(b, "weight", None), torch.Tensor) and uses[b.weight.data_ptr()] > 1]


def untie_lora_bases(model) -> int:
    """Before a permanent merge (``merge_and_unload``): each LoRA-targeted base weight that another parameter shares gets
    its own copy, and the config no longer ties the word embeddings, so the merge changes that layer alone and the saved
    model reloads untied. Merged into a tied ``lm_head``, the adapter changed the input embeddings as well:
    contrastive.init_from with lora=none started from (and saved) a model 1.46 logits away from the adapter's on a tiny
    tied model (an audit, session 44). Returns how many weights were copied."""
    shared = _shared(model, [layer.get_base_layer() for layer in _lora_layers(model)])
    for b in shared:
        b.weight = torch.nn.Parameter(b.weight.detach().clone(), requires_grad=b.weight.requires_grad)
    if shared:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for conf in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
            conf.tie_word_embeddings = False
    return len(shared)


@contextlib.contextmanager
def merged_lora(model):
    """Decode with the LoRA adapter folded into its base weights: one matmul per linear layer instead of
    three (base, A, B) plus the scaling, which on a CPU, where decoding a small model is per-op overhead,
    makes sampling ~1.3x faster. The base weights are put back bit for bit afterwards (peft's unmerge
    subtracts the product again, which leaves rounding in the weights that the disabled adapter, GRPO's
    and DPO's reference, would then carry); the adapter itself is untouched. A no-op (the weights as they
    are) unless ``model`` is a LoRA ``PeftModel`` on a CPU whose targeted base weights are plain floating
    point tensors (never a quantized base: folding into 4- or 8-bit weights is lossy) and nothing is merged
    already, and the copy of the targeted base weights that the exact restore needs stays under
    :data:`MERGE_COPY_LIMIT` bytes (an 8B model on a CPU would need twice its weights' memory; decoding it
    is bound by its matmuls, not by per-op overhead, so it loses little unmerged). Only for inference:
    with it, no gradient reaches the adapter."""
    layers = _lora_layers(model) if hasattr(model, "merge_adapter") else []
    bases = [layer.get_base_layer() for layer in layers]
    ok = (
        layers
        and sum(getattr(b, "weight", torch.empty(0)).nbytes for b in bases) <= MERGE_COPY_LIMIT
        and all(isinstance(getattr(b, "weight", None), torch.Tensor) and type(b.weight) in (torch.Tensor, torch.nn.Parameter)
                and b.weight.is_floating_point() and b.weight.device.type == "cpu" for b in bases)
        and not any(layer.merged or getattr(layer, "disable_adapters", False) for layer in layers)
        and not any(getattr(layer, "lora_magnitude_vector", None) for layer in layers)  # DoRA: merged, not exact
        and not _shared(model, bases)  # a tied LM head: the merge would change the embeddings too
    )
    if not ok:
        yield model
        return
    saved = [b.weight.detach().clone() for b in bases]
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for b, w in zip(bases, saved):
                b.weight.copy_(w)
