"""Scoring: the engine -> trainer contract and the trainer-side recompute, in one place.

- `Sample`: what an engine hands the trainer: prompt and completion token ids, the logprob the engine
  reported for each sampled token (`logprobs_old`) and the policy version that produced it.
- `pack_samples` / `PackedBatch`: right-padded tensors of a list of samples.
- `score`: the trainer's recompute of the sampled tokens' processed logprobs under the current
  weights, returning `(logprobs, in_support)`; the trainer's loss, its parity metrics and `parityrl
  check` all call it, so "what the trainer computes" is this one function.
- `Mismatch`: engine-vs-trainer statistics on the same tokens (k3, |delta|, outside-support count),
  as sums that add up across micro-batches.

Outside-support rule: an engine-sampled token can fall outside the trainer's top-k/top-p support
(numerics differ by ~1 ulp at the cut-off). Its processed logprob is -inf on the trainer side;
`score` reports it as `in_support=False` with logprob 0, so no -inf or NaN reaches a loss, and
`Mismatch` counts it as outside instead of averaging it.

Shapes: `B` sequences, `L` prompt+completion positions, `T` completion positions, `V` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from parityrl.config import SamplingConfig
from parityrl.policy import apply_penalties, compute_context, processed_logprobs, sampling_logits, sequence_logits

NO_VERSION = 1 << 40
"""Stands in for "no token" when taking the oldest version of an empty completion."""


@dataclass
class Sample:
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    logprobs_old: list[float]
    """Engine-reported logprob of each completion token (processed or raw, per engine config)."""
    version_per_token: list[int]
    """Policy version that produced each completion token."""
    finish_reason: str = "length"
    """`stop` (EOS) or `length` (max_new_tokens reached) or `abort`."""
    replica: int | None = None
    """Engine replica that generated the sample (`pipeline.backend: ray`); None with one local engine."""
    top_logprobs_old: list[dict[int, float]] | None = None
    """Only for `check --full-vocab`: per completion position, the engine's processed logprobs of its
    top-K tokens (all tokens when K is the vocabulary size)."""

    @property
    def mixed_version(self) -> bool:
        """The sequence spans a weight update (its tokens come from more than one policy version)."""
        return len(set(self.version_per_token)) > 1

    @property
    def oldest_version(self) -> int:
        return min(self.version_per_token, default=NO_VERSION)


@dataclass
class PackedBatch:
    input_ids: Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: Tensor  # [B, L]
    completion_start: Tensor  # [B] index of the first completion token in input_ids
    completion_ids: Tensor  # [B, T]
    completion_mask: Tensor  # [B, T] bool, generated (not padding)
    logprobs_old: Tensor  # [B, T] engine logprobs, 0 at padding
    version_per_token: Tensor  # [B, T] int64, -1 at padding
    replica: Tensor  # [B] int64 engine replica of each sequence, -1 when unknown (one local engine)

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch on `device` (the trainer's)."""
        return PackedBatch(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))

    def sequence_versions(self) -> tuple[Tensor, Tensor, Tensor]:
        """(oldest [B], newest [B], has_tokens [B]) policy version of each sequence's completion."""
        generated = self.completion_mask
        newest = self.version_per_token.masked_fill(~generated, -1).amax(-1)
        oldest = self.version_per_token.masked_fill(~generated, NO_VERSION).amin(-1)
        return oldest, newest, generated.any(-1)


def pack_samples(samples: list[Sample], pad_id: int) -> PackedBatch:
    batch = len(samples)
    width = max(len(s.prompt_token_ids) + len(s.completion_token_ids) for s in samples)
    max_completion = max(1, max(len(s.completion_token_ids) for s in samples))
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    start = torch.zeros(batch, dtype=torch.long)
    completion_ids = torch.zeros((batch, max_completion), dtype=torch.long)
    completion_mask = torch.zeros((batch, max_completion), dtype=torch.bool)
    logprobs_old = torch.zeros((batch, max_completion), dtype=torch.float32)
    versions = torch.full((batch, max_completion), -1, dtype=torch.long)
    replica = torch.tensor([-1 if s.replica is None else s.replica for s in samples], dtype=torch.long)
    for row, sample in enumerate(samples):
        sequence = sample.prompt_token_ids + sample.completion_token_ids
        count = len(sample.completion_token_ids)
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
        start[row] = len(sample.prompt_token_ids)
        completion_ids[row, :count] = torch.tensor(sample.completion_token_ids, dtype=torch.long)
        completion_mask[row, :count] = True
        logprobs_old[row, :count] = torch.tensor(sample.logprobs_old, dtype=torch.float32)
        versions[row, :count] = torch.tensor(sample.version_per_token, dtype=torch.long)
    return PackedBatch(input_ids, attention, start, completion_ids, completion_mask, logprobs_old, versions, replica)


def completion_logits(logits: Tensor, completion_start: Tensor, width: int) -> Tensor:
    """Gather the logits that predict each completion token. logits [B, L, V] -> [B, width, V]."""
    positions = completion_start.unsqueeze(-1) - 1 + torch.arange(width, device=logits.device).unsqueeze(0)  # [B, width]
    positions = positions.clamp(max=logits.shape[1] - 1)
    return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


