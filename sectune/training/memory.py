"""Seed 000's memory check ("≥ 7 GB?") before a training stage, from stage=plan's estimate.

The reward and RL stages call :func:`memory_check` first: the planner's predicted peak for the
composed config (no weights loaded) against the device's free memory, so a run that cannot fit
stops (or falls back) in seconds instead of after loading an 8B model.

With ``model.device_map`` (auto, balanced, sequential) and a GPU entry in ``model.max_memory``, the plan is split
(:func:`offload_split`): transformers/accelerate place the weights *as loaded* (before peft's fp32 upcast) on the GPU up
to the cap (90% of it under bitsandbytes), and, when they do not all fit, keep the largest block's room free and put the
rest on the CPU; those layers still run on the GPU, copied in at every pass. The GPU side is then the cap plus everything
else the step keeps (activations, LoRA, gradients, optimizer state, CUDA context); the CPU side is the offloaded weights
against ``model.max_memory.cpu`` (else available RAM). A quantized model cannot be offloaded this way: transformers
refuses to load a bitsandbytes model with layers on the CPU (``llm_int8_enable_fp32_cpu_offload``, which sectune does
not set), so a quantized plan that needs the CPU does not fit.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from sectune.errors import ConfigError
from sectune.training.planner import GiB


#: stages that train without sectune's selective activation checkpointing (TRL's GRPO loop; federated clients)
NO_SELECTIVE_CHECKPOINTING = ("rl", "federated")


def trains_score_head(cfg) -> bool:
    """The reward model's one-wide score head instead of the LM head: loss=bradley_terry (what stage=plan is told), or
    stage=reward under any loss group (it trains Bradley-Terry whatever the group says; its memory check sized an LM head
    on every position under the default loss=causal_lm, and could send a model that fits to the heuristic fallback)."""
    return cfg.loss.name == "bradley_terry" or cfg.stage.name == "reward"


def logit_positions(cfg, sequences: int) -> int | None:
    """The positions of a batch of ``sequences`` the step runs the LM head on: none for the reward model
    (loss=bradley_terry: a one-wide score head), the completions' for GRPO (grpo_trainer.shared_prompt_logps, TRL's
    logits_to_keep), the benign answers' for causal_contrastive (generation.max_new_tokens bounds one), else every one (None). The plan counted a vocabulary-wide fp32 loss on every position of both: 6.3
    of auth_grpo's RL step's 15.1 GB, so lowering rl.max_completion_length, which the RL stage's "does not fit" error
    advises, changed nothing."""
    if trains_score_head(cfg):
        return 0
    if cfg.loss.name == "grpo":
        return sequences * int(cfg.rl.max_completion_length)
    if cfg.loss.name == "causal_contrastive":  # the benign answers only (a third of the sequences), each at most an answer
        return max(1, sequences // 3) * min(int(cfg.generation.max_new_tokens), int(cfg.model.max_seq_length))
    return None


def memory_check(cfg, sequences_per_example: int = 1) -> tuple[bool, str]:
    """(fits, why): the predicted peak of ``train.batch_size × sequences_per_example`` sequences (2 for
    chosen + rejected, G for GRPO's group), the LM head on the positions :func:`logit_positions` names, against the device's free memory
    (``reward.memory_limit_gb`` overrides it). On a GPU the plan times the measured margin (``plan.measured_gpu_margin``,
    1.31 with bf16 or nf4) must fit, as ``stage=doctor`` checks it: seed 000's reward step planned 7.28 GiB and held
    8.70 GiB of an H100 (bench/gpu_stages.py), past an 8 GB card that the plan alone says it fits."""
    from sectune.training.planner import UnplannableModel

    try:
        need, budget, info = step_need(cfg, sequences_per_example)
    except UnplannableModel as e:  # OPT, Falcon, GPT-NeoX, ...: the run goes on unplanned, as transformers would run it
        return True, f"not checked ({e})"
    if cfg.reward.memory_limit_gb is not None:
        free, where = float(cfg.reward.memory_limit_gb) * 1e9, "reward.memory_limit_gb"
    elif info["device"] == "cuda":
        free, where = float(torch.cuda.mem_get_info()[0]), "free GPU memory"
    else:
        free, where = available_ram(), "available RAM"
    off = info.get("offload")
    what = f"{info['model']}, {info['quantization']}" + (f"; {offload_text(off)}" if off else "")
    if info["reward_model_bytes"]:
        what += f"; with {info['reward_model_note']}"
    held, margin_text = need, ""
    if info["device"] == "cuda":  # what a GPU step held beyond the plan (context, allocator cache): stage=doctor's margin too
        from sectune.stages import plan

        margin = plan.measured_gpu_margin(info["quantization"], cfg.train.precision)
        held = need * margin
        margin_text = f" x {margin:g} (the footprint measured on GPUs beyond the plan) = {held / 1e9:.2f} GB"
    return (held <= free and (not off or off["fits"]),
            f"predicted peak {need / 1e9:.2f} GB ({what}){margin_text} vs {free / 1e9:.2f} GB {where}")


def step_need(cfg, sequences_per_example: int = 1) -> tuple[float, object, dict]:
    """(bytes the device must hold, the planner's budget, its info) for one step of ``train.batch_size ×
    sequences_per_example`` sequences as this stage runs it: the GPU side of an offload split, else the whole budget
    (bench/gpu_stages.py holds it against each pipeline step's measured peak)."""
    from sectune.stages import plan

    c = OmegaConf.merge(cfg, {"plan": {"batch_size": sequences_per_example * int(cfg.train.batch_size)}})
    if cfg.stage.name in NO_SELECTIVE_CHECKPOINTING:  # these stages do not apply it: plan their activations without it
        c.train.selective_checkpointing = False
    budget, info = plan.estimate(c, logit_tokens=logit_positions(cfg, int(c.plan.batch_size)))
    off = info.get("offload")
    info["reward_model_bytes"], info["reward_model_note"] = reward_model_bytes(cfg)
    return float(off["gpu_bytes"] if off else budget.total) + info["reward_model_bytes"], budget, info


def reward_model_bytes(cfg) -> tuple[int, str]:
    """(bytes, what) of the trained reward model GRPO scores with, loaded on the device beside the policy: its own copy
    of the base (``sectune.models.reward_model.load_reward_model``), or, when it is a LoRA adapter trained on the base the
    policy starts from, its adapter and head alone on the policy's model (``share_with_policy``). Uncounted, seed 000's RL
    step measured 20.06 GiB on an H100 with the second copy, against 10.53 GiB planned (bench/gpu_stages.py). (0, "") when none is loaded: another stage or loss,
    ``rl.rewards.reward_model`` 0, the heuristic fallback, or a folder the stage will refuse by name when it loads it."""
    if cfg.stage.name != "rl" or cfg.loss.name != "grpo" or not cfg.rl.reward_model:
        return 0, ""
    if not float((cfg.rl.rewards or {}).get("reward_model", 0) or 0):
        return 0, ""
    import json

    from sectune.models.reward_model import META_FILE, reward_model_dir
    from sectune.models.shared_reward import can_share
    from sectune.stages import plan
    from sectune.stages.rl import policy_bias, policy_weights
    from sectune.training import planner

    try:
        d = reward_model_dir(cfg.rl.reward_model)
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
    except (ConfigError, OSError, ValueError):
        return 0, ""
    if meta.get("kind") == "heuristic":
        return 0, ""
    if not (d / "adapter_config.json").is_file():  # a whole model (reward.init_from=sft, lora=none): its saved weights
        n = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        return n, f"the reward model's {n / 1e9:.2f} GB of weights"
    adapter = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    q = meta.get("quantization", "none")
    if can_share(d, meta, cfg.quantization, policy_weights(cfg), policy_bias(cfg)):
        # trained on the weights the policy's adapter sits on (rl.init_from's SFT full weights, or the base its SFT adapter
        # was trained on, as the stage resolves them): it rides on the policy's model (reward_model.share_with_policy).
        # (It compared with model.name_or_path: a policy on SFT full weights was planned without the separate copy the
        # stage then loaded, and a reward model trained on those same weights with one it never loaded.)
        return adapter, f"the reward model's adapter and head on the policy's own base, {adapter / 1e9:.2f} GB"
    q = q if cfg.quantization.name == q else "none"  # load_reward_model quantizes only under the same quantization
    arch, _ = plan.model_arch(cfg.model, cfg)  # its base: the policy's (a pipeline's reward step trains on the same model)
    dtype = "bf16" if cfg.model.dtype == "auto" else str(cfg.model.dtype)
    n = planner.scorer_weight_bytes(arch, q, dtype) + adapter
    return n, f"the reward model, a second {q} copy of the base without its LM head, {n / 1e9:.2f} GB"


def available_ram() -> float:
    import psutil

    return float(psutil.virtual_memory().available)


#: device_map values for which transformers places the layers itself under ``max_memory`` (a dict, "cpu" or "cuda" ignore it)
PLACED_BY_ACCELERATE = ("auto", "balanced", "balanced_low_0", "sequential")
#: the share of a GPU cap transformers' bitsandbytes quantizers give the weights (adjust_max_memory: "buffers that are
#: created during quantization")
BNB_CAP_SHARE = 0.9


def max_memory_caps(model_cfg) -> dict:
    """``model.max_memory`` in bytes, GPU indices as ints (YAML gives "0"); a size accelerate cannot read is an error."""
    from accelerate.utils import convert_file_size_to_int

    caps = {}
    for k, v in (model_cfg.max_memory or {}).items():
        try:
            caps[int(k) if str(k).isdigit() else str(k)] = int(convert_file_size_to_int(v))
        except (ValueError, TypeError):
            raise ConfigError(f"model.max_memory.{k}={v!r}: write a size accelerate reads, e.g. 7GiB or 7000MB") from None
    return caps


def offload_split(model_cfg, quantization: str, budget, weights_as_loaded: int, largest_block: int) -> dict | None:
    """The GPU and CPU sides of ``budget`` under ``model.device_map`` + a GPU cap in ``model.max_memory`` (see the module
    docstring); None where they do not apply (no device_map, a device_map that ignores max_memory, no GPU entry): the
    whole budget is then the GPU's, as before. Bytes; ``fits`` is the CPU side's verdict and the quantized refusal."""
    dm = model_cfg.device_map
    caps = max_memory_caps(model_cfg) if isinstance(dm, str) and dm in PLACED_BY_ACCELERATE else {}
    gpus = sorted(k for k in caps if isinstance(k, int))
    if not gpus:
        return None
    gpu, cap = gpus[0], caps[gpus[0]]  # one GPU trains: layers on a second GPU are counted on the first, the safe side
    usable = int(cap * (BNB_CAP_SHARE if quantization != "none" else 1))
    out = dict(gpu_key=f"model.max_memory.{gpu}", gpu_cap=cap, usable=usable, weights_as_loaded=int(weights_as_loaded),
               largest_block=int(largest_block), offloaded=0, gpu_weights=budget.weights, cpu_cap=None, cpu_source="",
               disk=0, refused="", fits=True, multi_gpu=len(gpus) > 1)
    if weights_as_loaded > usable:  # accelerate then keeps room for the largest block and offloads what is past it
        out["offloaded"] = int(weights_as_loaded - max(usable - largest_block, 0))
        out["gpu_weights"] = usable  # resident weights + the one offloaded layer copied in, both under the cap
        if quantization != "none":
            out["refused"] = (f"transformers refuses to load a quantization={quantization} (bitsandbytes) model with layers on the "
                              f"CPU: raise {out['gpu_key']} or use quantization=none")
        if "cpu" in caps:
            out["cpu_cap"], out["cpu_source"] = caps["cpu"], "model.max_memory.cpu"
        else:
            out["cpu_cap"], out["cpu_source"] = int(available_ram()), "available RAM"
        # past the CPU's cap accelerate spills to model.offload_folder (disk); without one, transformers stops
        out["disk"] = max(out["offloaded"] - out["cpu_cap"], 0) if model_cfg.offload_folder else 0
        out["fits"] = not out["refused"] and out["offloaded"] - out["disk"] <= out["cpu_cap"]
    out["gpu_bytes"] = int(budget.total - budget.weights + out["gpu_weights"])
    return out


def offload_text(off: dict) -> str:
    """One sentence: what ``model.max_memory`` puts where, for memory_check's line, stage=plan and stage=doctor."""
    cap = f"{off['gpu_key']}={off['gpu_cap'] / GiB:g} GiB"
    if not off["offloaded"]:
        text = (f"{cap} holds all {off['weights_as_loaded'] / 1e9:.2f} GB of weights as loaded (usable "
                f"{off['usable'] / 1e9:.2f} GB): nothing is offloaded to the CPU")
        if off["gpu_weights"] > off["weights_as_loaded"]:
            text += f"; peft's fp32 upcast then makes them {off['gpu_weights'] / 1e9:.2f} GB on the GPU"
        return text
    text = (f"{cap} keeps up to {off['gpu_weights'] / 1e9:.2f} GB of weights on the GPU and offloads "
            f"{off['offloaded'] / 1e9:.2f} GB to the CPU")
    cpu = f"{off['cpu_cap'] / 1e9:.2f} GB {off['cpu_source']}"
    if off["refused"]:
        text += f", but {off['refused']}"
    elif off["disk"]:
        text += f" ({off['disk'] / 1e9:.2f} GB of it past {cpu} to model.offload_folder, on disk)"
    elif off["fits"]:
        text += f" (within {cpu})"
    else:
        more = "raise model.max_memory.cpu" if off["cpu_source"] == "model.max_memory.cpu" else "free RAM"
        text += f", more than {cpu}: {more} or set model.offload_folder to spill the rest to disk"
    return text + ("; only the first GPU of model.max_memory is planned (layers on the others are counted on it)"
                   if off["multi_gpu"] else "")


def levers_left(cfg) -> list[str]:
    """The memory levers a run does not use yet, for a "does not fit" error (it advised nf4 and gradient checkpointing to
    auth_grpo, which has both on)."""
    left = []
    if not OmegaConf.select(cfg, "quantization.load_in_4bit", default=False):
        left.append("quantization=nf4")
    if not OmegaConf.select(cfg, "train.gradient_checkpointing", default=False):
        left.append("train.gradient_checkpointing=true")
    return left
