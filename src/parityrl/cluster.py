"""`pipeline.backend: ray`: start or join a Ray cluster and place the engine replicas and trainer ranks.

With `ray.address: null` parityrl starts a Ray instance on this machine sized from the config (enough
logical CPUs for every actor; on 2 cores the actors share them). With an address it joins an existing
cluster: `ray start --head` on one node, `ray start --address=HEAD:6379` on the others, then
`parityrl train ... --set ray.address=HEAD:6379`. `ray.engine_resources` / `ray.trainer_resources`
pin the actors to nodes that advertise those custom resources (`ray start --resources='{"engines": 8}'`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from parityrl.config import RunConfig
from parityrl.engines.ray_replicas import RayEngine, ReplicaSet
from parityrl.engines.supervisor import SupervisedEngine
from parityrl.hardware import rank_threads
from parityrl.train.distributed import DistributedTrainer


def logical_cpus_needed(config: RunConfig) -> int:
    return config.engine.replicas * config.engine.omp_threads + config.train.world_size * rank_threads(config.train)


def start_ray(config: RunConfig) -> dict[str, Any]:
    """ray.init (idempotent); returns what was joined or started, for the run's settings file."""
    import ray

    if not ray.is_initialized():
        # the actors import parityrl from this environment; keep vLLM's and torch's env settings
        env = {key: value for key, value in os.environ.items() if key.startswith(("VLLM_", "PARITYRL_", "OMP_"))}
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "runtime_env": {"env_vars": env}}
        if config.ray.address is None:
            kwargs["num_cpus"] = config.ray.num_cpus or max(logical_cpus_needed(config), os.cpu_count() or 1)
            kwargs["num_gpus"] = 0 if _no_gpu() else None
        ray.init(address=config.ray.address, **{k: v for k, v in kwargs.items() if v is not None})
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"ray_version": ray.__version__, "nodes": len(nodes), "resources": ray.cluster_resources()}


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def engine_replicas(config: RunConfig, model_dir: Path, log) -> ReplicaSet:
    """`engine.replicas` supervised Ray engine actors (one vLLM engine each)."""
    from parityrl.hardware import cpu_thread_binding, on_cpu

    options: dict[str, Any] = {"num_cpus": config.engine.omp_threads, "max_concurrency": 1000}
    if not on_cpu():
        options["num_gpus"] = 1  # one GPU per replica (tensor parallelism across GPUs is not wired up)
    if config.ray.engine_resources:
        options["resources"] = dict(config.ray.engine_resources)

    def factory(replica: int):
        binding = cpu_thread_binding(config.engine.omp_threads, replica) if on_cpu() and config.ray.address is None else None
        return lambda: RayEngine(options, config, model_dir, replica, binding)

    return ReplicaSet(
        [SupervisedEngine(factory(i), config.engine, log=lambda line, i=i: log(f"replica {i}: {line}")) for i in range(config.engine.replicas)]
    )


def trainer_ranks(config: RunConfig, model_dir: Path, pad_id: int) -> DistributedTrainer:
    from parityrl.train.distributed import actor_resources

    options = actor_resources(config)
    if config.ray.trainer_resources:
        options["resources"] = dict(config.ray.trainer_resources)
    return DistributedTrainer(config, model_dir, pad_id, options)


def node_of_each_actor(replicas: ReplicaSet, trainer: DistributedTrainer) -> dict[str, list[str]]:
    """Ray node id of every engine replica and trainer rank (which node ran what)."""
    import ray

    return {
        "engines": [r.settings().get("node_id", "?") for r in replicas.replicas],
        "trainer_ranks": ray.get([rank.node_id.remote() for rank in trainer.ranks]),
    }