@dataclass
class Scored:
    """The trainer's view of a packed batch under its current weights."""

    logits: Tensor  # [B, T, V] fp32 logits predicting each completion token, penalised (before temperature/truncation)
    logprobs: Tensor  # [B, T] processed logprobs of the sampled tokens; -inf outside support, 0 at padding
    in_support: Tensor  # [B, T] bool: generated and inside the trainer's sampling support

    def log_distribution(self, sampling: SamplingConfig) -> Tensor:
        """[B, T, V] log-probabilities of the whole processed distribution at each position (-inf outside support)."""
        return sampling_logits(self.logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p).log_softmax(dim=-1)

    @property
    def logprobs_safe(self) -> Tensor:
        """[B, T] logprobs with 0 wherever `in_support` is False: what a loss may touch."""
        return torch.where(self.in_support, self.logprobs, torch.zeros_like(self.logprobs))


def score(model: nn.Module, packed: PackedBatch, sampling: SamplingConfig, dtype: str) -> Scored:
    """THE trainer-side recompute: processed logprobs of the sampled tokens under `model`.

    `sampling` is what the trainer replays (`RunConfig.trainer_sampling()`); `dtype` the model dtype
    whose compute precision the trainer uses (`policy.compute_context`). Differentiable; wrap in
    `torch.no_grad()` when only measuring."""
    with compute_context(dtype, packed.input_ids.device.type):
        logits = sequence_logits(model, packed.input_ids, packed.attention_mask)
    logits_completion = completion_logits(logits, packed.completion_start, packed.completion_ids.shape[1])
    # repetition/presence/frequency penalties see the prompt and the tokens generated before each position
    positions = torch.arange(packed.input_ids.shape[1], device=packed.input_ids.device).unsqueeze(0)  # [1, L]
    prompt_mask = (positions < packed.completion_start.unsqueeze(-1)) & packed.attention_mask.bool()  # [B, L]
    penalised = apply_penalties(logits_completion, packed.input_ids, prompt_mask, packed.completion_ids, packed.completion_mask, sampling)
    logprobs = processed_logprobs(penalised, packed.completion_ids, sampling.temperature, sampling.top_k, sampling.top_p, min_p=sampling.min_p)
    in_support = packed.completion_mask & torch.isfinite(logprobs)
    logprobs = torch.where(packed.completion_mask, logprobs, torch.zeros_like(logprobs))
    return Scored(penalised, logprobs, in_support)


def k3(log_ratio: Tensor) -> Tensor:
    """k3 estimator of KL(old || new) from r = new - old: exp(r) - r - 1 (>= 0)."""
    return torch.expm1(log_ratio) - log_ratio


ABS_DIFF_THRESHOLD = 1e-3
"""|engine - trainer| above which a token counts in `frac_abs_diff_gt_1e-3`."""


@dataclass
class Mismatch:
    """Engine-vs-trainer logprob statistics over a set of tokens, kept as sums so micro-batches add up."""

    tokens: int = 0
    """Tokens compared (inside and outside the trainer's support)."""
    outside: int = 0
    """Of those, tokens outside the trainer's support (-inf): counted, never averaged."""
    k3_sum: float = 0.0
    abs_sum: float = 0.0
    abs_max: float = 0.0
    over_threshold: int = 0

    @classmethod
    def of(cls, logprobs_new: Tensor, logprobs_old: Tensor, select: Tensor | None = None) -> Mismatch:
        """Statistics of `logprobs_new` (trainer, may be -inf) vs `logprobs_old` (engine) where `select`."""
        select = torch.ones_like(logprobs_new, dtype=torch.bool) if select is None else select
        valid = select & torch.isfinite(logprobs_new)
        diff = (logprobs_new.double() - logprobs_old.double())[valid]
        return cls(
            tokens=int(select.sum()),
            outside=int((select & ~valid).sum()),
            k3_sum=float(k3(diff).sum()),
            abs_sum=float(diff.abs().sum()),
            abs_max=float(diff.abs().max()) if diff.numel() else 0.0,
            over_threshold=int((diff.abs() > ABS_DIFF_THRESHOLD).sum()),
        )

    def __add__(self, other: Mismatch) -> Mismatch:
        return Mismatch(
            self.tokens + other.tokens,
            self.outside + other.outside,
            self.k3_sum + other.k3_sum,
            self.abs_sum + other.abs_sum,
            max(self.abs_max, other.abs_max),
            self.over_threshold + other.over_threshold,
        )

    def summary(self, prefix: str) -> dict[str, float | None]:
        """`{prefix}/kl`, `/abs_diff_mean`, `/abs_diff_max`, `/frac_abs_diff_gt_1e-3`, `/outside_support_frac`,
        `/tokens`; averages are None when no token was inside the support."""
        inside = self.tokens - self.outside
        return {
            f"{prefix}/kl": self.k3_sum / inside if inside else None,
            f"{prefix}/abs_diff_mean": self.abs_sum / inside if inside else None,
            f"{prefix}/abs_diff_max": self.abs_max if inside else None,
            f"{prefix}/frac_abs_diff_gt_1e-3": self.over_threshold / inside if inside else None,
            f"{prefix}/outside_support_frac": self.outside / self.tokens if self.tokens else None,
            f"{prefix}/tokens": self.tokens,
        }


