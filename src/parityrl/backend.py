"""Where a run's engine and trainer live: one process (`LocalBackend`) or Ray actors (`RayBackend`).

The loop (`pipeline`) talks to one of these and never asks which. What differs:
- construction: a supervised vLLM engine and an in-process `Trainer`, or engine replicas and DDP ranks;
- the parity probe: the local trainer waits for it after its backward passes (the engine generates
  it meanwhile); Ray ranks take samples, so the loop awaits it before the step;
- the cores (local, CPU): the engine keeps its core, the trainer the rest, and with `train.threads:
  auto` the trainer borrows the engine's core while the engine idles (`hardware.CoreSplit`);
- what gets reported per replica, and shutting Ray down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from parityrl.batch import Sample
from parityrl.config import RunConfig
from parityrl.engines import make_engine
from parityrl.engines.supervisor import SupervisedEngine
from parityrl.hardware import CoreSplit
from parityrl.train.trainer import Trainer


class LocalBackend:
    """One vLLM engine (supervised: restarted when it dies or hangs) and the trainer in this process."""

    def __init__(self, config: RunConfig, model_dir: Path, start_from: Path, pad_id: int, log: Callable[[str], None]):
        self.config = config
        self.trainer = Trainer(config, start_from, pad_id)
        self.engine = SupervisedEngine(lambda: make_engine(config, model_dir), config.engine, log=log)
        self.cores: CoreSplit | contextlib.nullcontext = contextlib.nullcontext()

    def split_cores(self, settings: dict, engine_generating: Callable[[], bool]) -> CoreSplit:
        """The core split for the RL loop (a context manager), once the engine runs: its binding and pids."""
        binding = settings.get("env", {}).get("VLLM_CPU_OMP_THREADS_BIND")
        engine_pids = list(getattr(getattr(self.engine, "engine", None), "process_ids", []))
        self.cores = CoreSplit(binding, engine_pids, torch.get_num_threads(), adaptive=self.config.train.threads == "auto")
        if self.cores.adaptive:
            self.trainer.follow_thread_count(lambda: self.cores.threads_now(engine_generating=engine_generating()))
        return self.cores

    def after_step(self, engine_idle_frac: float, step_s: float) -> None:
        """Let the core split react to how much the engine idled during the last step."""
        if isinstance(self.cores, CoreSplit):
            self.cores.update(engine_idle_frac, step_s)

    async def probe_for_step(self, probe: asyncio.Task | None, deadline_s: float):
        """The parity probe as the trainer's step takes it: a function its thread calls after the
        backward passes, blocking until the samples are there (with a deadline)."""
        if probe is None:
            return None
        loop = asyncio.get_running_loop()
        return lambda: asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(probe), deadline_s), loop).result()

    def step_metrics(self, seconds: float) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.trainer.follow_thread_count(None)
        self.trainer.close()


class RayBackend:
    """`engine.replicas` supervised engine actors and `train.world_size` DDP or FSDP2 ranks on Ray (`cluster`)."""

    def __init__(self, config: RunConfig, model_dir: Path, start_from: Path, pad_id: int, log: Callable[[str], None]):
        from parityrl import cluster

        self.ray_info = cluster.start_ray(config)
        self.trainer = cluster.trainer_ranks(config, start_from, pad_id)
        self.engine = cluster.engine_replicas(config, model_dir, log)
        self.cores = contextlib.nullcontext()
        self._tokens_before = list(self.engine.tokens_per_replica)

    def split_cores(self, settings: dict, engine_generating: Callable[[], bool]) -> contextlib.nullcontext:
        return self.cores  # Ray places the actors on the CPUs they ask for

    def after_step(self, engine_idle_frac: float, step_s: float) -> None:
        pass

    async def probe_for_step(self, probe: asyncio.Task | None, deadline_s: float) -> list[Sample] | None:
        """The parity probe's samples, awaited before the step (the ranks run it remotely), within the deadline."""
        return await asyncio.wait_for(asyncio.shield(probe), deadline_s) if probe is not None else None

    def step_metrics(self, seconds: float) -> dict[str, Any]:
        """Tokens each replica generated since the last step, as a rate."""
        now = list(self.engine.tokens_per_replica)
        rates = [(tokens - before) / max(seconds, 1e-9) for tokens, before in zip(now, self._tokens_before)]
        self._tokens_before = now
        return {"perf/rollout_tok_s_per_replica": rates}

    def summary(self) -> dict[str, Any]:
        from parityrl import cluster

        return {
            "samples_per_replica": dict(enumerate(self.engine.samples_per_replica)),
            "last_version_per_replica": self.engine.last_version_per_replica(),
            "actor_nodes": cluster.node_of_each_actor(self.engine, self.trainer),
        }

    def close(self) -> None:
        import ray

        self.trainer.close()
        ray.shutdown()  # stops the Ray instance this run started; only disconnects from a cluster it joined


Backend = LocalBackend | RayBackend


def make_backend(config: RunConfig, model_dir: Path, start_from: Path, pad_id: int, log: Callable[[str], None]) -> Backend:
    kind = RayBackend if config.pipeline.backend == "ray" else LocalBackend
    return kind(config, model_dir, start_from, pad_id, log)
