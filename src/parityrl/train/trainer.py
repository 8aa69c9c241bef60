"""The trainer: recompute logprobs of sampled tokens, take one optimiser step, measure the mismatch.

The recompute is `scoring.score`, the function `parityrl check` uses too. The same forward pass that
feeds the objective also gives the parity metrics: sequences generated entirely by the trainer's
current version compare engine and trainer at identical weights (`parity/*`), and in sequences that
span a weight update, tokens produced after it compare the engine's kept-KV computation with a full
recompute (`pipeline/kv_staleness_kl`). Tokens outside the trainer's sampling support are masked out
of the loss and counted (`scoring` module doc).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from parityrl.batch import ModelShape, PackedBatch, Sample, pack_samples
from parityrl.config import RunConfig
from parityrl.hardware import resolve_device, use_torch_threads
from parityrl.memory import process_rss_gb, release_free_memory, uses_activation_checkpointing
from parityrl.policy import decoder_layers, export_chunks, full_tensor, load_policy, torch_dtype
from parityrl.scoring import Mismatch, PolicyScorer, Scored, k3, score
from parityrl.train.checkpoint import RunState, load_run_state, save_checkpoint
from parityrl.train.objectives import policy_loss

Probe = list[Sample] | Callable[[], list[Sample] | None] | None
"""Parity-probe samples for `Trainer.step`, or a function that waits for them."""


def global_normaliser(samples: list[Sample], objective: str) -> int:
    """What the summed loss is divided by: the batch's sequences (GSPO) or tokens, over all ranks."""
    if objective == "gspo":
        return max(sum(1 for s in samples if s.sampled_tokens), 1)
    return max(sum(s.sampled_tokens for s in samples), 1)


def micro_batches(samples: list[Sample], max_sequences: int, max_tokens: int) -> list[list[int]]:
    """Consecutive runs of sample indices with at most `max_sequences` samples and `max_tokens` prompt +
    completion tokens each (a longer sample alone). Counting each sample's prompt overestimates a
    packed row, which holds a shared prompt once: the budget is an upper bound on what is computed."""
    batches: list[list[int]] = []
    tokens = 0
    for index, sample in enumerate(samples):
        length = len(sample.prompt_token_ids) + len(sample.completion_token_ids)
        if batches and len(batches[-1]) < max_sequences and tokens + length <= max_tokens:
            batches[-1].append(index)
            tokens += length
        else:
            batches.append([index])
            tokens = length
    return batches


