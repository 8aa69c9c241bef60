"""Several rollout engines on Ray: one actor per replica, prompt groups balanced across them.

- `EngineActor` (a Ray actor) owns one engine (`make_engine`: vLLM's AsyncLLM, or the reference
  engine) in its own event loop, on whichever node Ray places it.
- `RayEngine` is the driver's handle to one actor; it implements `RolloutEngine`, so each replica is
  wrapped in a `SupervisedEngine` exactly as the local engine is: deadlines, death detection, restart
  with the current weights, groups generated again. A dead actor is replaced by a new one (not by Ray's
  `max_restarts`, which would re-run the constructor and serve version-0 weights under a newer version).
- `ReplicaSet` is the `RolloutEngine` the pipeline sees: each group goes to the replica with the fewest
  outstanding groups, samples carry their replica id, and a weight update is put into the object store
  once and loaded by every replica; the version counts as published when all of them have it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from parityrl.batch import Sample
from parityrl.config import RunConfig, SamplingConfig
from parityrl.engines.base import EngineHealth, Weights
from parityrl.engines.supervisor import SupervisedEngine

HEALTH_POLL_S = 1.0


class EngineActor:
    """One replica's engine, inside a Ray actor process (created with `ray.remote(EngineActor)`)."""

    def __init__(self, config: RunConfig, model_dir: str, replica: int, cpu_binding: str | None):
        from parityrl.engines import make_engine

        if cpu_binding is not None:  # each replica's vLLM worker on its own core(s)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding
        self.replica = replica
        self.engine = make_engine(config, Path(model_dir))

    async def start(self) -> None:
        await self.engine.start()

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig, request_id: str) -> list[Sample]:
        samples = await self.engine.generate(prompt_token_ids, sampling, request_id)
        for sample in samples:
            sample.replica = self.replica
        return samples

    async def greedy(self, prompts: list[list[int]], max_new_tokens: int, request_id: str) -> list[list[int]]:
        return await self.engine.greedy(prompts, max_new_tokens, request_id)

    async def update_weights(self, state_dict: Weights, version: int) -> None:
        await self.engine.update_weights(state_dict, version)

    def health(self) -> EngineHealth:
        return self.engine.health()

    def settings(self) -> dict:
        return self.engine.settings() | {"replica": self.replica, "node_id": _node_id()}

    async def close(self) -> None:
        await self.engine.close()


def _node_id() -> str:
    """The Ray node this process runs on (two nodes on one machine share an IP, not an id)."""
    import ray

    return ray.get_runtime_context().get_node_id()


class RayEngine:
    """Driver-side `RolloutEngine` over one `EngineActor` (health is polled in the background so the
    supervisor's watchdog can read it without a round trip)."""

    def __init__(self, actor_options: dict[str, Any], config: RunConfig, model_dir: Path, replica: int, cpu_binding: str | None):
        import ray

        self.name = f"ray-replica{replica}"
        self.replica = replica
        self.version = 0
        self.actor = ray.remote(EngineActor).options(**actor_options).remote(config, str(model_dir), replica, cpu_binding)
        self._health = EngineHealth(ok=True, version=0, inflight_requests=0)
        self._poller: asyncio.Task | None = None
        self._settings: dict = {}

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.actor, method).remote(*args)
        except Exception as error:
            if type(error).__name__ in {"RayActorError", "ActorDiedError", "ActorUnavailableError"}:
                self._health = EngineHealth(ok=False, version=self.version, inflight_requests=0, detail={"error": str(error)})
            raise

    async def start(self) -> None:
        await self._call("start")
        self._settings = await self._call("settings")
        self._poller = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            try:
                self._health = await self._call("health")
            except Exception:
                return  # _call recorded the death; the supervisor's watchdog sees ok=False

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig, request_id: str) -> list[Sample]:
        return await self._call("generate", prompt_token_ids, sampling, request_id)

    async def greedy(self, prompts: list[list[int]], max_new_tokens: int, request_id: str) -> list[list[int]]:
        return await self._call("greedy", prompts, max_new_tokens, request_id)

    async def update_weights(self, state_dict, version: int) -> None:
        await self._call("update_weights", state_dict, version)
        self.version = version

    async def pause(self) -> None:
        raise NotImplementedError("pause/resume of a Ray replica: use update_weights (keep-mode pause inside)")

    async def resume(self) -> None:
        raise NotImplementedError("pause/resume of a Ray replica: use update_weights (keep-mode pause inside)")

    def health(self) -> EngineHealth:
        return self._health

    def settings(self) -> dict:
        return dict(self._settings)

    async def close(self) -> None:
        import ray

        if self._poller is not None:
            self._poller.cancel()
        with contextlib.suppress(Exception):  # a dead or hung actor: killed below either way
            await asyncio.wait_for(self.actor.close.remote(), 60)
        ray.kill(self.actor, no_restart=True)


