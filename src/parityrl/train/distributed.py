"""Data-parallel trainer ranks as Ray actors, in one torch.distributed group (gloo on CPU, nccl on GPU).

Each rank holds a `Trainer` whose model is wrapped in DDP (whole weights, gradients and AdamW state
on every rank), or sharded by FSDP2 (`train.fsdp`, `train/fsdp.py`: each rank holds 1/world_size of
them). The driver splits every batch into equal shards, the ranks step together (the gradients are
averaged over ranks; the loss normaliser is the global token/sequence count, so the sum over ranks
equals the single-process loss), and the driver merges the ranks' metric sums into the same metrics a
local run logs. Rank 0 publishes the weights: it puts them in Ray's object store one decoder layer at a
time (`WeightChunks`; sharded, every rank takes part in each layer's gather) and every engine replica
copies them from there into its own transport, chunk by chunk. Rank 0 writes the checkpoint's weights;
every rank writes its optimizer shards.

Why plain Ray actors and not Ray Train's `TorchTrainer`: an RL step is driven from outside, between
generation, weight publication, evaluation and checkpoints, and Ray Train runs a training function to
completion on its own schedule. Actors keep the step under the pipeline's control and run the same
`Trainer` code as local mode.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import torch
from torch import Tensor

from parityrl.batch import Sample
from parityrl.config import RunConfig
from parityrl.engines.base import WeightChunks
from parityrl.hardware import rank_threads
from parityrl.memory import one_malloc_arena
from parityrl.train.checkpoint import RunState
from parityrl.train.trainer import StepResult, StepStats, Trainer, finalise, global_normaliser


class TrainerRank:
    """One data-parallel rank (created with `ray.remote(TrainerRank)`)."""

    def __init__(self, config: RunConfig, model_dir: str, pad_id: int, rank: int, world_size: int):
        one_malloc_arena()  # as the local trainer (parityrl.memory)
        torch.set_num_threads(rank_threads(config.train))
        self.config, self.model_dir, self.pad_id = config, model_dir, pad_id
        self.rank, self.world_size = rank, world_size
        self.trainer: Trainer | None = None

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port for the process group (asked of rank 0)."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            return ray.util.get_node_ip_address(), probe.getsockname()[1]

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def init(self, master_addr: str, master_port: int) -> str:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() and self.config.train.device != "cpu" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank, world_size=self.world_size)
        self.trainer = Trainer(self.config, Path(self.model_dir), self.pad_id, distributed=True)
        return backend

    def step(self, samples: list[Sample], advantages: Tensor, probe: list[Sample] | None, normaliser: int) -> StepResult:
        assert self.trainer is not None
        return self.trainer.step_stats(samples, advantages, probe, normaliser)

    def set_version(self, version: int) -> None:
        assert self.trainer is not None
        self.trainer.version = version

    def weight_chunks(self) -> WeightChunks | None:
        """Gather the weights for the engines one decoder layer at a time and put each in Ray's object
        store before the next (rank 0; the other ranks take part in the gathers and return None): so
        this rank holds at most one layer beyond its shard, where it held a whole copy."""
        import ray

        assert self.trainer is not None
        specs: list[tuple[str, str, tuple[int, ...]]] = []
        refs = []
        for chunk in self.trainer.chunks_for_engines():
            specs += [(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)) for name, tensor in chunk.items()]
            refs.append(ray.put(chunk))
            del chunk
        return WeightChunks(tuple(specs), tuple(refs)) if self.rank == 0 else None

    def load_optimizer(self, checkpoint: str) -> None:
        assert self.trainer is not None
        self.trainer.load_checkpoint(Path(checkpoint))

    def save_checkpoint(self, run_dir: str, state: RunState) -> str:
        assert self.trainer is not None
        return str(self.trainer.save_checkpoint(Path(run_dir), state))

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedTrainer:
    """The driver's view of `train.world_size` ranks, with the local `Trainer`'s interface."""

    def __init__(self, config: RunConfig, model_dir: Path, pad_id: int, actor_options: dict):
        import ray

        self.config = config
        self.world_size = config.train.world_size
        self._version = 0
        self._gathering: list = []  # the non-zero ranks' part in the last publication (`state_dict_for_engines`)
        remote_rank = ray.remote(TrainerRank).options(**actor_options)
        self.ranks = [remote_rank.remote(config, str(model_dir), pad_id, rank, self.world_size) for rank in range(self.world_size)]
        address, port = ray.get(self.ranks[0].rendezvous.remote())
        self.backend = ray.get([rank.init.remote(address, port) for rank in self.ranks])[0]

    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, version: int) -> None:
        """Set on every rank (a resume continues at the checkpoint's version)."""
        import ray

        ray.get([rank.set_version.remote(version) for rank in self.ranks])
        self._version = version

    def step(self, samples: list[Sample], advantages: Tensor, probe: list[Sample] | None = None) -> dict:
        """One optimiser step over all ranks (blocking: run it in a thread); metrics as a local step's."""
        import ray

        self._collect_gathering()
        if len(samples) % self.world_size:
            raise ValueError(f"{len(samples)} samples do not split evenly over train.world_size={self.world_size}")
        shard = len(samples) // self.world_size
        normaliser = global_normaliser(samples, self.config.train.objective)
        # sharded, scoring the probe is a collective: every rank scores it and rank 0 counts it
        probes = [probe if i == 0 or self.config.train.fsdp else None for i in range(self.world_size)]
        calls = [
            rank.step.remote(samples[i * shard : (i + 1) * shard], advantages[i * shard : (i + 1) * shard], probes[i], normaliser)
            for i, rank in enumerate(self.ranks)
        ]
        results: list[StepResult] = ray.get(calls)
        first = results[0]
        if first.skip_reason is not None:  # the ranks agree (the decision is all-reduced)
            return first.skip_metrics()
        self._version += 1  # each rank stepped its own version already
        stats = sum((r.stats for r in results[1:]), start=first.stats) if first.stats is not None else StepStats()
        return finalise(stats) | {
            "train/grad_norm": first.grad_norm,
            "train/step_s": max(r.elapsed for r in results),
            "perf/train_tok_s": sum(r.tokens for r in results) / max(max(r.elapsed for r in results), 1e-9),
            "train/skipped_steps": 0,
            "train/world_size": self.world_size,
        }

    def state_dict_for_engines(self):
        """An object-store reference to rank 0's `WeightChunks` (every replica loads the same chunks).
        Sharded (`train.fsdp`), every rank takes part in gathering them; the other ranks' calls return
        None and finish before their next step (an actor runs its calls in order), where `step` and
        `save_checkpoint` collect them, so an error there is raised, not lost."""
        calls = [rank.weight_chunks.remote() for rank in (self.ranks if self.config.train.fsdp else self.ranks[:1])]
        self._gathering = calls[1:]
        return calls[0]

    def _collect_gathering(self) -> None:
        """Raise the error of a rank that failed while taking part in the last publication's gathers."""
        import ray

        gathering, self._gathering = self._gathering, []
        ray.get(gathering)

    def save_checkpoint(self, run_dir: Path, state: RunState) -> Path:
        import ray

        self._collect_gathering()
        # every rank writes its optimizer shards (and takes part in gathering the weights); rank 0 the rest
        return Path(ray.get([rank.save_checkpoint.remote(str(run_dir), state) for rank in self.ranks])[0])

    def load_checkpoint(self, checkpoint: Path) -> None:
        import ray

        ray.get([rank.load_optimizer.remote(str(checkpoint)) for rank in self.ranks])

    def close(self) -> None:
        import ray

        for rank in self.ranks:
            with contextlib.suppress(Exception):  # a dead rank: killed below either way
                ray.get(rank.shutdown.remote(), timeout=30)
            ray.kill(rank, no_restart=True)


def actor_resources(config: RunConfig) -> dict:
    """Ray resources of one trainer rank: its threads as CPUs, one GPU on CUDA."""
    uses_gpu = config.train.device == "cuda" or (config.train.device == "auto" and torch.cuda.is_available())
    threads = rank_threads(config.train)
    return {"num_cpus": threads, "num_gpus": 1 if uses_gpu else 0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}}


