"""Advantages and policy-gradient objectives.

Shapes: `B` sequences, `T` completion positions (right-padded). `mask` [B, T] marks tokens that
count: generated, not padding, inside the trainer's sampling support (see `trainer.py`).

Every objective returns a *sum* of per-unit losses and the number of units it summed over, so that
gradient accumulation across micro-batches divides once by the global count:
GSPO's unit is a sequence, GRPO's and REINFORCE's is a token (token-level averaging over the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from parityrl.config import TrainConfig

DEFAULT_CLIP = {"gspo": (3e-4, 4e-4), "grpo": (0.2, 0.2), "reinforce": (0.2, 0.2)}


def group_advantages(rewards: Tensor, kind: str) -> Tensor:
    """rewards [groups, n] -> advantages [groups, n]. All-equal rewards in a group give zeros."""
    if rewards.shape[-1] < 2:
        return torch.zeros_like(rewards)
    mean = rewards.mean(dim=-1, keepdim=True)
    if kind == "group_norm":
        std = rewards.std(dim=-1, keepdim=True)
        return (rewards - mean) / (std + 1e-6)
    if kind == "leave_one_out":
        n = rewards.shape[-1]
        return (rewards - mean) * n / (n - 1)
    raise ValueError(f"unknown advantage kind {kind!r}")


@dataclass
class ObjectiveOutput:
    loss_sum: Tensor
    """Sum of per-unit losses (scalar, differentiable)."""
    units: float
    """Number of units (sequences or tokens) the sum covers."""
    clipped: float
    """Number of units whose clipped branch is active."""
    clip_units: float
    """Denominator of the clip rate (sequences for GSPO, tokens otherwise)."""


def clip_bounds(config: TrainConfig) -> tuple[float, float]:
    low, high = DEFAULT_CLIP[config.objective]
    return (config.clip_low if config.clip_low is not None else low, config.clip_high if config.clip_high is not None else high)


def correction_weights(log_ratio_behaviour: Tensor, config: TrainConfig) -> Tensor:
    """TIS/MIS weights from log(pi_trainer / pi_engine) (no gradient). 'none' gives ones."""
    ratio = log_ratio_behaviour.detach().exp()
    if config.is_correction == "tis":
        return ratio.clamp(max=config.is_cap)
    if config.is_correction == "mis":
        return (ratio <= config.is_cap).to(ratio.dtype)
    return torch.ones_like(ratio)


def policy_loss(
    logprobs_new: Tensor, logprobs_old: Tensor, advantages: Tensor, mask: Tensor, config: TrainConfig
) -> ObjectiveOutput:
    """logprobs_new/logprobs_old/mask [B, T], advantages [B]. Masked entries may hold any finite value.

    With TIS/MIS on, the engine/trainer gap is moved out of the clipped ratio into a capped (TIS) or
    masking (MIS) weight: the ratio is taken against the trainer's own detached logprobs, the weight
    is pi_trainer / pi_engine. Off (default), the ratio is pi_trainer / pi_engine directly.
    """
    mask_f = mask.to(logprobs_new.dtype)
    low, high = clip_bounds(config)
    if config.is_correction != "none":
        weights = correction_weights(logprobs_new - logprobs_old, config)
        logprobs_old = logprobs_new.detach()
    else:
        weights = torch.ones_like(logprobs_new)
    log_ratio = (logprobs_new - logprobs_old) * mask_f

    if config.objective == "gspo":
        lengths = mask_f.sum(-1)
        has_tokens = lengths > 0
        seq_log_ratio = log_ratio.sum(-1) / lengths.clamp(min=1)
        seq_ratio = seq_log_ratio.exp()
        seq_weight = (weights * mask_f).sum(-1) / lengths.clamp(min=1)
        unclipped = seq_ratio * advantages
        clipped = seq_ratio.clamp(1 - low, 1 + high) * advantages
        per_seq = -torch.minimum(unclipped, clipped) * seq_weight * has_tokens
        active = (clipped < unclipped) & has_tokens
        count = float(has_tokens.sum())
        return ObjectiveOutput(per_seq.sum(), count, float(active.sum()), count)

    ratio = log_ratio.exp()
    adv = advantages.unsqueeze(-1)
    token_count = float(mask_f.sum())
    if config.objective == "grpo":
        unclipped = ratio * adv
        clipped = ratio.clamp(1 - low, 1 + high) * adv
        per_token = -torch.minimum(unclipped, clipped) * weights
        active = (clipped < unclipped) & mask
    elif config.objective == "reinforce":
        per_token = -adv * logprobs_new * weights
        # no clipped branch: report how many tokens would fall outside a PPO trust region
        active = ((ratio < 1 - low) | (ratio > 1 + high)) & mask
    else:
        raise ValueError(f"unknown objective {config.objective!r}")
    return ObjectiveOutput((per_token * mask_f).sum(), token_count, float(active.sum()), token_count)
