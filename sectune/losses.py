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
