"""The loss.* settings each stage's objective reads: a value it does not read is said as the stage starts
(:func:`warn_unread_loss`), and DPO's SFT weight is checked (:func:`dpo_sft_weight`). Re-exported by
:mod:`sectune.config_checks`, whose ``check_values`` refuses the loss settings that cannot run at all."""

from __future__ import annotations


#: the loss.* keys each preference/RL objective reads (the others are another objective's), and what sft, classify and
#: contrastive read whatever loss=… names (they took every other loss.* key without a word: an audit, session 40)
LOSS_READS = {"dpo": ("beta", "label_smoothing"), "bradley_terry": ("margin",), "grpo": ("beta", "clip_epsilon")}
STAGE_LOSS_READS = {"sft": ("label_smoothing", "key_weight", "weighted_keys"), "classify": ("label_smoothing", "class_weights"),
                    "contrastive": ("temperature", "lambda_consistency", "lambda_separation", "lambda_task")}


def warn_unread_loss(cfg) -> None:
    """A loss.* value the stage's objective never reads, said once as the stage starts (``stage=dpo loss.margin=2`` and
    ``stage=reward loss.beta=0.5`` trained exactly as without them, without a word: an audit, session 36). A warning, not
    an error: a pipeline's loss.* reaches every step, and only the step whose objective reads it uses it."""
    import sys

    from sectune.config import LossConfig

    stage = str(cfg.stage.name)
    reads = STAGE_LOSS_READS.get(stage) or LOSS_READS.get(str(cfg.loss.name))
    if reads is None:
        return
    default = LossConfig()
    unread = [f"loss.{k}={cfg.loss[k]}" for k in vars(default) if k != "name" and k not in reads and k in cfg.loss
              and cfg.loss[k] != getattr(default, k)]
    if unread:
        reader = f"stage={stage}" if stage in STAGE_LOSS_READS else f"loss={cfg.loss.name}"
        print(f"sectune: warning: {', '.join(unread)}: not read by {reader} (it reads "
              f"{', '.join(f'loss.{k}' for k in reads)}); this run trains as without {'them' if len(unread) > 1 else 'it'}",
              file=sys.stderr)


def dpo_sft_weight(cfg) -> float:
    """``dpo.sft_weight`` as a float, checked (finite, >= 0): by check_values before the models load and by
    build_dpo_trainer for callers that skip it."""
    import math

    from sectune.errors import ConfigError

    w = float(cfg.dpo.sft_weight)
    if not (math.isfinite(w) and w >= 0):
        raise ConfigError(f"dpo.sft_weight={cfg.dpo.sft_weight}: a finite weight >= 0 (0 = plain DPO)")
    return w


#: TRL 1.16's DPO losses (its DPOConfig.loss_type; "sft" is dpo.sft_weight's), and those that read label smoothing
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sigmoid_norm")
SMOOTHED_DPO_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


def dpo_loss_types(cfg) -> tuple[list[str], list[float] | None]:
    """(TRL's ``loss_type``, ``loss_weights``) for stage=dpo: the sigmoid loss of the DPO paper, or with
    ``loss.label_smoothing`` = ε > 0 robust DPO (Chowdhury et al. 2024: the preference label flipped with probability ε;
    TRL's "robust"); plus ``dpo.sft_weight`` × the chosen answer's NLL (RPO, TRL's "sft"). TRL 1.16's "sigmoid" reads no
    label smoothing: passed beside it, ε changed nothing (helper E's gap report led here, session 45)."""
    from sectune.errors import ConfigError

    chosen = cfg.dpo.get("loss_type")
    smoothing = float(cfg.loss.label_smoothing)
    if chosen is not None and chosen not in DPO_LOSSES:
        raise ConfigError(f"dpo.loss_type={chosen}: choose one of {', '.join(DPO_LOSSES)} (null: sigmoid, or robust with "
                          "loss.label_smoothing > 0)")
    if chosen is not None and smoothing > 0 and chosen not in SMOOTHED_DPO_LOSSES:
        raise ConfigError(f"loss.label_smoothing={smoothing:g}: dpo.loss_type={chosen} does not read it (TRL's "
                          f"{', '.join(SMOOTHED_DPO_LOSSES)} do); set it to 0 or choose one of those")
    if chosen == "exo_pair" and smoothing == 0:  # TRL raised it after the models loaded
        raise ConfigError("dpo.loss_type=exo_pair: needs loss.label_smoothing > 0 (the EXO paper suggests 1e-3)")
    base = chosen or ("robust" if smoothing > 0 else "sigmoid")
    sft_weight = dpo_sft_weight(cfg)
    return ([base, "sft"], [1.0, sft_weight]) if sft_weight else ([base], None)
