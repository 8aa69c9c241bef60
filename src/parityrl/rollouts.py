"""Rollouts: keep the engine busy with prompt groups, score them, hand finished groups to the trainer.

Every group drawn from the prompt sampler is tracked until the trainer takes it, so a checkpoint can
record what was drawn but not trained on and a resume regenerates it first. A failure in any
background task reaches the trainer's loop through `Rollouts.take`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from parityrl.assets import task_prompt_ids
from parityrl.config import RunConfig
from parityrl.engines.supervisor import SupervisedEngine
from parityrl.errors import UserError
from parityrl.reward_pool import RewardPool
from parityrl.rewards import RewardItem
from parityrl.scoring import NO_VERSION, Sample
from parityrl.tasks import Problem, Task
from parityrl.train.objectives import group_advantages


class RunStopped(UserError):
    """The run cannot go on; the message says why and how to resume (exit status 1)."""

    exit_code = 1


@dataclass
class Group:
    problem: Problem
    samples: list[Sample]
    rewards: list[float]
    reward_errors: list[str] = field(default_factory=list)
    group_id: int = 0
    """Unique within a run, across resumes and engine restarts (a regenerated group keeps its id)."""

    @property
    def oldest_version(self) -> int:
        return min((s.oldest_version for s in self.samples), default=NO_VERSION)

    @property
    def tokens(self) -> int:
        return sum(len(s.completion_token_ids) for s in self.samples)


def completion_text(tokenizer, sample: Sample) -> str:
    return tokenizer.decode(sample.completion_token_ids, skip_special_tokens=True)


class Rollouts:
    """Keeps the engine busy with prompt groups and hands finished ones to the trainer.

    Every group drawn from the sampler is tracked in `pending` until the trainer takes it, so a
    checkpoint can record what was drawn but not trained on, and a resume regenerates it first."""

    def __init__(
        self,
        engine: SupervisedEngine,
        config: RunConfig,
        task: Task,
        tokenizer,
        rewards: RewardPool,
        log,
        sampler_state=None,
        requeue: list[Problem] | None = None,
        group_counter: int = 0,
    ):
        self.engine, self.config, self.task, self.tokenizer, self.rewards, self.log = engine, config, task, tokenizer, rewards, log
        self.rng = random.Random(config.seed)
        if sampler_state is not None:
            self.rng.setstate(sampler_state)
        self.requeue: deque[Problem] = deque(requeue or [])
        self.pending: dict[int, Problem] = {}
        self.ready: asyncio.Queue[tuple[int, Group]] = asyncio.Queue()
        self.failure: asyncio.Future = asyncio.get_running_loop().create_future()
        max_lag = config.pipeline.max_lag if config.pipeline.max_lag is not None else 1
        limit = config.pipeline.max_inflight_groups or config.train.prompts_per_step * max(1, max_lag)
        self.slots = asyncio.Semaphore(limit)
        self.generating = 0
        self.generated_tokens = 0
        self.reward_errors_reported = False
        self.engine_idle_s = 0.0
        self._idle_since: float | None = time.perf_counter()
        self._counter = group_counter
        self._tasks: set[asyncio.Task] = set()

    def next_problem(self) -> Problem:
        return self.requeue.popleft() if self.requeue else self.task.sample_train(self.rng, 1)[0]

    def undrained(self) -> list[Problem]:
        """Problems drawn but not trained on, in the order a resume should regenerate them."""
        return list(self.requeue) + list(self.pending.values())

    @property
    def group_counter(self) -> int:
        return self._counter

    async def one_group(self, problem: Problem, request_id: str, group_id: int = 0) -> Group:
        self._mark_busy()
        try:
            samples = await self.engine.generate(task_prompt_ids(self.tokenizer, self.task, problem.prompt), self.config.sampling, request_id)
        finally:
            self._mark_done()
        items = [RewardItem(completion_text(self.tokenizer, s), problem.answer, problem.prompt) for s in samples]
        results = await self.rewards.score(items)
        errors = [r.error for r in results if r.error is not None]
        if errors and not self.reward_errors_reported:
            self.reward_errors_reported = True  # once per run: the per-step count is in pipeline/reward_errors
            self.log(f"reward failed (scored 0): {errors[0]} — prompt {problem.prompt!r}, completion {items[0].completion!r}")
        group = Group(problem, samples, [r.value for r in results], errors, group_id)
        self.generated_tokens += group.tokens
        return group

    def _mark_busy(self) -> None:
        if self.generating == 0 and self._idle_since is not None:
            self.engine_idle_s += time.perf_counter() - self._idle_since
            self._idle_since = None
        self.generating += 1

    def _mark_done(self) -> None:
        self.generating -= 1
        if self.generating == 0:
            self._idle_since = time.perf_counter()

    def reset_idle_clock(self) -> None:
        """Count engine idle time from now (the RL phase), not from before the engine started."""
        self.engine_idle_s = 0.0
        self._idle_since = time.perf_counter() if self.generating == 0 else None

    def idle_seconds(self) -> float:
        extra = time.perf_counter() - self._idle_since if self._idle_since is not None else 0.0
        return self.engine_idle_s + extra

    def _fail(self, error: BaseException) -> None:
        if not self.failure.done():
            self.failure.set_exception(error)

    def start(self) -> asyncio.Task:
        producer = asyncio.create_task(self._produce_forever())
        producer.add_done_callback(lambda task: None if task.cancelled() or task.exception() is None else self._fail(task.exception()))
        return producer

    async def _produce_forever(self) -> None:
        while True:
            await self.slots.acquire()
            self._counter += 1
            group_id, problem = self._counter, self.next_problem()
            self.pending[group_id] = problem
            task = asyncio.create_task(self._produce_one(group_id, problem))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _produce_one(self, group_id: int, problem: Problem) -> None:
        delivered = False
        try:
            group = await self.one_group(problem, f"g{group_id}", group_id)
            self.ready.put_nowait((group_id, group))
            delivered = True
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # reaches the main loop through take()
            self._fail(error)
        finally:
            if not delivered:
                self.slots.release()

    async def take(self, count: int, trainer_version: int, max_lag: int, deadline_s: float) -> tuple[list[Group], int]:
        """`count` groups no staler than max_lag; returns (groups, dropped). Raises what a background
        task raised, or RunStopped when no group arrives within `deadline_s`."""
        groups, dropped = [], 0
        while len(groups) < count:
            group_id, group = await self._next_ready(deadline_s)
            self.slots.release()
            self.pending.pop(group_id, None)
            if group.oldest_version < trainer_version - max_lag:
                dropped += 1
                continue
            groups.append(group)
        return groups, dropped

    async def _next_ready(self, deadline_s: float) -> tuple[int, Group]:
        if self.ready.empty() and self.failure.done():
            raise self.failure.exception()
        getter = asyncio.ensure_future(self.ready.get())
        done, _ = await asyncio.wait({getter, self.failure}, timeout=deadline_s, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self.failure.done():
            raise self.failure.exception()
        raise RunStopped(f"no prompt group finished within {deadline_s:.0f} s although the engine reports no failure")

    async def probe(self, count: int) -> list[Sample]:
        """Samples for the parity probe (not trained on, not counted in rollout throughput)."""
        problems = self.task.sample_train(self.rng, count)
        self._counter += 1
        groups = await asyncio.gather(
            *(
                self.engine.generate(task_prompt_ids(self.tokenizer, self.task, p.prompt), self.config.sampling, f"probe{self._counter}-{i}")
                for i, p in enumerate(problems)
            )
        )
        return [s for group in groups for s in group]

    async def sync_batch(self, count: int) -> list[Group]:
        problems = [self.next_problem() for _ in range(count)]
        first = self._counter + 1
        self._counter += count
        return list(await asyncio.gather(*(self.one_group(p, f"g{first + i}", first + i) for i, p in enumerate(problems))))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def batch_tensors(groups: list[Group], advantage_kind: str) -> tuple[list[Sample], torch.Tensor, torch.Tensor]:
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)  # [groups, n]
    advantages = group_advantages(rewards, advantage_kind)
    samples = [s for g in groups for s in g.samples]
    return samples, advantages.flatten(), rewards


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (with a checkpoint); a second
    signal falls back to the default behaviour, so a stuck run can still be interrupted."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._installed: list[signal.Signals] = []

    def __enter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._installed.append(sig)
        return self

    def _on_signal(self, sig: signal.Signals) -> None:
        self.received = sig.name
        asyncio.get_running_loop().remove_signal_handler(sig)

    def __exit__(self, *exc_info) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
