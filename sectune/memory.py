"""Seed 000's memory check ("≥ 7 GB?") before a training stage, from stage=plan's estimate.

The reward and RL stages call :func:`memory_check` first: the planner's predicted peak for the
composed config (no weights loaded) against the device's free memory, so a run that cannot fit
stops (or falls back) in seconds instead of after loading an 8B model.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf


#: stages that train without sectune's selective activation checkpointing (TRL's GRPO loop; federated clients)
NO_SELECTIVE_CHECKPOINTING = ("rl", "federated")


def memory_check(cfg, sequences_per_example: int = 1) -> tuple[bool, str]:
    """(fits, why): the predicted peak of ``train.batch_size × sequences_per_example`` sequences (2 for
    chosen + rejected, G for GRPO's group) against the device's free memory (``reward.memory_limit_gb``
    overrides it). For a score head the plan still counts LM-head logits: it errs on the safe side."""
    from sectune.stages import plan

    c = OmegaConf.merge(cfg, {"plan": {"batch_size": sequences_per_example * int(cfg.train.batch_size)}})
    if cfg.stage.name in NO_SELECTIVE_CHECKPOINTING:  # these stages do not apply it: plan their activations without it
        c.train.selective_checkpointing = False
    budget, info = plan.estimate(c)
    if cfg.reward.memory_limit_gb is not None:
        free, where = float(cfg.reward.memory_limit_gb) * 1e9, "reward.memory_limit_gb"
    elif info["device"] == "cuda":
        free, where = float(torch.cuda.mem_get_info()[0]), "free GPU memory"
    else:
        import psutil

        free, where = float(psutil.virtual_memory().available), "available RAM"
    need = float(budget.total)
    return need <= free, f"predicted peak {need / 1e9:.2f} GB ({info['model']}, {info['quantization']}) vs {free / 1e9:.2f} GB {where}"


def levers_left(cfg) -> list[str]:
    """The memory levers a run does not use yet, for a "does not fit" error (it advised nf4 and gradient checkpointing to
    auth_grpo, which has both on)."""
    left = []
    if not OmegaConf.select(cfg, "quantization.load_in_4bit", default=False):
        left.append("quantization=nf4")
    if not OmegaConf.select(cfg, "train.gradient_checkpointing", default=False):
        left.append("train.gradient_checkpointing=true")
    return left
