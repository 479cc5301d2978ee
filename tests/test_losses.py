"""The objectives sectune owns, against values worked out by hand (softplus(x) = log(1 + e^x))."""

from __future__ import annotations

import math

import pytest
import torch

from sectune.losses import bradley_terry_loss, dpo_implicit_rewards, dpo_loss, pairwise_accuracy


def test_bradley_terry_without_margin():
    # pair 1: Δ = 2 - 1 = 1 → softplus(-1) = 0.313262; pair 2: Δ = 0 - 1 = -1 → softplus(1) = 1.313262
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx(0.8132616875, abs=1e-6)


def test_bradley_terry_with_margin():
    # Δ - 0.5 = 0.5 → softplus(-0.5) = 0.474077; Δ - 0.5 = -1.5 → softplus(1.5) = 1.701413
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), margin=0.5)
    assert loss.item() == pytest.approx(1.0877451311, abs=1e-6)


def test_bradley_terry_is_finite_where_log_of_sigmoid_is_not():
    # seed 000's -log(sigmoid(Δ)) is inf at Δ = -200; logsigmoid gives the exact 200
    r_c, r_r = torch.tensor([-100.0]), torch.tensor([100.0])
    assert torch.isinf(-torch.log(torch.sigmoid(r_c - r_r))).item()
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx(200.0)


def test_bradley_terry_gradient_pushes_chosen_up():
    r_c = torch.tensor([0.0], requires_grad=True)
    r_r = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(r_c, r_r).backward()
    assert r_c.grad.item() == pytest.approx(-0.5) and r_r.grad.item() == pytest.approx(0.5)  # -σ(-0) = -1/2


def test_pairwise_accuracy_counts_ties_as_wrong():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])).item() == pytest.approx(1 / 3)


def test_dpo_loss_hand_computed():
    # log-ratios: chosen [-10+11, -20+20] = [1, 0]; rejected [-12+11, -18+19] = [-1, 1]
    # β·(chosen - rejected) = 0.1·[2, -1] = [0.2, -0.1] → mean(softplus(-0.2), softplus(0.1)) = 0.671268
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -18.0])
    rc, rr = torch.tensor([-11.0, -20.0]), torch.tensor([-11.0, -19.0])
    assert dpo_loss(pc, pr, rc, rr, beta=0.1).item() == pytest.approx(0.6712677647, abs=1e-6)
    chosen, rejected = dpo_implicit_rewards(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(chosen, torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.1, 0.1]))


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-5.0, -7.5, -30.0])
    other = torch.tensor([-6.0, -2.0, -31.0])
    assert dpo_loss(logps, other, logps.clone(), other.clone(), beta=0.3).item() == pytest.approx(math.log(2))


def test_key_value_weights_mark_the_first_value_token_and_a_string_values_first_token():
    from sectune.losses import key_value_weights

    # tokens: 5 KEY 1 7 KEY QUOTE 2 KEY  (KEY=9, QUOTE=3): after KEY come 1 and QUOTE; after KEY QUOTE comes 2;
    # the last KEY has no value in the row
    ids = torch.tensor([[5, 9, 1, 7, 9, 3, 2, 9]])
    assert key_value_weights(ids, [[9]], 3, 5.0).tolist() == [[1, 1, 5, 1, 1, 5, 5, 1]]
    # no quote rule: only the token right after the key
    assert key_value_weights(ids, [[9]], None, 5.0).tolist() == [[1, 1, 5, 1, 1, 5, 1, 1]]
    # a two-token key matches only where both tokens occur in order (7 9 at 3-4, not 5 9 at 0-1)
    assert key_value_weights(ids, [[7, 9]], 3, 2.0).tolist() == [[1, 1, 1, 1, 1, 2, 2, 1]]
    # rows are independent; a pattern longer than the row matches nothing
    two = torch.tensor([[9, 4, 4], [4, 9, 4]])
    assert key_value_weights(two, [[9]], None, 3.0).tolist() == [[1, 3, 1], [1, 1, 3]]
    assert key_value_weights(two, [[9, 4, 4, 4]], None, 3.0).tolist() == [[1, 1, 1], [1, 1, 1]]


def test_grpo_asymmetric_clip_uses_the_upper_epsilon_above_one_and_the_lower_below():
    """clip_epsilon_high (DAPO's clip-higher): ρ is clipped to [1 - ε, 1 + ε_high], in the loss and in clip_fraction."""
    from sectune.losses import clip_fraction, grpo_loss

    old = torch.log(torch.tensor([[0.4]]))
    up, down = old + math.log(1.5), old + math.log(0.5)  # ρ = 1.5 and ρ = 0.5
    adv, mask = torch.tensor([1.0]), torch.tensor([[1]])
    # ρ = 1.5, Â = 1: -min(1.5, clip(1.5, 0.8, 1.3)) = -1.3 (a symmetric ε = 0.2 would give -1.2)
    assert grpo_loss(up, old, None, adv, mask, 0.2, beta=0.0, clip_epsilon_high=0.3).item() == pytest.approx(-1.3, abs=1e-6)
    # ε_high = 0.6: 1.5 is inside the clip, -1.5
    assert grpo_loss(up, old, None, adv, mask, 0.2, beta=0.0, clip_epsilon_high=0.6).item() == pytest.approx(-1.5, abs=1e-6)
    # the lower end stays 1 - ε: ρ = 0.5, Â = -1: -min(-0.5, -0.8) = 0.8
    assert grpo_loss(down, old, None, -adv, mask, 0.2, beta=0.0, clip_epsilon_high=0.6).item() == pytest.approx(0.8, abs=1e-6)
    assert clip_fraction(up, old, adv, mask, 0.2, clip_epsilon_high=0.6).item() == 0.0
    assert clip_fraction(up, old, adv, mask, 0.2, clip_epsilon_high=0.3).item() == 1.0
