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

A rank that fails or stops answering stops the run with one paragraph naming it (`RankFailed`), never
a wait on torch's 30-minute default: the process group's timeout is `train.collective_timeout_s`, so a
rank waits that long at most in one collective for the others, and the driver waits on the ranks with
`ray.wait` (`DistributedTrainer._wait`): the first rank that raises is reported at once, even while the
others are still blocked in a collective waiting for it, and a rank that does not answer is named once
another gave up waiting for it in a collective, or `collective_timeout_s` + `DEADLINE_MARGIN_S` after
rank 0 answered.

Why plain Ray actors and not Ray Train's `TorchTrainer`: an RL step is driven from outside, between
generation, weight publication, evaluation and checkpoints, and Ray Train runs a training function to
completion on its own schedule. Actors keep the step under the pipeline's control and run the same
`Trainer` code as local mode.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import socket
import time
from pathlib import Path

import torch
from torch import Tensor

from parityrl.batch import Sample
from parityrl.config import RunConfig
from parityrl.engines.base import WeightChunks
from parityrl.errors import UserError
from parityrl.hardware import rank_threads
from parityrl.memory import one_malloc_arena
from parityrl.train.checkpoint import RunState
from parityrl.train.trainer import StepResult, StepStats, Trainer, finalise, global_normaliser

DEADLINE_MARGIN_S = 30.0
"""Beyond `train.collective_timeout_s`: how long the other ranks have to answer a call once rank 0 has
(a quick call, one that runs no model work such as setting the version: from its start) before the
driver names the ranks that did not answer."""
SYMPTOM_GRACE_S = 2.0
"""After a rank gave up on a collective (a timeout, a lost peer): how long to wait for the rank it
waited for to report its own error, which is then the one named."""
SYMPTOM = re.compile(r"timed out|timeout|watchdog|connection (closed|reset)|closed by peer|broken pipe", re.IGNORECASE)
"""What a rank raises when another rank failed or hung under it in a collective (gloo: "Timed out waiting
300000ms for recv operation", "Connection closed by peer"; the store: "Timed out after 300 seconds waiting
for clients"; NCCL: "Watchdog caught collective operation timeout")."""


