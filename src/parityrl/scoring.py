"""Scoring: the trainer-side recompute of what engines sampled (`parityrl.batch` holds the contract).

- `score`: the trainer's recompute of the sampled tokens' processed logprobs under the current
  weights, returning `(logprobs, in_support)`; the trainer's loss, its parity metrics and `parityrl
  check` all call it, so "what the trainer computes" is this one function.
- `Mismatch`: engine-vs-trainer statistics on the same tokens (k3, |delta|, outside-support count),
  as sums that add up across micro-batches.

Outside-support rule: an engine-sampled token can fall outside the trainer's top-k/top-p support
(numerics differ by ~1 ulp at the cut-off). Its processed logprob is -inf on the trainer side;
`score` reports it as `in_support=False` with logprob 0, so no -inf or NaN reaches a loss, and
`Mismatch` counts it as outside instead of averaging it.

Shapes: `B` sequences, `R` packed rows, `L` positions in a row, `P` prompt positions, `T` completion
positions, `V` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from parityrl.batch import PackedBatch
from parityrl.config import SamplingConfig
from parityrl.policy import apply_penalties_at, compute_context, entropy_of, processed_log_distribution, token_logprobs

SCORE_CHUNK_ELEMENTS = 1 << 22
"""Positions x vocabulary entries the head, penalties and processed distribution handle at once
(16 MiB per fp32 [positions, V] copy; a chunk makes a handful of them): 85 positions of a 49k
vocabulary, 32k of the tiny model's 128. The trainer's extra memory over the model body's is this,
whatever the batch."""


@dataclass
class Scored:
    """The trainer's view of a packed batch under its current weights."""

    logprobs: Tensor  # [B, T] processed logprobs of the sampled tokens; -inf outside support, 0 at padding
    in_support: Tensor  # [B, T] bool: generated and inside the trainer's sampling support
    entropy: Tensor  # [B, T] entropy (nats) of the processed distribution at each position, 0 at padding; no gradient
    log_distribution: Tensor | None = None
    """[N, V] the whole processed distribution's log-probabilities (-inf outside support) at each generated
    position, sample by sample (`completion_mask` order); only when asked for (`parityrl check --full-vocab`)."""

    @property
    def logprobs_safe(self) -> Tensor:
        """[B, T] logprobs with 0 wherever `in_support` is False: what a loss may touch."""
        return torch.where(self.in_support, self.logprobs, torch.zeros_like(self.logprobs))


class PolicyScorer(nn.Module):
    """An HF causal LM seen as the trainer sees it: packed batch in, processed logprobs out.

    The model body runs once over the packed rows; the head, the penalties and the processed
    log-distribution then run on chunks of `SCORE_CHUNK_ELEMENTS // V` generated positions under
    activation checkpointing, so neither the forward nor the backward pass ever holds
    [tokens x vocabulary] for the batch (a 49k-vocabulary model at 8 x 8 x 256 tokens held ~20 GB
    of logits and their copies). One module, so DDP (and FSDP) see one forward that covers every
    parameter the loss touches."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        config = getattr(model, "config", None)
        for unsupported in ("final_logit_softcapping", "logit_scale"):
            if getattr(config, unsupported, None) not in (None, 1.0):
                raise ValueError(f"{type(model).__name__} transforms its logits ({unsupported}); parityrl's chunked head does not replay that")

    def forward(self, packed: PackedBatch, sampling: SamplingConfig, dtype: str, keep_distribution: bool = False) -> Scored:
        device_type = packed.input_ids.device.type
        body = self.model.get_decoder()
        bias = packed.attention_bias(next(self.model.parameters()).dtype)
        with compute_context(dtype, device_type):
            hidden = body(input_ids=packed.input_ids, attention_mask=bias, position_ids=packed.position_ids, use_cache=False).last_hidden_state  # [R, L, H]
        rows, positions = packed.completion_mask.nonzero(as_tuple=True)  # [N] each: generated positions, sample by sample
        # the hidden state that predicts completion token t: its row's position logit_index[b, t]
        hidden_generated = hidden[packed.sample_row[rows], packed.logit_index[rows, positions]]  # [N, H]
        tokens = packed.completion_ids[rows, positions]  # [N]
        head = self.model.get_output_embeddings()
        chunk = max(1, SCORE_CHUNK_ELEMENTS // head.weight.shape[0])

        def score_chunk(hidden_chunk: Tensor, rows_chunk: Tensor, positions_chunk: Tensor, tokens_chunk: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
            with compute_context(dtype, device_type):
                logits = head(hidden_chunk)  # [n, V]; fp32 with the fp32 head (fix 4)
            # penalties see the prompt and the tokens generated before each position
            penalised = apply_penalties_at(
                logits, packed.prompt_ids, packed.prompt_mask, packed.completion_ids, packed.completion_mask, rows_chunk, positions_chunk, sampling
            )
            log_distribution = processed_log_distribution(penalised, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
            with torch.no_grad():
                entropy = entropy_of(log_distribution)
            kept = log_distribution.detach() if keep_distribution else None
            return token_logprobs(log_distribution, tokens_chunk), entropy, kept

        pieces = []
        # recomputed in backward when there are several chunks: only each chunk's [n, H] hidden states are
        # kept, never its [n, V]; a single chunk is within the budget as it is (the tiny model's whole batch)
        recompute = torch.is_grad_enabled() and tokens.shape[0] > chunk
        for start in range(0, tokens.shape[0], chunk):
            args = (hidden_generated[start : start + chunk], rows[start : start + chunk], positions[start : start + chunk], tokens[start : start + chunk])
            pieces.append(checkpoint(score_chunk, *args, use_reentrant=False) if recompute else score_chunk(*args))
        flat_logprobs = torch.cat([p[0] for p in pieces]) if pieces else hidden.new_zeros(0, dtype=torch.float32)
        flat_entropy = torch.cat([p[1] for p in pieces]) if pieces else flat_logprobs.detach()
        logprobs = torch.zeros(packed.completion_ids.shape, dtype=torch.float32, device=hidden.device).index_put((rows, positions), flat_logprobs)
        entropy = torch.zeros_like(logprobs, requires_grad=False).index_put((rows, positions), flat_entropy.detach())
        in_support = packed.completion_mask & torch.isfinite(logprobs)
        distribution = torch.cat([p[2] for p in pieces]) if keep_distribution and pieces else None
        return Scored(logprobs, in_support, entropy, distribution)


def score(model: nn.Module, packed: PackedBatch, sampling: SamplingConfig, dtype: str, keep_distribution: bool = False) -> Scored:
    """THE trainer-side recompute: processed logprobs of the sampled tokens under `model`.

    `model`: an HF causal LM, or a `PolicyScorer` (possibly wrapped by DDP) around one. `sampling` is
    what the trainer replays (`RunConfig.trainer_sampling()`); `dtype` the model dtype whose compute
    precision the trainer uses (`policy.compute_context`). Differentiable; wrap in `torch.no_grad()`
    when only measuring. `keep_distribution`: also return the whole processed distribution at each
    generated position ([N, V], no gradient; for checks on small batches)."""
    scorer = model if isinstance(model, PolicyScorer) or isinstance(getattr(model, "module", None), PolicyScorer) else PolicyScorer(model)
    return scorer(packed, sampling, dtype, keep_distribution)


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
