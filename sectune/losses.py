"""Objectives sectune owns, as pure tensor functions (no model, no trainer, no globals).

Each is written as its paper writes it and tested against hand-computed values
(``tests/test_losses.py``). Trainers call these; TRL's trainers compute the same formulas where
sectune hands the loop to them (DPO), and the tests hold the two side by side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Bradley-Terry pairwise loss (Ouyang et al. 2022; seed 000's reward model), mean over pairs:

        L = -log σ(r_chosen - r_rejected - margin)

    ``logsigmoid`` rather than ``log(sigmoid(·))`` (the seed's form): the same value, but finite
    when the rejected score leads by more than ~90 (where the seed's form returns inf).
    """
    return -F.logsigmoid(r_chosen.float() - r_rejected.float() - margin).mean()


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose chosen score is strictly above the rejected one (ties count as wrong)."""
    return (r_chosen > r_rejected).float().mean()


def dpo_implicit_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards β·log(π/π_ref) of the chosen and the rejected completions."""
    return beta * (policy_chosen_logps - ref_chosen_logps), beta * (policy_rejected_logps - ref_rejected_logps)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Direct preference optimisation (Rafailov et al. 2023, eq. 7), mean over pairs:

        L = -log σ(β·[(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))])

    The inputs are summed completion log-probs per pair. With π = π_ref (a fresh LoRA adapter,
    whose B matrix is zero) the log-ratio is 0 and the loss is log 2.
    """
    chosen, rejected = dpo_implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return -F.logsigmoid(chosen - rejected).mean()


# ------------------------------------------------------------------------------------------ GRPO
# Group relative policy optimisation (Shao et al. 2024, DeepSeekMath, eq. 3 and 4). For a prompt q,
# G completions o_1..o_G are sampled from π_old and scored r_1..r_G; every token t of o_i gets the
# group-normalised advantage Â_i and the objective (maximised) is
#
#     J = E[ 1/G Σ_i 1/|o_i| Σ_t { min(ρ_it·Â_i, clip(ρ_it, 1-ε, 1+ε)·Â_i) - β·D_KL[π_θ || π_ref] } ]
#     ρ_it = π_θ(o_it | q, o_i<t) / π_old(o_it | q, o_i<t)
#
# with the KL estimated per token by the unbiased, always non-negative k3 estimator (Schulman 2020):
#
#     D_KL ≈ π_ref/π_θ - log(π_ref/π_θ) - 1 = exp(ref - logp) - (ref - logp) - 1
#
# The loss is -J. TRL's GRPOTrainer (1.16) computes exactly this; tests/test_rl.py holds the two side by side.


#: what a GRPO advantage may be divided by (TRL's ``scale_rewards``, ``rl.scale_rewards``)
GRPO_SCALES = ("group", "batch", "none")


def grpo_advantages(rewards: torch.Tensor, num_generations: int, eps: float = 1e-4, scale: bool | str = True) -> torch.Tensor:
    """Group-normalised advantages ``Â_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` for rewards laid out
    group after group (``[B·G]``: the G completions of prompt 0, then of prompt 1, …).

    ``std`` is the sample standard deviation (Bessel's correction, ``/(G-1)``), as TRL's ``nanstd``
    computes it, and ``eps = 1e-4`` is TRL's; a group whose rewards are all equal gets advantage 0.
    ``scale`` is TRL's ``scale_rewards`` (``rl.scale_rewards``): ``"group"`` (or True) as above; ``"batch"``
    divides by the std of all the batch's rewards instead, so a group whose rewards barely differ keeps small
    advantages; ``"none"`` (or False) keeps only the mean baseline (Dr. GRPO).
    """
    if num_generations < 2 or rewards.numel() % num_generations:
        raise ValueError(f"rewards ({rewards.numel()}) must hold whole groups of num_generations={num_generations} >= 2")
    mode = {True: "group", False: "none"}.get(scale, scale)
    if mode not in GRPO_SCALES:
        raise ValueError(f"scale={scale!r}: choose group, batch or none")
    r = rewards.float().view(-1, num_generations)
    adv = r - r.mean(dim=1, keepdim=True)
    if mode == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    elif mode == "batch":
        adv = adv / (r.std() + eps)
    return adv.view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ || π_ref) estimate ``exp(ref - logp) - (ref - logp) - 1``: 0 where π_θ = π_ref, else > 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    mask = mask.to(per_token.dtype)
    if loss_type == "dapo":  # every completion token of the batch weighs the same (TRL's default)
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "grpo":  # the paper: 1/|o_i| within a completion, then 1/G over completions
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    raise ValueError(f"loss_type={loss_type!r}: choose dapo or grpo")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_epsilon: float = 0.2,
    beta: float = 0.04,
    loss_type: str = "dapo",
    clip_epsilon_high: float | None = None,
) -> torch.Tensor:
    """The clipped GRPO surrogate plus β·KL, as a loss (-J above).

    ``logp``, ``old_logp``, ``ref_logp``: per-token log-probs ``[N, T]`` of the sampled completion tokens
    under π_θ, π_old (the policy that sampled them) and π_ref; ``advantages``: ``[N]``; ``mask``: ``[N, T]``,
    1 on completion tokens. Per token ``-min(ρ·Â, clip(ρ, 1-ε, 1+ε_high)·Â) + β·KL_k3``, then averaged
    over the masked tokens: ``loss_type="dapo"`` (one mean over every token of the batch, TRL's default)
    or ``"grpo"`` (the paper's per-completion mean, then the mean over completions). ``ref_logp`` may be
    None when ``beta`` is 0.
    """
    eps_high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_epsilon, 1 + eps_high) * adv)
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs (ref_logp)")
        per_token = per_token + beta * k3_kl(logp, ref_logp)
    return _aggregate(per_token, mask, loss_type)


def clip_fraction(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    clip_epsilon: float = 0.2, clip_epsilon_high: float | None = None,
) -> torch.Tensor:
    """Share of completion tokens whose gradient the clip removes: ρ < 1-ε with Â < 0, or ρ > 1+ε with Â > 0
    (TRL's ``clip_ratio/region_mean``). 0 whenever π_θ = π_old (one update per generated batch, μ = 1)."""
    eps_high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    clipped = ((ratio < 1 - clip_epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    mask = mask.to(torch.float32)
    return (clipped.float() * mask).sum() / mask.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------- causal contrastive
# Seed 002's objective for an injection-robust analyst. For a benign input b, a counterfactual b_cf
# (same meaning, other surface: renamed users, IPs, ports, times) and the injected input b_inj
# (b carrying a planted instruction), with representations r (pooled hidden states):
#
#     L = λc·L_causal + λs·L_spurious + λt·L_task
#     L_causal   = -cos(r_b, r_cf) / τ       pull a rewording onto the same representation
#     L_spurious =  cos(r_b, r_inj) / τ      push the injected input away
#     L_task     = cross-entropy on the benign answer tokens (the analyst still answers)
#
# Cosines are averaged over the batch. The seed sets τ = 0.07 and names no other weights (λ = 1).


def causal_contrastive_loss(
    r_b: torch.Tensor,
    r_cf: torch.Tensor,
    r_inj: torch.Tensor,
    task_loss: torch.Tensor | float,
    tau: float = 0.07,
    lambda_causal: float = 1.0,
    lambda_spurious: float = 1.0,
    lambda_task: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, {"causal", "spurious", "task"}) for ``[N, H]`` representations; see the formula above.

    Computed in fp32 whatever the autocast dtype: 1/τ ≈ 14 magnifies bf16's rounding of a cosine."""
    if tau <= 0:
        raise ValueError(f"tau={tau}: the temperature must be > 0")
    causal = -(F.cosine_similarity(r_b.float(), r_cf.float(), dim=-1) / tau).mean()
    spurious = (F.cosine_similarity(r_b.float(), r_inj.float(), dim=-1) / tau).mean()
    task = task_loss.float() if isinstance(task_loss, torch.Tensor) else torch.tensor(float(task_loss), device=r_b.device)
    total = lambda_causal * causal + lambda_spurious * spurious + lambda_task * task
    return total, {"causal": causal, "spurious": spurious, "task": task}


def causal_stability(r_b: torch.Tensor, r_cf: torch.Tensor) -> torch.Tensor:
    """Mean cos(r_b, r_cf): 1 when a rewording leaves the representation where it was."""
    return F.cosine_similarity(r_b.float(), r_cf.float(), dim=-1).mean()


def spurious_separation(r_b: torch.Tensor, r_inj: torch.Tensor) -> torch.Tensor:
    """Mean 1 − cos(r_b, r_inj): how far the injected input sits from the benign one (0 = same place)."""
    return (1 - F.cosine_similarity(r_b.float(), r_inj.float(), dim=-1)).mean()


def causal_discrimination(r_b: torch.Tensor, r_cf: torch.Tensor, r_inj: torch.Tensor) -> torch.Tensor:
    """Stability minus the mean cos(r_b, r_inj): the margin by which a rewording stays closer than an injection."""
    return causal_stability(r_b, r_cf) - F.cosine_similarity(r_b.float(), r_inj.float(), dim=-1).mean()


def key_value_weights(input_ids: torch.Tensor, key_patterns: list[list[int]], quote_id: int | None, weight: float) -> torch.Tensor:
    """Per-token weights for a causal-LM loss that stresses the values of chosen answer keys.

    ``input_ids`` [B, L]; ``key_patterns``: token-id sequences of keys (``"failed_logins":``). Token ``j``
    gets ``weight`` when the tokens just before it are a key pattern (the value's first token), or when
    token ``j-1`` is such a token and is ``quote_id`` (a string value's opening quote, then its first
    token); every other token gets 1. Returns float weights [B, L] aligned with ``input_ids``."""
    ids = input_ids
    after = torch.zeros_like(ids, dtype=torch.bool)
    for pat in key_patterns:
        m = len(pat)
        if m == 0 or ids.size(1) <= m:
            continue
        hit = (ids.unfold(1, m, 1)[:, : ids.size(1) - m] == torch.as_tensor(pat, device=ids.device)).all(-1)
        after[:, m:] |= hit
    if quote_id is not None:
        after[:, 1:] |= after[:, :-1] & (ids[:, :-1] == quote_id)
    return torch.where(after, float(weight), 1.0)


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Weighted mean cross-entropy over the rows whose target is not ``ignore_index`` (the arguments of
    :func:`weighted_cross_entropy_terms`).

    ``loss = Σ_i w_i · ℓ_i / Σ_i w_i`` with ``w_i = weight[t_i] · sample_weight_i`` and
    ``ℓ_i = -(1-ε) log p_i[t_i] - ε · mean_c log p_i[c]`` (ε = label smoothing). Without smoothing
    and sample weights this equals ``F.cross_entropy(logits, targets, weight=weight)``.
    logits ``[N, C]``, targets ``[N]``, weight ``[C]``, sample_weight ``[N]``.
    """
    num, den = weighted_cross_entropy_terms(logits, targets, *args, **kwargs)
    return num / den.clamp_min(1e-12)


def weighted_cross_entropy_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_i w_i · ℓ_i, Σ_i w_i)`` of :func:`weighted_cross_entropy`: its numerator and denominator, so that several
    processes can divide their numerators by the denominator summed over all of them."""
    logp = F.log_softmax(logits.float(), dim=-1)
    keep = targets != ignore_index
    safe_t = torch.where(keep, targets, torch.zeros_like(targets))
    nll = -logp.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(dim=-1)
    w = keep.to(logp.dtype)
    if weight is not None:
        w = w * weight.to(logp.device, logp.dtype)[safe_t]
    if sample_weight is not None:
        w = w * sample_weight.to(logp.device, logp.dtype)
    return (w * nll).sum(), w.sum()