class RankFailed(UserError):
    """A trainer rank raised, died or stopped answering: the run cannot go on (exit status 1). The
    message names the rank and why; `--debug` shows the rank's own traceback (the `__cause__`)."""

    exit_code = 1


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
        timeout = datetime.timedelta(seconds=self.config.train.collective_timeout_s)
        init_method = f"tcp://{master_addr}:{master_port}"
        dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world_size, timeout=timeout)
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
    """The driver's view of `train.world_size` ranks, with the local `Trainer`'s interface.

    Every call on the ranks is waited on by `_wait`: a rank that raises, dies or does not answer raises
    `RankFailed` naming it, and every later call raises the same error at once (the process group is
    broken). `rank_class`: the actor class of each rank (tests pass a subclass that fails on purpose)."""

    def __init__(self, config: RunConfig, model_dir: Path, pad_id: int, actor_options: dict, rank_class: type[TrainerRank] = TrainerRank):
        import ray

        self.config = config
        self.world_size = config.train.world_size
        self._version = 0
        self._failure: RankFailed | None = None
        remote_rank = ray.remote(rank_class).options(**actor_options)
        self.ranks = [remote_rank.remote(config, str(model_dir), pad_id, rank, self.world_size) for rank in range(self.world_size)]
        try:
            # every actor up first (its process started, torch imported), so the rendezvous below, which
            # waits train.collective_timeout_s for all ranks, does not count how long each took to start
            up = [self.ranks[0].rendezvous.remote(), *(rank.node_id.remote() for rank in self.ranks[1:])]
            address, port = self._wait(up, "while starting its actor")[0]
            self.backend = self._wait([rank.init.remote(address, port) for rank in self.ranks], "while starting (process group, model)")[0]
        except BaseException:
            self.close()
            raise

    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, version: int) -> None:
        """Set on every rank (a resume continues at the checkpoint's version)."""
        self._raise_if_failed()
        self._wait([rank.set_version.remote(version) for rank in self.ranks], "while setting the version", quick=True)
        self._version = version

    def step(self, samples: list[Sample], advantages: Tensor, probe: list[Sample] | None = None) -> dict:
        """One optimiser step over all ranks (blocking: run it in a thread); metrics as a local step's."""
        self._raise_if_failed()
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
        results: list[StepResult] = self._wait(calls, "in a step")
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
        """An object-store reference to rank 0's `WeightChunks` (every replica loads the same chunks),
        returned once the publication is complete. Sharded (`train.fsdp`), every rank takes part in
        gathering them (the other ranks' calls return None), so all are waited on: a rank that fails
        there is named here, not met by the engines as a reference that never resolves. The engines
        could not start copying before rank 0's call returns anyway (its result lists the chunks)."""
        self._raise_if_failed()
        publishing = self.ranks if self.config.train.fsdp else self.ranks[:1]
        calls = [rank.weight_chunks.remote() for rank in publishing]
        self._wait(calls, "while publishing the weights")  # rank 0's result is small: the chunks' names and refs
        return calls[0]

    def save_checkpoint(self, run_dir: Path, state: RunState) -> Path:
        # every rank writes its optimizer shards (and takes part in gathering the weights); rank 0 the rest
        self._raise_if_failed()
        calls = [rank.save_checkpoint.remote(str(run_dir), state) for rank in self.ranks]
        return Path(self._wait(calls, "while writing a checkpoint")[0])

    def load_checkpoint(self, checkpoint: Path) -> None:
        self._raise_if_failed()
        self._wait([rank.load_optimizer.remote(str(checkpoint)) for rank in self.ranks], "while loading a checkpoint")

    def close(self) -> None:
        """Shut the process group down on every rank (all at once, `collective_timeout_s` + `DEADLINE_MARGIN_S`
        at most) and kill the actors. After a failure, straight to the kill: a rank blocked in a collective
        would not answer."""
        import ray

        if self._failure is None:
            with contextlib.suppress(Exception):  # a dead rank: killed below either way
                ray.wait([rank.shutdown.remote() for rank in self.ranks], num_returns=len(self.ranks), timeout=self._answer_deadline_s)
        for rank in self.ranks:
            with contextlib.suppress(Exception):
                ray.kill(rank, no_restart=True)

    # -- waiting on the ranks -----------------------------------------------------------------------

    @property
    def _answer_deadline_s(self) -> float:
        return self.config.train.collective_timeout_s + DEADLINE_MARGIN_S

    def _wait(self, calls: list, what: str, quick: bool = False) -> list:
        """The results of `calls` (one per rank, from rank 0 on), in order.

        Waits with `ray.wait`, so the first rank to raise or die is reported at once, while the others
        may still be blocked in a collective that waits for it. A rank that gave up on a collective
        (a timeout, a lost peer) is a symptom: the ranks that have not answered are named instead, after
        `SYMPTOM_GRACE_S` for them to report an error of their own. No answer: a `quick` call (no model
        work) has `collective_timeout_s + DEADLINE_MARGIN_S` in all; any other, that long after rank 0
        answered (the ranks step together through collectives; rank 0 alone does work after the last
        one: the probe, the checkpoint's HF weights)."""
        import ray

        self._raise_if_failed()
        pending = dict(zip(calls, range(len(calls))))
        results: dict[int, object] = {}
        began = time.monotonic()
        deadline = began + self._answer_deadline_s if quick else float("inf")
        while pending:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if left == float("inf") else max(left, 0.0))
            if not ready:
                quiet = sorted(pending.values())
                since = "in all" if quick else "after rank 0 answered"
                raise self._fail(
                    f"{_ranks(quiet, self.world_size)} did not answer {what} within {self._answer_deadline_s:.0f} s {since} "
                    f"(train.collective_timeout_s={self.config.train.collective_timeout_s:g} s + {DEADLINE_MARGIN_S:g} s). "
                    + _slow_or_stuck(quiet)
                )
            ref = ready[0]
            rank = pending.pop(ref)
            try:
                results[rank] = ray.get(ref)
            except Exception as error:
                raise self._failed(rank, error, pending, what, began) from error
            if rank == 0 and pending and not quick:
                deadline = time.monotonic() + self._answer_deadline_s
        return [results[rank] for rank in range(len(calls))]

    def _failed(self, rank: int, error: Exception, pending: dict, what: str, began: float) -> RankFailed:
        """The error for rank `rank` failing: its own, or, when it only gave up waiting for others in a
        collective, theirs (a rank that fails in the grace) or their silence."""
        import ray

        waited = time.monotonic() - began
        reason = _reason(error)
        symptom = SYMPTOM.search(reason) is not None
        if symptom and pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=SYMPTOM_GRACE_S)
            for ref in ready:
                other = pending.pop(ref)
                try:
                    ray.get(ref)
                except Exception as its_error:
                    if SYMPTOM.search(_reason(its_error)) is None:  # the root cause
                        return self._failed(other, its_error, pending, what, began)
        quiet = sorted(pending.values())
        timeout = self.config.train.collective_timeout_s
        if symptom and quiet:
            return self._fail(
                f"{_ranks(quiet, self.world_size)} did not answer {what}: rank {rank} gave up waiting for "
                f"{'it' if len(quiet) == 1 else 'them'} in a collective after {waited:.0f} s ({reason}). "
                f"A rank waits train.collective_timeout_s={timeout:g} s in each collective. " + _slow_or_stuck(quiet)
            )
        message = f"trainer rank {rank} of {self.world_size} failed {what}: {reason}."
        if quiet:
            message += f" Rank{'s' if len(quiet) > 1 else ''} {', '.join(map(str, quiet))} had not answered yet."
        if isinstance(error, ray.exceptions.RayActorError) and waited >= timeout and quiet:
            message += (
                f" It died {waited:.0f} s into the call, past train.collective_timeout_s={timeout:g} s: NCCL's watchdog"
                f" ends a rank that waited that long in a collective, so the rank it waited for may be the one stuck."
            )
        return self._fail(message + " The run stopped: fix the cause (the rank's log has its traceback), then resume from the last checkpoint.")

    def _raise_if_failed(self) -> None:
        """After a rank failed the process group is broken: every later call raises the same error."""
        if self._failure is not None:
            raise self._failure

    def _fail(self, message: str) -> RankFailed:
        self._failure = RankFailed(message)
        return self._failure


