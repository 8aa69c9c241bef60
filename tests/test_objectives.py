"""Objectives and advantages against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from parityrl.config import TrainConfig
from parityrl.scoring import k3
from parityrl.train.objectives import group_advantages, policy_loss


def test_group_norm_all_equal_rewards_gives_zero_not_nan():
    adv = group_advantages(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]), "group_norm")
    assert torch.equal(adv, torch.zeros(2, 4))


def test_group_norm_and_leave_one_out_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    norm = group_advantages(rewards, "group_norm")
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std().item()  # unbiased: 0.5
    assert torch.allclose(norm, torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / (std + 1e-6))
    loo = group_advantages(rewards, "leave_one_out")
    # r_i - mean of the other three
    assert torch.allclose(loo, torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3]]))


def test_grpo_token_clip_loss_and_gradient():
    config = TrainConfig(objective="grpo")
    new = torch.tensor([[math.log(0.5), math.log(0.4)]], requires_grad=True)
    old = torch.tensor([[math.log(0.4), math.log(0.4)]])
    out = policy_loss(new, old, torch.tensor([1.0]), torch.tensor([[True, True]]), config)
    # ratios 1.25 (clipped to 1.2, branch active) and 1.0
    assert out.loss_sum.item() == pytest.approx(-2.2, abs=1e-6)
    assert (out.units, out.clipped) == (2.0, 1.0)
    out.loss_sum.backward()
    assert torch.allclose(new.grad, torch.tensor([[0.0, -1.0]]), atol=1e-6)


def test_gspo_sequence_ratio_clip_and_gradient():
    config = TrainConfig(objective="gspo")  # eps 3e-4 / 4e-4
    new = torch.tensor([[0.001, 0.0], [0.0002, 0.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    mask = torch.tensor([[True, True], [True, True]])
    out = policy_loss(new, old, torch.tensor([1.0, -1.0]), mask, config)
    s1, s2 = math.exp(0.0005), math.exp(0.0001)
    # seq 1: s1 > 1 + 4e-4 with A>0 -> clipped branch (1.0004) active, no gradient
    # seq 2: inside the region, loss = +s2, d/dnew_t = s2 / 2
    assert out.loss_sum.item() == pytest.approx(-1.0004 + s2, abs=1e-7)
    assert (out.units, out.clipped) == (2.0, 1.0)
    out.loss_sum.backward()
    assert torch.allclose(new.grad, torch.tensor([[0.0, 0.0], [s2 / 2, s2 / 2]]), atol=1e-7)
    assert s1 > 1.0004


def test_gspo_ignores_masked_tokens_in_the_mean():
    config = TrainConfig(objective="gspo")
    new = torch.tensor([[0.0001, 5.0]])
    out = policy_loss(new, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[True, False]]), config)
    assert out.loss_sum.item() == pytest.approx(-math.exp(0.0001), abs=1e-7)


def test_reinforce_gradient_is_minus_advantage():
    config = TrainConfig(objective="reinforce")
    new = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    out = policy_loss(new, new.detach(), torch.tensor([2.0]), torch.tensor([[True, True, False]]), config)
    out.loss_sum.backward()
    assert out.loss_sum.item() == pytest.approx(2.0 * 3.0)
    assert torch.allclose(new.grad, torch.tensor([[-2.0, -2.0, 0.0]]))


def test_tis_caps_the_engine_trainer_weight_and_mis_masks_it():
    new = torch.tensor([[math.log(0.9), math.log(0.5)]], requires_grad=True)
    old = torch.tensor([[math.log(0.3), math.log(0.5)]])  # engine says 0.3 where the trainer says 0.9
    mask = torch.tensor([[True, True]])
    tis = policy_loss(new, old, torch.tensor([1.0]), mask, TrainConfig(objective="grpo", is_correction="tis", is_cap=2.0))
    # ratio vs detached self is 1; weights min(3, 2)=2 and 1
    assert tis.loss_sum.item() == pytest.approx(-(2.0 + 1.0), abs=1e-6)
    mis = policy_loss(new, old, torch.tensor([1.0]), mask, TrainConfig(objective="grpo", is_correction="mis", is_cap=2.0))
    assert mis.loss_sum.item() == pytest.approx(-1.0, abs=1e-6)


def test_k3_is_nonnegative_and_zero_at_equality():
    r = torch.linspace(-3, 3, 61)
    assert (k3(r) >= 0).all() and k3(torch.zeros(1)).item() == 0.0