@dataclass
class DistributionMismatch:
    """Engine vs trainer over the WHOLE processed distribution at each sampled position, as sums.

    The engine reports its processed logprobs of its top-K tokens per position (all tokens when K is
    the vocabulary size). With K < V the tokens outside the top-K are pooled into one "rest" outcome
    on both sides, which gives lower bounds of the full KL and TV (pooling never increases them).
    A position whose supports differ (a token with mass on one side and none on the other) has an
    infinite KL: it is counted in `support_mismatch` and left out of the KL/TV means."""

    positions: int = 0
    support_mismatch: int = 0
    kl_sum: float = 0.0
    tv_sum: float = 0.0
    listed_tokens: int = 0
    """Largest number of tokens the engine listed at one position (K)."""

    @classmethod
    def of(cls, trainer_log_dist: Tensor, engine_ids: Tensor, engine_logprobs: Tensor, vocab_size: int) -> DistributionMismatch:
        """trainer_log_dist [N, V] (log-probabilities, -inf outside support); engine_ids / engine_logprobs
        [N, K] the engine's listed tokens and their processed logprobs (-inf = listed outside support;
        padding rows use id 0 with logprob NaN)."""
        listed = ~torch.isnan(engine_logprobs)  # [N, K]
        logp_engine = engine_logprobs.double().nan_to_num(nan=float("-inf"))
        logp_trainer = trainer_log_dist.double().gather(-1, engine_ids)  # [N, K]
        p_engine, p_trainer = logp_engine.exp(), logp_trainer.exp()
        support_differs = (listed & ((p_engine > 0) != (p_trainer > 0))).any(-1)  # [N]
        both = listed & (p_engine > 0) & (p_trainer > 0)
        kl = torch.where(both, p_engine * (logp_engine - logp_trainer), torch.zeros_like(p_engine)).sum(-1)
        tv = 0.5 * torch.where(listed, (p_engine - p_trainer).abs(), torch.zeros_like(p_engine)).sum(-1)
        if int(listed.sum(-1).max()) < vocab_size:  # pool the unlisted tokens into one outcome
            rest_engine = (1 - torch.where(listed, p_engine, torch.zeros_like(p_engine)).sum(-1)).clamp(min=0)
            rest_trainer = (1 - torch.where(listed, p_trainer, torch.zeros_like(p_trainer)).sum(-1)).clamp(min=0)
            rest_kl = torch.where(
                (rest_engine > 0) & (rest_trainer > 0), rest_engine * (rest_engine.log() - rest_trainer.log()), torch.zeros_like(rest_engine)
            )
            kl, tv = kl + rest_kl, tv + 0.5 * (rest_engine - rest_trainer).abs()
        finite = ~support_differs
        return cls(
            positions=int(engine_ids.shape[0]),
            support_mismatch=int(support_differs.sum()),
            kl_sum=float(kl[finite].sum()),
            tv_sum=float(tv[finite].sum()),
            listed_tokens=int(listed.sum(-1).max()) if listed.numel() else 0,
        )

    def __add__(self, other: DistributionMismatch) -> DistributionMismatch:
        return DistributionMismatch(
            self.positions + other.positions,
            self.support_mismatch + other.support_mismatch,
            self.kl_sum + other.kl_sum,
            self.tv_sum + other.tv_sum,
            max(self.listed_tokens, other.listed_tokens),
        )

    def summary(self, prefix: str = "parity") -> dict[str, float | None]:
        comparable = self.positions - self.support_mismatch
        return {
            f"{prefix}/full_kl": self.kl_sum / comparable if comparable else None,
            f"{prefix}/full_tv": self.tv_sum / comparable if comparable else None,
            f"{prefix}/support_mismatch_frac": self.support_mismatch / self.positions if self.positions else None,
            f"{prefix}/full_positions": self.positions,
            f"{prefix}/full_listed_tokens": self.listed_tokens,
        }


def listed_logprobs(top_logprobs: list[dict[int, float]]) -> tuple[Tensor, Tensor]:
    """Per-position {token: logprob} dicts -> (ids [N, K], logprobs [N, K]) padded with id 0 / NaN."""
    width = max((len(entry) for entry in top_logprobs), default=0)
    ids = torch.zeros((len(top_logprobs), max(width, 1)), dtype=torch.long)
    logprobs = torch.full((len(top_logprobs), max(width, 1)), float("nan"), dtype=torch.float64)
    for row, entry in enumerate(top_logprobs):
        if entry:
            ids[row, : len(entry)] = torch.tensor(list(entry.keys()), dtype=torch.long)
            logprobs[row, : len(entry)] = torch.tensor(list(entry.values()), dtype=torch.float64)
    return ids, logprobs