def _ranks(ranks: list[int], world_size: int) -> str:
    return f"trainer rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {world_size}"


def _slow_or_stuck(ranks: list[int]) -> str:
    them = "it is" if len(ranks) == 1 else "they are"
    return (
        f"If {them} only slow (a long step, a loaded node), raise train.collective_timeout_s; otherwise {them} stuck:"
        f" `ray stack` (or py-spy dump) on {'its' if len(ranks) == 1 else 'their'} node shows where. The run stopped; resume it"
        f" from the last checkpoint."
    )


def _reason(error: BaseException) -> str:
    """One line for a rank's failure: its exception's type and message (the first line: torch appends
    C++ frames), the actor's death, or its constructor's error."""
    import ray

    if isinstance(error, ray.exceptions.RayActorError):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if error.actor_init_failed:
            return f"its actor failed to start ({lines[-1] if lines else type(error).__name__})"
        detail = [line for line in lines[1:] if ":" not in line.split()[0]]  # not the `\tpid: ...` fields
        return f"its process died ({type(error).__name__}{': ' + detail[0] if detail else ''})"
    cause = getattr(error, "cause", None)  # RayTaskError: the exception the rank raised
    if isinstance(cause, BaseException):
        error = cause
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    first = re.sub(r"^\[[^\]]+:\d+\] ", "", first)  # torch's C++ source location: "[.../unbound_buffer.cc:78] "
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def actor_resources(config: RunConfig) -> dict:
    """Ray resources of one trainer rank: its threads as CPUs, one GPU on CUDA."""
    uses_gpu = config.train.device == "cuda" or (config.train.device == "auto" and torch.cuda.is_available())
    threads = rank_threads(config.train)
    return {"num_cpus": threads, "num_gpus": 1 if uses_gpu else 0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}}


