"""The trainer: recompute logprobs of sampled tokens, take one optimiser step, measure the mismatch.

The recompute is `scoring.score`, the function `parityrl check` uses too. The same forward pass that
feeds the objective also gives the parity metrics: sequences generated entirely by the trainer's
current version compare engine and trainer at identical weights (`parity/*`), and in sequences that
span a weight update, tokens produced after it compare the engine's kept-KV computation with a full
recompute (`pipeline/kv_staleness_kl`). Tokens outside the trainer's sampling support are masked out
of the loss and counted (`scoring` module doc).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import Tensor

from parityrl.config import RunConfig
from parityrl.policy import export_state_dict, load_policy, processed_entropy
from parityrl.scoring import Mismatch, PackedBatch, Sample, Scored, k3, pack_samples, score
from parityrl.train.objectives import policy_loss


class StepStats:
    """Running sums for one optimiser step's metrics across micro-batches (and the parity probe)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.lag_max = 0
        self.parity = Mismatch()
        """Tokens of sequences entirely at the trainer's version: training batch and probe."""
        self.stale = Mismatch()
        """Tokens produced after an inflight update, on KV built by older weights."""

    def add(self, name: str, value: float | Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

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

    def _score(self, packed: PackedBatch) -> Scored:
        return score(self.model, packed, self.config.trainer_sampling(), self.config.model.dtype)

    def step(self, samples: list[Sample], advantages: Tensor, probe: list[Sample] | None = None) -> dict[str, float | None]:
        """One optimiser step on `samples` (advantages [len(samples)]); returns metrics; version += 1.

        `probe`: samples generated entirely at the current version, only scored for `parity/*`.
        A NaN/inf engine logprob, loss or gradient skips the step: no optimiser step, same version."""
        start = time.perf_counter()
        train = self.config.train
        stats = StepStats()
        if probe:
            self._accumulate_probe(stats, probe)
        chunks = [list(range(i, min(i + train.micro_batch_size, len(samples)))) for i in range(0, len(samples), train.micro_batch_size)]
        packed_all = [pack_samples([samples[i] for i in chunk], self.pad_id) for chunk in chunks]
        bad_old = sum(int((~torch.isfinite(p.logprobs_old) & p.completion_mask).sum()) for p in packed_all)
        if bad_old:
            return self._skip(f"{bad_old} engine logprobs are NaN/inf", start)
        # normalisers are global across micro-batches: count units first
        total_sequences = sum(int(p.completion_mask.any(-1).sum()) for p in packed_all)
        total_tokens = sum(int(p.completion_mask.sum()) for p in packed_all)
        normaliser = max(total_sequences if train.objective == "gspo" else total_tokens, 1)
        self.optimizer.zero_grad(set_to_none=True)
        for chunk, packed in zip(chunks, packed_all):
            scored = self._score(packed)
            out = policy_loss(scored.logprobs_safe, packed.logprobs_old, advantages[chunk], scored.in_support, train)
            (out.loss_sum / normaliser).backward()
            with torch.no_grad():
                self._accumulate(stats, packed, scored, out)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip if train.grad_clip > 0 else float("inf"))
        loss_sum = stats.sums.get("loss", 0.0)
        if not (math.isfinite(loss_sum) and math.isfinite(float(grad_norm))):
            # an optimiser step on a NaN/inf gradient would poison every weight: leave them untouched
            return self._skip(f"non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient norm'}", start)
        self.optimizer.step()
        self.version += 1
        elapsed = time.perf_counter() - start
        return self._finalise(stats) | {
            "train/grad_norm": float(grad_norm),
            "train/step_s": elapsed,
            "perf/train_tok_s": total_tokens / elapsed,
            "train/skipped_steps": 0,
        }

    def _skip(self, reason: str, start: float) -> dict[str, float | None]:
        """No optimiser step (weights and version unchanged); the caller counts and reports it."""
        self.optimizer.zero_grad(set_to_none=True)
        return {"train/skipped_steps": 1, "train/skip_reason": reason, "train/step_s": time.perf_counter() - start}

    def _accumulate(self, stats: StepStats, packed: PackedBatch, scored: Scored, out) -> None:
        sampling = self.config.trainer_sampling()
        generated, valid = packed.completion_mask, scored.in_support
        logprobs_new = scored.logprobs.detach()
        entropy = processed_entropy(scored.logits.detach(), sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
        stats.add("loss", out.loss_sum.detach())
        stats.add("units", out.units)
        stats.add("clipped", out.clipped)
        stats.add("clip_units", out.clip_units)
        stats.add("tokens", generated.sum())
        stats.add("valid_tokens", valid.sum())
        stats.add("outside_support", (generated & ~valid).sum())
        stats.add("k3", k3(scored.logprobs_safe.detach() - packed.logprobs_old)[valid].sum())
        stats.add("entropy", entropy[generated].sum())
        lag = (self.version - packed.version_per_token).clamp(min=0)
        stats.add("lag", lag[generated].sum())
        stats.lag_max = max(stats.lag_max, int(lag[generated].max()) if generated.any() else 0)
        self._accumulate_versions(stats, packed, logprobs_new, prefix="")

    def _accumulate_versions(self, stats: StepStats, packed: PackedBatch, logprobs_new: Tensor, prefix: str) -> None:
        """Parity (sequences entirely at the trainer's version) and KV-staleness statistics."""
        oldest, newest, has_tokens = packed.sequence_versions()
        mixed = (newest != oldest) & has_tokens
        current = (oldest == self.version) & (newest == self.version) & has_tokens
        generated = packed.completion_mask
        parity = Mismatch.of(logprobs_new, packed.logprobs_old, generated & current.unsqueeze(-1))
        stats.parity = stats.parity + parity
        stats.add(f"{prefix}sequences", has_tokens.sum())
        stats.add(f"{prefix}mixed", mixed.sum())
        stats.add(f"{prefix}parity_tokens", parity.tokens)
        # KV staleness: tokens of mixed sequences produced by the current version on an older KV cache
        stale_select = generated & mixed.unsqueeze(-1) & (packed.version_per_token == self.version)
        stats.stale = stats.stale + Mismatch.of(logprobs_new, packed.logprobs_old, stale_select)

    @torch.no_grad()
    def _accumulate_probe(self, stats: StepStats, probe: list[Sample]) -> None:
        """Parity probe: samples the engine generated right after the last update, scored before the
        next optimiser step, so engine and trainer hold identical weights (lag 0 even in async mode)."""
        packed = pack_samples(probe, self.pad_id)
        scored = self._score(packed)
        stats.add("probe_tokens", packed.completion_mask.sum())
        self._accumulate_versions(stats, packed, scored.logprobs, prefix="probe_")

    def _finalise(self, stats: StepStats) -> dict[str, float | None]:
        parity = stats.parity.summary("parity")
        return {
            "train/loss": stats.ratio("loss", "units"),
            "rl/clip_rate": stats.ratio("clipped", "clip_units"),
            "rl/kl_new_old": stats.ratio("k3", "valid_tokens"),
            "rl/entropy": stats.ratio("entropy", "tokens"),
            "parity/kl": parity["parity/kl"],
            "parity/abs_diff_mean": parity["parity/abs_diff_mean"],
            "parity/abs_diff_max": parity["parity/abs_diff_max"],
            "parity/probe_tokens": stats.sums.get("probe_parity_tokens", 0.0),
            "parity/coverage": stats.ratio("parity_tokens", "tokens"),
            "parity/outside_support_frac": stats.ratio("outside_support", "tokens"),
            "pipeline/kv_staleness_kl": stats.stale.summary("stale")["stale/kl"],
            "pipeline/lag_mean": stats.ratio("lag", "tokens"),
            "pipeline/lag_max": float(stats.lag_max),
            "pipeline/mixed_version_frac": stats.ratio("mixed", "sequences"),
            "train/tokens": stats.sums.get("tokens", 0.0),
        }
