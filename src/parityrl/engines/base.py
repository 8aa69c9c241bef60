"""The `RolloutEngine` protocol every rollout backend implements.

An engine turns a prompt into a group of samples. Each sample carries, per generated token, the
logprob the engine reported when it sampled it (`logprobs_old`) and the policy version whose weights
produced it (`version_per_token`). Weight updates arrive while requests are in flight: the engine
applies them between decode steps and tags later tokens with the new version.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from parityrl.batch import Sample
from parityrl.config import SamplingConfig

__all__ = ["EngineHealth", "RolloutEngine", "Sample", "WeightChunks", "Weights", "weight_items", "weight_specs"]

CHUNK_FETCH_TIMEOUT_S = 600.0
"""The longest one chunk of published weights may take to arrive from Ray's object store."""


@dataclass(frozen=True)
class WeightChunks:
    """Published weights held in Ray's object store, one chunk per decoder layer (`policy.export_chunks`).

    A sharded trainer's ranks gather the weights one layer at a time and rank 0 puts each layer in the
    store before taking the next (`train.distributed.TrainerRank.weight_chunks`); an engine copies them
    into its transport buffer one chunk at a time. So no process but the store holds a whole copy:
    before, rank 0 held the whole export and each replica's actor a deserialised whole copy."""

    specs: tuple[tuple[str, str, tuple[int, ...]], ...]
    """(name, dtype name as torch spells it, shape) of every tensor, in chunk order."""
    refs: tuple[Any, ...]
    """One Ray ObjectRef per chunk (a dict of HF name -> CPU tensor)."""

    def items(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) pairs, fetching the next chunk only when the last one has been consumed."""
        import ray

        for ref in self.refs:
            chunk = ray.get(ref, timeout=CHUNK_FETCH_TIMEOUT_S)
            yield from chunk.items()
            del chunk


Weights = Mapping[str, Tensor] | WeightChunks
"""What `RolloutEngine.update_weights` takes: HF name -> tensor, or chunks in Ray's object store."""


def weight_items(weights: Weights) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) pairs of either form (chunks are fetched lazily)."""
    return weights.items() if isinstance(weights, WeightChunks) else iter(weights.items())


def weight_specs(weights: Weights) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype name, shape) of every tensor, without fetching any chunk."""
    if isinstance(weights, WeightChunks):
        return list(weights.specs)
    return [(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)) for name, tensor in weights.items()]


@dataclass
class EngineHealth:
    ok: bool
    version: int
    inflight_requests: int
    detail: dict = field(default_factory=dict)


@runtime_checkable
class RolloutEngine(Protocol):
    name: str
    version: int
    """Version of the weights the engine currently samples with."""

    async def start(self) -> None:
        """Bring the engine up (load weights at version 0)."""

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig, request_id: str) -> list[Sample]:
        """Sample `sampling.n` completions of one prompt; returns when all are finished."""

    async def greedy(self, prompts: list[list[int]], max_new_tokens: int, request_id: str) -> list[list[int]]:
        """Greedy (temperature 0) completion token ids of each prompt under the current weights, up to
        EOS (included) or `max_new_tokens`: held-out evaluation decodes here, not in the trainer."""

    async def update_weights(self, state_dict: Weights, version: int) -> None:
        """Apply new weights inflight (fix 3: block, load, resume; in-flight KV kept)."""

    async def pause(self) -> None:
        """Stop scheduling decode steps; in-flight requests keep their state."""

    async def resume(self) -> None:
        """Continue after `pause`."""

    def health(self) -> EngineHealth:
        """Cheap liveness report."""

    def settings(self) -> dict:
        """Every setting that affects numerics, as in force in the running engine (written to the run dir)."""

    async def close(self) -> None:
        """Release processes and memory."""