class ReplicaSet:
    """The pipeline's engine when `pipeline.backend: ray`: N supervised replicas behind one interface."""

    def __init__(self, replicas: list[SupervisedEngine]):
        self.name = "ray"
        self.replicas = replicas
        self.outstanding = [0] * len(replicas)
        self.samples_per_replica = [0] * len(replicas)
        self.tokens_per_replica = [0] * len(replicas)

    # what the pipeline reads off a SupervisedEngine, summed over replicas
    @property
    def restarts(self) -> int:
        return sum(r.restarts for r in self.replicas)

    @property
    def requeued_groups(self) -> int:
        return sum(r.requeued_groups for r in self.replicas)

    @property
    def failures(self) -> list[str]:
        return [f"replica {i}: {f}" for i, r in enumerate(self.replicas) for f in r.failures]

    @property
    def version(self) -> int:
        return min(r.version for r in self.replicas)

    def last_version_per_replica(self) -> dict[int, int]:
        return {i: r.version for i, r in enumerate(self.replicas)}

    def publish(self, state_dict, version: int) -> None:
        ref = _put(state_dict)
        for replica in self.replicas:
            replica.publish(ref, version)

    async def start(self) -> None:
        await asyncio.gather(*(r.start() for r in self.replicas))

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self.replicas), return_exceptions=True)

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig, request_id: str) -> list[Sample]:
        index = min(range(len(self.replicas)), key=lambda i: (self.outstanding[i], i))  # least outstanding first
        self.outstanding[index] += 1
        try:
            samples = await self.replicas[index].generate(prompt_token_ids, sampling, request_id)
        finally:
            self.outstanding[index] -= 1
        for sample in samples:  # a restarted replica's samples too
            sample.replica = index
        self.samples_per_replica[index] += len(samples)
        self.tokens_per_replica[index] += sum(s.sampled_tokens for s in samples)
        return samples

    async def greedy(self, prompts: list[list[int]], max_new_tokens: int, request_id: str) -> list[list[int]]:
        """The prompts split in contiguous shares over the replicas (all hold the same version between steps)."""
        share = -(-len(prompts) // len(self.replicas))
        parts = await asyncio.gather(
            *(r.greedy(prompts[i * share : (i + 1) * share], max_new_tokens, f"{request_id}-r{i}") for i, r in enumerate(self.replicas))
        )
        return [tokens for part in parts for tokens in part]

    async def update_weights(self, state_dict, version: int) -> None:
        """One object-store put, every replica loads it; returns once all have version `version`."""
        ref = _put(state_dict)
        await asyncio.gather(*(r.update_weights(ref, version) for r in self.replicas))

    async def pause(self) -> None:
        await asyncio.gather(*(r.pause() for r in self.replicas))

    async def resume(self) -> None:
        await asyncio.gather(*(r.resume() for r in self.replicas))

    def health(self) -> EngineHealth:
        healths = [r.health() for r in self.replicas]
        return EngineHealth(
            ok=all(h.ok for h in healths),
            version=self.version,
            inflight_requests=sum(h.inflight_requests for h in healths),
            detail={"replicas": [h.detail for h in healths]},
        )

    def settings(self) -> dict:
        per_replica = [r.settings() for r in self.replicas]
        return per_replica[0] | {"replicas": per_replica}


def _put(state_dict):
    """An object-store reference to the weights (already one when the trainer ranks produced them)."""
    import ray

    return state_dict if isinstance(state_dict, ray.ObjectRef) else ray.put(dict(state_dict))