class StepStats:
    """Running sums for one optimiser step's metrics across micro-batches, the parity probe and ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.lag_max = 0
        self.probe_wait_s = 0.0
        """Seconds the step waited for the parity probe's samples after its backward passes."""
        self.parity = Mismatch()
        """Tokens of sequences entirely at the trainer's version: training batch and probe."""
        self.parity_by_replica: dict[int, Mismatch] = {}
        """The same, per engine replica (`pipeline.backend: ray`)."""
        self.parity_by_turn: dict[int, Mismatch] = {}
        """The same, per episode turn (`task.kind: environment`; single-turn samples are all turn 0)."""
        self.stale = Mismatch()
        """Tokens produced after an inflight update, on KV built by older weights."""

    def __add__(self, other: StepStats) -> StepStats:
        merged = StepStats()
        for name in self.sums.keys() | other.sums.keys():
            merged.sums[name] = self.sums.get(name, 0.0) + other.sums.get(name, 0.0)
        merged.lag_max = max(self.lag_max, other.lag_max)
        merged.probe_wait_s = max(self.probe_wait_s, other.probe_wait_s)
        merged.parity, merged.stale = self.parity + other.parity, self.stale + other.stale
        for replica in self.parity_by_replica.keys() | other.parity_by_replica.keys():
            merged.parity_by_replica[replica] = self.parity_by_replica.get(replica, Mismatch()) + other.parity_by_replica.get(replica, Mismatch())
        for turn in self.parity_by_turn.keys() | other.parity_by_turn.keys():
            merged.parity_by_turn[turn] = self.parity_by_turn.get(turn, Mismatch()) + other.parity_by_turn.get(turn, Mismatch())
        return merged

    def add(self, name: str, value: float | Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def ratio(self, numerator: str, denominator: str) -> float | None:
        den = self.sums.get(denominator, 0.0)
        return self.sums.get(numerator, 0.0) / den if den > 0 else None


@dataclass
class StepResult:
    """One rank's part of an optimiser step (a local run has one rank)."""

    stats: StepStats | None
    grad_norm: float
    tokens: int
    elapsed: float
    skip_reason: str | None = None
    """Why the step was skipped (weights and version unchanged); None when it was taken."""

    def skip_metrics(self) -> dict[str, float | str | None]:
        return {"train/skipped_steps": 1, "train/skip_reason": self.skip_reason, "train/step_s": self.elapsed}


def _any_rank(flag: bool, distributed: bool) -> bool:
    """True if `flag` is true on any rank: every rank must take the same skip decision."""
    if not distributed:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def follow_thread_count(model: torch.nn.Module, threads_now: Callable[[], int]) -> list:
    """Hooks that set `threads_now()` torch threads before each decoder layer's forward and as each
    layer's gradient is computed, in the thread that runs the step; returns their handles. The loop
    uses it to take the engine's core only while the engine is not generating: a thread that shares a
    core with a busy engine holds every parallel region back (in the generation-heavy regime a 2-thread
    step took 58 s while the engine generated the next batch, 31 s while it idled). torch's count is per
    thread, so only the step's own thread can change it."""

    def follow(*_: object) -> None:
        use_torch_threads(threads_now())

    handles = []
    for layer in decoder_layers(model):
        handles.append(layer.register_forward_pre_hook(follow))
        first = next(layer.parameters(), None)
        if first is not None:  # fires in the backward pass, in the thread that runs it (CPU autograd)
            handles.append(first.register_hook(follow))
    return handles


class Trainer:
    def __init__(self, config: RunConfig, model_dir: Path, pad_id: int, distributed: bool = False):
        """distributed: this is one rank of an initialised torch.distributed group (`train.world_size`);
        the model is wrapped in DDP, or sharded with FSDP2 (`train.fsdp`), and skip decisions are agreed
        over all ranks."""
        self.config = config
        self.model_dir = Path(model_dir)
        self.pad_id = pad_id
        self.distributed = distributed
        self.world_size = torch.distributed.get_world_size() if distributed else 1
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.fsdp = distributed and config.train.fsdp
        self.device = resolve_device(config.train.device)
        from parityrl.policy import load_tokenizer
        self.tokenizer = load_tokenizer(self.model_dir)
        torch.manual_seed(config.seed)
        # fp32 master weights; bf16 models compute in bf16 via policy.compute_context
        self.model = load_policy(model_dir, "float32", config.model.lm_head_fp32).to(self.device)
        self.model.train()
        if uses_activation_checkpointing(config, self.model.config.to_dict()):
            # non-reentrant: works under DDP and with inputs that need no gradient (token ids)
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.shape = ModelShape.of(self.model)
        # the module whose forward the loss goes through: body + chunked head (`scoring.PolicyScorer`)
        self.train_model: torch.nn.Module = PolicyScorer(self.model)
        if self.fsdp:
            from parityrl.train.fsdp import shard

            self.train_model = shard(self.train_model)  # before the optimizer: it steps the shards
        elif distributed:
            from torch.nn.parallel import DistributedDataParallel

            # no buffers to sync (rotary tables are recomputed); probe and eval use the bare module
            self.train_model = DistributedDataParallel(self.train_model, broadcast_buffers=False)
        # fused: one kernel over all parameters, 7.5 -> 2.8 ms per step on the demo model on one CPU core
        # (the per-tensor loop was ~3% of its step); FSDP2's sharded parameters keep the default
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay, fused=not self.fsdp
        )
        self.version = 0
        self._thread_hooks: list = []

    def follow_thread_count(self, threads_now: Callable[[], int] | None) -> None:
        """Let the torch thread count change inside a step (`follow_thread_count` below); None stops it."""
        for hook in self._thread_hooks:
            hook.remove()
        self._thread_hooks = follow_thread_count(self.model, threads_now) if threads_now is not None else []

    def state_dict_for_engines(self) -> dict[str, Tensor]:
        """The weights as the engines hold them: the model dtype, the head fp32 under fix 4, in one dict."""
        return {name: tensor for chunk in self.chunks_for_engines() for name, tensor in chunk.items()}

    def chunks_for_engines(self) -> Iterator[dict[str, Tensor]]:
        """`state_dict_for_engines` one decoder layer at a time (`policy.export_chunks`). Sharded, every
        rank takes part in each gather and rank 0 alone keeps the chunks (the others yield none)."""
        head = frozenset({"lm_head.weight"}) if self.config.engine.lm_head_fp32 else frozenset()
        return export_chunks(self.model, torch_dtype(self.config.model.dtype), keep_fp32=head, keep=self.rank == 0)

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Across ranks, gradients are reduced once per step, on its last micro-batch: DDP all-reduces
        unless under `no_sync`, FSDP2 reduce-scatters when `set_requires_gradient_sync` says so."""
        if self.fsdp:
            self.train_model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return self.train_model.no_sync() if self.distributed and not last else contextlib.nullcontext()

    def _pack(self, samples: list[Sample]) -> PackedBatch:
        """`samples` in shared-prompt rows, on the trainer's device (moved once per micro-batch)."""
        return pack_samples(samples, self.pad_id, self.shape).to(self.device)

    def _score(self, packed: PackedBatch, model: torch.nn.Module | None = None) -> Scored:
        return score(model or self.model, packed, self.config.trainer_sampling(), self.config.model.dtype)

    def step(self, samples: list[Sample], advantages: Tensor, probe: Probe = None) -> dict[str, float | None]:
        """One optimiser step on `samples` (advantages [len(samples)]); returns metrics; version += 1.

        `probe`: samples generated entirely at the current version, only scored for `parity/*`; or a
        function returning them, called after the backward passes (the engine generates them while
        this step computes). A NaN/inf engine logprob, loss or gradient skips the step: no optimiser
        step, same version."""
        result = self.step_stats(samples, advantages, probe, global_normaliser(samples, self.config.train.objective))
        if result.skip_reason is not None:
            return result.skip_metrics()
        rss_now, rss_peak = process_rss_gb()
        return finalise(result.stats) | {
            "train/grad_norm": result.grad_norm,
            "train/step_s": result.elapsed,
            "perf/train_tok_s": result.tokens / max(result.elapsed, 1e-9),
            "perf/trainer_rss_gb": rss_now,
            "perf/trainer_peak_rss_gb": rss_peak,
            "train/skipped_steps": 0,
        }

    def step_stats(self, samples: list[Sample], advantages: Tensor, probe: Probe, normaliser: int) -> StepResult:
        """This rank's share of a step: `normaliser` is the whole batch's (all ranks) unit count."""
        start = time.perf_counter()
        train = self.config.train
        stats = StepStats()
        chunks = micro_batches(samples, train.micro_batch_size, train.micro_batch_tokens)
        if self.fsdp:
            from parityrl.train.fsdp import equal_micro_batch_count

            chunks = equal_micro_batch_count(chunks)
        packed_all = [self._pack([samples[i] for i in chunk]) for chunk in chunks]
        bad_old = sum(int((~torch.isfinite(p.logprobs_old) & p.completion_mask).sum()) for p in packed_all)
        if _any_rank(bad_old > 0, self.distributed):
            return self._skip(f"{bad_old} engine logprobs are NaN/inf" if bad_old else "NaN/inf engine logprobs on another rank", start)
        total_tokens = sum(int(p.completion_mask.sum()) for p in packed_all)
        advantages = advantages.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for index, (chunk, packed) in enumerate(zip(chunks, packed_all)):
            last = index == len(chunks) - 1
            with self._gradient_sync(last):
                began = time.perf_counter()
                scored = self._score(packed, self.train_model)
                out = policy_loss(scored.logprobs_safe, packed.logprobs_old, advantages[chunk], scored.in_support, train)
                forward_done = time.perf_counter()
                # DDP and FSDP average gradients over ranks; scaling by the world size makes that average
                # the gradient of the whole batch's loss (sum over all ranks / the global normaliser)
                (out.loss_sum * self.world_size / normaliser).backward()
                stats.add("forward_s", forward_done - began)
                stats.add("backward_s", time.perf_counter() - forward_done)
                stats.add("micro_batches", 1)
            with torch.no_grad():
                self._accumulate(stats, packed, scored, out)
            del scored, out
            if not last:  # this micro-batch's activations are free: give their pages back (parityrl.memory);
                release_free_memory()  # after the last one, the trim after the optimiser step does it
        # the weights are still the published version until optimizer.step: the probe's lag is 0
        waiting = time.perf_counter()
        probe_samples = probe() if callable(probe) else probe
        stats.probe_wait_s = time.perf_counter() - waiting
        if probe_samples:
            self._accumulate_probe(stats, probe_samples)
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip if train.grad_clip > 0 else float("inf"))))
        loss_sum = stats.sums.get("loss", 0.0)
        if _any_rank(not (math.isfinite(loss_sum) and math.isfinite(grad_norm)), self.distributed):
            # an optimiser step on a NaN/inf gradient would poison every weight: leave them untouched
            return self._skip(f"non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient norm'}", start)
        self.optimizer.step()
        self.version += 1
        release_free_memory()
        return StepResult(stats, grad_norm, total_tokens, time.perf_counter() - start)

    def _skip(self, reason: str, start: float) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(None, float("nan"), 0, time.perf_counter() - start, skip_reason=reason)

    # -- what the pipeline asks of a trainer besides steps (the Ray ranks answer the same) ------------

    def save_checkpoint(self, run_dir: Path, state: RunState) -> Path:
        return save_checkpoint(run_dir, self.model, self.optimizer, self.tokenizer, state, optimizer_module=self.train_model)

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Optimizer state of a checkpoint (the weights were loaded from it at construction)."""
        load_run_state(checkpoint, self.optimizer, optimizer_module=self.train_model)

    def close(self) -> None:
        """Nothing to release in-process (the Ray ranks shut their process group down)."""

    def _accumulate(self, stats: StepStats, packed: PackedBatch, scored: Scored, out) -> None:
        generated, valid = packed.completion_mask, scored.in_support
        logprobs_new = scored.logprobs.detach()
        entropy = scored.entropy
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
        for replica in packed.replica.unique().tolist():
            if replica >= 0:
                rows = (packed.replica == replica).unsqueeze(-1)
                mismatch = Mismatch.of(logprobs_new, packed.logprobs_old, generated & current.unsqueeze(-1) & rows)
                stats.parity_by_replica[replica] = stats.parity_by_replica.get(replica, Mismatch()) + mismatch
        parity_select = generated & current.unsqueeze(-1)
        for turn in packed.turn_index[parity_select].unique().tolist():
            mismatch = Mismatch.of(logprobs_new, packed.logprobs_old, parity_select & (packed.turn_index == turn))
            stats.parity_by_turn[turn] = stats.parity_by_turn.get(turn, Mismatch()) + mismatch
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
        packed = self._pack(probe)
        # sharded: only the root's forward gathers the weights, and every rank scores the probe with it;
        # otherwise the bare module (DDP's forward outside a step would confuse its gradient reducer)
        scored = self._score(packed, self.train_model if self.fsdp else None)
        if self.rank > 0:
            return  # rank 0 counts the probe (each rank's sums are added up)
        stats.add("probe_tokens", packed.completion_mask.sum())
        self._accumulate_versions(stats, packed, scored.logprobs, prefix="probe_")



def finalise(stats: StepStats) -> dict[str, float | list | None]:
    """The step's metrics from its sums (one rank's, or all ranks' added up)."""
    parity = stats.parity.summary("parity")
    by_replica = {replica: m.summary("p")["p/kl"] for replica, m in sorted(stats.parity_by_replica.items())}
    by_turn = {turn: m.summary("p")["p/kl"] for turn, m in sorted(stats.parity_by_turn.items())}
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
        "perf/probe_wait_s": stats.probe_wait_s,
        "perf/forward_s": stats.sums.get("forward_s", 0.0),
        "perf/backward_s": stats.sums.get("backward_s", 0.0),
        "train/micro_batches": stats.sums.get("micro_batches", 0.0),
        "pipeline/mixed_version_frac": stats.ratio("mixed", "sequences"),
        "train/tokens": stats.sums.get("tokens", 0.0),
        "parity/kl_per_replica": [by_replica.get(i) for i in range(max(by_replica) + 1)] if by_replica else None,
        # only for episodes: a single-turn run's one entry would repeat parity/kl
        "parity/kl_per_turn": [by_turn.get(i) for i in range(max(by_turn) + 1)] if len(by_turn) > 1 else None,
    }
