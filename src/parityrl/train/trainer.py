"""The trainer: recompute logprobs of sampled tokens, take one optimiser step, measure the mismatch.

The same forward pass that feeds the objective also gives the parity metrics: sequences generated
entirely by the trainer's current version compare engine and trainer at identical weights
(`parity/*`), and in sequences that span a weight update, tokens produced after it compare the
engine's kept-KV computation with a full recompute (`pipeline/kv_staleness_kl`).

Outside-support rule: an engine-sampled token can fall outside the trainer's top-k/top-p support
(numerics differ by ~1 ulp at the cut-off). Its processed logprob is -inf on the trainer side; such
tokens are masked out of the loss and of the KL/parity averages, and counted in
`parity/outside_support_frac`. No -inf or NaN ever reaches the loss or its gradient.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from parityrl.config import RunConfig
from parityrl.engines.base import Sample
from parityrl.policy import (
    compute_context,
    export_state_dict,
    load_policy,
    processed_entropy,
    processed_logprobs,
    sequence_logits,
)
from parityrl.train.objectives import k3, policy_loss


@dataclass
class PackedBatch:
    input_ids: Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: Tensor  # [B, L]
    completion_start: Tensor  # [B] index of the first completion token in input_ids
    completion_ids: Tensor  # [B, T]
    completion_mask: Tensor  # [B, T] bool, generated (not padding)
    logprobs_old: Tensor  # [B, T] engine logprobs, 0 at padding
    version_per_token: Tensor  # [B, T] int64, -1 at padding


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
    return PackedBatch(input_ids, attention, start, completion_ids, completion_mask, logprobs_old, versions)


def completion_logits(logits: Tensor, completion_start: Tensor, width: int) -> Tensor:
    """Gather the logits that predict each completion token. logits [B, L, V] -> [B, width, V]."""
    positions = completion_start.unsqueeze(-1) - 1 + torch.arange(width).unsqueeze(0)  # [B, width]
    positions = positions.clamp(max=logits.shape[1] - 1)
    return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


class MetricSums:
    """Running sums for token/sequence averages across micro-batches."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxes: dict[str, float] = {}

    def add(self, name: str, value: float | Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def max(self, name: str, value: float | Tensor) -> None:
        self.maxes[name] = max(self.maxes.get(name, 0.0), float(value))

    def ratio(self, numerator: str, denominator: str) -> float | None:
        den = self.sums.get(denominator, 0.0)
        return self.sums.get(numerator, 0.0) / den if den > 0 else None


class Trainer:
    def __init__(self, config: RunConfig, model_dir: Path, pad_id: int):
        self.config = config
        self.pad_id = pad_id
        torch.manual_seed(config.seed)
        # fp32 master weights; bf16 models compute in bf16 via policy.compute_context
        self.model = load_policy(model_dir, "float32", config.model.lm_head_fp32)
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
        )
        self.version = 0

    def state_dict_for_engines(self) -> dict[str, Tensor]:
        return export_state_dict(self.model)

    def step(self, samples: list[Sample], advantages: Tensor, probe: list[Sample] | None = None) -> dict[str, float | None]:
        """One optimiser step on `samples` (advantages [len(samples)]); returns metrics; version += 1.

        `probe`: samples generated entirely at the current version, only scored for `parity/*`."""
        start = time.perf_counter()
        sampling, train = self.config.trainer_sampling(), self.config.train
        order = list(range(len(samples)))
        sums = MetricSums()
        if probe:
            self._accumulate_probe(sums, probe)
        micro_batches = [order[i : i + train.micro_batch_size] for i in range(0, len(order), train.micro_batch_size)]
        packed_all = [pack_samples([samples[i] for i in chunk], self.pad_id) for chunk in micro_batches]
        bad_old = sum(int((~torch.isfinite(p.logprobs_old) & p.completion_mask).sum()) for p in packed_all)
        if bad_old:
            return self._skip(f"{bad_old} engine logprobs are NaN/inf", start)
        # normalisers are global across micro-batches: count units first
        total_sequences = sum(int(p.completion_mask.any(-1).sum()) for p in packed_all)
        total_tokens = sum(int(p.completion_mask.sum()) for p in packed_all)
        self.optimizer.zero_grad(set_to_none=True)
        for chunk, packed in zip(micro_batches, packed_all):
            width = packed.completion_ids.shape[1]
            with compute_context(self.config.model.dtype):
                logits = sequence_logits(self.model, packed.input_ids, packed.attention_mask)
            logits_completion = completion_logits(logits, packed.completion_start, width)
            logprobs_new = processed_logprobs(
                logits_completion, packed.completion_ids, sampling.temperature, sampling.top_k, sampling.top_p
            )
            in_support = torch.isfinite(logprobs_new)
            mask = packed.completion_mask & in_support
            logprobs_new_safe = torch.where(mask, logprobs_new, torch.zeros_like(logprobs_new))
            out = policy_loss(logprobs_new_safe, packed.logprobs_old, advantages[chunk], mask, train)
            normaliser = total_sequences if train.objective == "gspo" else total_tokens
            (out.loss_sum / max(normaliser, 1)).backward()
            with torch.no_grad():
                entropy = processed_entropy(logits_completion.detach(), sampling.temperature, sampling.top_k, sampling.top_p)
                self._accumulate(sums, packed, logprobs_new_safe.detach(), mask, entropy, out)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), train.grad_clip if train.grad_clip > 0 else float("inf")
        )
        loss_sum = sums.sums.get("loss", 0.0)
        if not (math.isfinite(loss_sum) and math.isfinite(float(grad_norm))):
            # an optimiser step on a NaN/inf gradient would poison every weight: leave them untouched
            return self._skip(f"non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient norm'}", start)
        self.optimizer.step()
        self.version += 1
        elapsed = time.perf_counter() - start
        metrics = self._finalise(sums)
        metrics |= {
            "train/grad_norm": float(grad_norm),
            "train/step_s": elapsed,
            "perf/train_tok_s": total_tokens / elapsed,
            "train/skipped_steps": 0,
        }
        return metrics

    def _skip(self, reason: str, start: float) -> dict[str, float | None]:
        """No optimiser step (weights and version unchanged); the caller counts and reports it."""
        self.optimizer.zero_grad(set_to_none=True)
        return {"train/skipped_steps": 1, "train/skip_reason": reason, "train/step_s": time.perf_counter() - start}

    def _accumulate(self, sums: MetricSums, packed: PackedBatch, logprobs_new: Tensor, mask: Tensor, entropy: Tensor, out) -> None:
        generated = packed.completion_mask
        log_ratio = (logprobs_new - packed.logprobs_old) * mask
        sums.add("loss", out.loss_sum.detach())
        sums.add("units", out.units)
        sums.add("clipped", out.clipped)
        sums.add("clip_units", out.clip_units)
        sums.add("tokens", generated.sum())
        sums.add("valid_tokens", mask.sum())
        sums.add("outside_support", (generated & ~mask).sum())
        sums.add("k3", k3(log_ratio)[mask].sum())
        sums.add("entropy", entropy[generated].sum())
        lag = (self.version - packed.version_per_token).clamp(min=0)
        sums.add("lag", lag[generated].sum())
        sums.max("lag_max", lag[generated].max() if generated.any() else 0)
        self._accumulate_versions(sums, packed, logprobs_new, mask, prefix="")

    def _accumulate_versions(self, sums: MetricSums, packed: PackedBatch, logprobs_new: Tensor, mask: Tensor, prefix: str) -> None:
        """Parity (sequences entirely at the trainer's version) and KV-staleness sums."""
        generated = packed.completion_mask
        has_tokens = generated.any(-1)
        version_max = packed.version_per_token.masked_fill(~generated, -1).amax(-1)
        version_min = packed.version_per_token.masked_fill(~generated, 1 << 40).amin(-1)
        mixed = (version_max != version_min) & has_tokens
        current = (version_min == self.version) & (version_max == self.version) & has_tokens
        log_ratio = (logprobs_new - packed.logprobs_old) * mask
        abs_diff = (logprobs_new - packed.logprobs_old).abs()
        parity_mask = mask & current.unsqueeze(-1)
        sums.add(f"{prefix}sequences", has_tokens.sum())
        sums.add(f"{prefix}mixed", mixed.sum())
        sums.add(f"{prefix}parity_tokens", parity_mask.sum())
        sums.add("parity_all_tokens", parity_mask.sum())
        sums.add("parity_k3", k3(log_ratio)[parity_mask].sum())
        sums.add("parity_abs", abs_diff[parity_mask].sum())
        sums.max("parity_abs_max", abs_diff[parity_mask].max() if parity_mask.any() else 0)
        # KV staleness: tokens of mixed sequences produced by the current version on an older KV cache
        stale_mask = mask & mixed.unsqueeze(-1) & (packed.version_per_token == self.version)
        sums.add("stale_tokens", stale_mask.sum())
        sums.add("stale_k3", k3(log_ratio)[stale_mask].sum())

    @torch.no_grad()
    def _accumulate_probe(self, sums: MetricSums, probe: list[Sample]) -> None:
        """Parity probe: samples the engine generated right after the last update, scored before the
        next optimiser step, so engine and trainer hold identical weights (lag 0 even in async mode)."""
        sampling = self.config.trainer_sampling()
        packed = pack_samples(probe, self.pad_id)
        with compute_context(self.config.model.dtype):
            logits = sequence_logits(self.model, packed.input_ids, packed.attention_mask)
        logits_completion = completion_logits(logits, packed.completion_start, packed.completion_ids.shape[1])
        logprobs_new = processed_logprobs(
            logits_completion, packed.completion_ids, sampling.temperature, sampling.top_k, sampling.top_p
        )
        mask = packed.completion_mask & torch.isfinite(logprobs_new)
        logprobs_new = torch.where(mask, logprobs_new, torch.zeros_like(logprobs_new))
        sums.add("probe_tokens", packed.completion_mask.sum())
        sums.add("probe_outside_support", (packed.completion_mask & ~mask).sum())
        self._accumulate_versions(sums, packed, logprobs_new, mask, prefix="probe_")

    def _finalise(self, sums: MetricSums) -> dict[str, float | None]:
        return {
            "train/loss": sums.ratio("loss", "units"),
            "rl/clip_rate": sums.ratio("clipped", "clip_units"),
            "rl/kl_new_old": sums.ratio("k3", "valid_tokens"),
            "rl/entropy": sums.ratio("entropy", "tokens"),
            "parity/kl": sums.ratio("parity_k3", "parity_all_tokens"),
            "parity/abs_diff_mean": sums.ratio("parity_abs", "parity_all_tokens"),
            "parity/abs_diff_max": sums.maxes.get("parity_abs_max", 0.0) if sums.sums.get("parity_all_tokens") else None,
            "parity/probe_tokens": sums.sums.get("probe_parity_tokens", 0.0),
            "parity/coverage": sums.ratio("parity_tokens", "tokens"),
            "parity/outside_support_frac": sums.ratio("outside_support", "tokens"),
            "pipeline/kv_staleness_kl": sums.ratio("stale_k3", "stale_tokens"),
            "pipeline/lag_mean": sums.ratio("lag", "tokens"),
            "pipeline/lag_max": sums.maxes.get("lag_max", 0.0),
            "pipeline/mixed_version_frac": sums.ratio("mixed", "sequences"),
            "train/tokens": sums.sums.get("tokens", 0.0),
        }
