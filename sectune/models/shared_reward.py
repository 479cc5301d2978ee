"""A LoRA reward model scored on the GRPO policy's own base weights (:class:`SharedBaseRewardModel`): when it may ride on
the policy's model (:func:`can_share`: LoRA tensors alone, the very base weights, the same quantization settings) and
how it is put there (:func:`share_with_policy`). :mod:`sectune.models.reward_model` loads it and re-exports these."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sectune.errors import ConfigError
from sectune.models.reward_model import SCORE_HEAD_KEY, SHARED_ADAPTER, TrainedRewardModel


class SharedBaseRewardModel(TrainedRewardModel):
    """A LoRA reward model scored on the GRPO policy's own base weights: its adapter added to the policy's ``PeftModel``
    under :data:`SHARED_ADAPTER` (frozen, inactive) and its one-wide score head beside it, so the RL step holds one copy
    of the base instead of two (seed 000's 8B nf4: 4.65 GB less; :func:`load_reward_model` loaded a second one).
    A forward makes the reward adapter the active one, puts the decoder in eval mode (no dropout), runs the decoder
    body (``get_base_model().base_model``: the model ``…ForSequenceClassification`` wraps) and the head on every
    completion's last position, then puts back the active adapter, each module's mode and each parameter's
    ``requires_grad`` (PEFT's ``set_adapter`` makes the adapter it activates trainable). Scores equal the separate
    copy's on the same base weights (tests/test_rl.py)."""

    def __init__(self, policy, head: torch.nn.Linear, tokenizer, max_length: int, batch_size: int = 8,
                 norm: tuple[float, float] | None = None):
        # (not TrainedRewardModel.__init__: it would put the policy in eval mode for good)
        self.model, self.head, self.tokenizer, self.max_length, self.batch_size, self.norm = (policy, head, tokenizer, max_length,
                                                                                               batch_size, norm)

    def _device(self) -> torch.device:
        # the policy's, where the inputs go: Trainer moves the policy to the GPU after this head was made beside it
        return self.model.get_input_embeddings().weight.device

    def _forward(self, batch: dict) -> torch.Tensor:
        policy = self.model
        body = policy.get_base_model().base_model
        modes = [(m, m.training) for m in body.modules()]
        grads = [(p, p.requires_grad) for p in policy.parameters()]
        previous = policy.active_adapter
        policy.set_adapter(SHARED_ADAPTER)
        body.eval()
        try:
            hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        finally:
            policy.set_adapter(previous)
            for m, training in modes:
                m.training = training
            for p, g in grads:
                p.requires_grad_(g)
        flat = hidden.reshape(-1, hidden.shape[-1])[batch["seq_ends"].to(hidden.device)]
        if self.head.weight.device != flat.device:  # the head follows the body's output (a moved policy, a model split over GPUs)
            self.head.to(flat.device)
        return self.head(flat.to(self.head.weight.dtype)).squeeze(-1).float()


def share_with_policy(d: Path, meta: dict, policy, policy_base: str | None, cfg, tokenizer, batch_size: int, norm):
    """A :class:`SharedBaseRewardModel` when the reward model in ``d`` is a LoRA adapter trained on the very weights the
    policy's adapter sits on (``reward_model.json``'s ``base_model`` = ``policy_base``), under the same quantization; else
    None (the caller loads a separate copy, as before)."""
    from peft import PeftConfig, PeftModel

    if not isinstance(policy, PeftModel) or policy_base is None or cfg is None or SHARED_ADAPTER in policy.peft_config:
        return None
    bias = "none" if all(getattr(c, "bias", "none") == "none" for c in policy.peft_config.values()) else "trained"
    if not can_share(d, meta, cfg.quantization, str(policy_base), bias):
        return None
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    conf = PeftConfig.from_pretrained(str(d))
    state = load_file(str(d / "adapter_model.safetensors"))
    head_weight = state.pop(SCORE_HEAD_KEY, None)
    if head_weight is None or head_weight.shape[0] != 1:
        return None  # check_head names what is wrong when the separate copy loads
    conf.modules_to_save, conf.task_type, conf.inference_mode = None, "CAUSAL_LM", True
    policy.add_adapter(SHARED_ADAPTER, conf)
    loaded = set_peft_model_state_dict(policy, state, adapter_name=SHARED_ADAPTER)
    missing = [k for k in loaded.missing_keys if f".{SHARED_ADAPTER}." in k]
    if missing or loaded.unexpected_keys:
        policy.delete_adapter(SHARED_ADAPTER)
        raise ConfigError(f"{d}: its adapter does not fit the policy's model ({len(missing)} missing, "
                          f"{len(loaded.unexpected_keys)} unexpected tensors, e.g. {(missing or loaded.unexpected_keys)[0]})")
    for name, p in policy.named_parameters():
        if f".{SHARED_ADAPTER}." in name:
            p.requires_grad_(False)
    device = next(p for n, p in policy.named_parameters() if f".{SHARED_ADAPTER}." in n).device
    head = torch.nn.Linear(head_weight.shape[1], 1, bias=False).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(head_weight.float())
    head.requires_grad_(False)
    return SharedBaseRewardModel(policy, head, tokenizer, int(meta["max_length"]), batch_size, norm=norm)


def same_quantization(meta: dict, quantization) -> bool:
    """Whether the reward model of ``meta`` trained under the ``quantization`` node given (its saved settings, every key;
    a reward model saved before session 41 holds only the name, compared alone)."""
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.to_container(quantization, resolve=True) if isinstance(quantization, DictConfig) else dict(quantization)
    saved = meta.get("quantization_settings")
    if isinstance(saved, dict):
        return saved == node
    return meta.get("quantization", "none") == node.get("name")


def can_share(d: Path, meta: dict, quantization, policy_base: str, policy_bias: str) -> bool:
    """Whether the reward model in ``d`` can ride on a policy's model (:func:`share_with_policy` acts on it, the RL memory
    check plans by it): a LoRA adapter of LoRA tensors alone (:func:`lora_tensors_only`), trained under the policy's
    ``quantization`` on the very weights the policy's adapter sits on (``policy_base``), for a policy whose adapter trains
    no biases of its base in place (``policy_bias`` none: the reward model would score on them)."""
    if policy_bias != "none" or not same_quantization(meta, quantization):  # (the policy's quantization node)
        return False
    if not same_weights(str(meta.get("base_model") or ""), policy_base):
        return False
    from safetensors import safe_open

    try:
        if json.loads((d / "adapter_config.json").read_text(encoding="utf-8")).get("peft_type") != "LORA":
            return False
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as st:
            return lora_tensors_only(list(st.keys()))
    except Exception:  # noqa: BLE001 - a missing or damaged file (SafetensorError): it loads separately, refused there by name
        return False


def lora_tensors_only(keys) -> bool:
    """A reward adapter's tensors (its score head left out) are LoRA's alone: no base weights it trained beside them
    (``lora.bias`` all / lora_only: the base layers' biases; ``lora.modules_to_save``: e.g. the embeddings). Those
    cannot ride on the policy's model: loading them there replaced the policy's base weights (its outputs, the disabled
    adapter GRPO's reference is, the base the saved adapter was trained on); such a reward model loads separately."""
    return all(".lora_" in k for k in keys if k != SCORE_HEAD_KEY)


def same_weights(a: str, b: str) -> bool:
    """Two model references name the same weights: the same folder (resolved), else the same hub id."""
    if not a or not b:
        return False
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b  # hub ids
