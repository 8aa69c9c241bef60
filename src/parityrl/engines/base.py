"""The `RolloutEngine` protocol every rollout backend implements.

An engine turns a prompt into a group of samples. Each sample carries, per generated token, the
logprob the engine reported when it sampled it (`logprobs_old`) and the policy version whose weights
produced it (`version_per_token`). Weight updates arrive while requests are in flight: the engine
applies them between decode steps and tags later tokens with the new version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor

from parityrl.batch import Sample
from parityrl.config import SamplingConfig

__all__ = ["EngineHealth", "RolloutEngine", "Sample"]


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

    async def update_weights(self, state_dict: Mapping[str, Tensor], version: int) -> None:
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
