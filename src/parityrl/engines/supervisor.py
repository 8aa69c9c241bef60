"""Keeps a rollout engine alive for a whole run: deadlines, crash and stall detection, restarts.

`SupervisedEngine` wraps any `RolloutEngine` and is one itself, so the pipeline never talks to a bare
engine. Every call on the engine has a deadline (`engine.request_timeout_s` for generation,
`engine.update_timeout_s` for weight updates, pause and resume). A watchdog polls the engine once a
second and declares it dead when it reports an error (vLLM's `EngineDeadError`: a killed EngineCore or
worker) or, having streamed tokens, streams none for `engine.stall_timeout_s` while requests are in
flight and generation is not paused (during an update only the update's deadline can tell a hang), and
its processes use no CPU meanwhile (an engine that computes is slow, not hung: one bf16 prefill of
SmolLM2 on a CPU without native bf16 took minutes without a token).

On a death the engine is closed (leftover processes killed), a new one is started and loaded with the
last published weights and version, and the calls that were running on the dead one are retried on
the new one: a prompt group is generated again from scratch (its partial samples are discarded, so
it is neither lost nor trained on twice) and counted in `requeued_groups`. After `engine.max_restarts`
restarts the next death raises `EngineGaveUp` and the run stops with a checkpoint.

Calls that fail while the engine stays healthy (a request vLLM rejects, a bug) are not retried: the
error reaches the caller as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from parityrl.batch import Sample
from parityrl.config import EngineConfig, SamplingConfig
from parityrl.engines.base import EngineHealth, RolloutEngine, Weights

T = TypeVar("T")

WATCHDOG_PERIOD_S = 1.0
WORKING_CPU_FRACTION = 0.25
"""An engine whose processes use at least this share of a core is working, token or not. A stopped or
deadlocked process uses none (its background threads: milliseconds)."""
CLOSE_TIMEOUT_S = 60.0
DEATH_GRACE_S = 15.0
"""How long a failed call waits for the engine's health to report a death (5.3 s measured on CPU)."""


class EngineFailure(RuntimeError):
    """One engine incarnation died, hung or missed a deadline (recoverable by a restart)."""


class EngineGaveUp(RuntimeError):
    """The engine failed more than `engine.max_restarts` times: the run must stop."""


def _looks_dead(error: BaseException) -> bool:
    # vLLM raises EngineDeadError (and EngineGenerateError wrapping it) once EngineCore is gone
    return type(error).__name__ in {"EngineDeadError", "EngineGenerateError"}


class SupervisedEngine:
    """A `RolloutEngine` that restarts the engine built by `factory` when it dies (see module doc)."""

    def __init__(self, factory: Callable[[], RolloutEngine], config: EngineConfig, log: Callable[[str], None] = print):
        self.factory, self.config, self.log = factory, config, log
        self.name = "supervised"
        self.restarts = 0
        self.requeued_groups = 0
        self.failures: list[str] = []
        """One line per engine death: what was detected."""
        self._engine: RolloutEngine | None = None
        self._epoch = 0
        self._dead = asyncio.Event()
        self._dead_reason = ""
        self._watchdog: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._published: tuple[Weights, int] | None = None
        self._gave_up: EngineGaveUp | None = None
        self.on_start: Callable[[], None] | None = None
        """Called after each engine this supervisor starts, restarts included: the pipeline records the
        new engine's settings, whose shared-memory queues a `--resume` after a kill must find."""

    @property
    def engine(self) -> RolloutEngine:
        if self._engine is None:
            raise RuntimeError("SupervisedEngine used before start()")
        return self._engine

    @property
    def version(self) -> int:
        if self._published is not None:
            return self._published[1]
        return self._engine.version if self._engine is not None else 0

    # -- lifecycle ----------------------------------------------------------------------------------

    def publish(self, state_dict: Weights, version: int) -> None:
        """Weights a (re)started engine must load before serving, e.g. the checkpoint a run resumes from."""
        self._published = (state_dict, version)

    async def start(self) -> None:
        async with self._lock:
            await self._start_new()

    async def _start_new(self) -> None:
        """Start a fresh engine with the published weights, retrying up to the restart budget."""
        while True:
            engine = self.factory()
            try:
                await asyncio.wait_for(engine.start(), self.config.start_timeout_s)
                if self._published is not None:
                    await asyncio.wait_for(engine.update_weights(*self._published), self.config.update_timeout_s)
                break
            except Exception as error:  # a start past start_timeout_s (TimeoutError) included
                await self._dispose(engine)
                reason = f"engine start failed: {type(error).__name__}: {error}"
                if self.restarts >= self.config.max_restarts:
                    self._gave_up = self._giving_up(reason)
                    raise self._gave_up from None
                self.restarts += 1
                self.failures.append(reason)
                self.log(f"{reason}; retrying ({self.restarts}/{self.config.max_restarts})")
        self._engine = engine
        self._epoch += 1
        self._dead = asyncio.Event()
        self._dead_reason = ""
        self._watchdog = asyncio.create_task(self._watch(engine, self._dead))
        if self.on_start is not None:
            self.on_start()

    def _giving_up(self, reason: str) -> EngineGaveUp:
        return EngineGaveUp(
            f"the rollout engine failed {self.restarts + 1} times (engine.max_restarts={self.config.max_restarts}); last failure: {reason}"
        )

    async def _dispose(self, engine: RolloutEngine) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(engine.close(), CLOSE_TIMEOUT_S)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await self._dispose(engine)

    async def _watch(self, engine: RolloutEngine, dead: asyncio.Event) -> None:
        """Set `dead` when the engine reports an error or stops making progress with work in flight."""
        last_progress, last_change = None, time.monotonic()
        last_cpu, last_poll = None, time.monotonic()
        while not dead.is_set():
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            try:
                health = engine.health()
            except Exception as error:  # a health probe that raises is a dead engine too
                self._declare_dead(dead, f"health check raised {type(error).__name__}: {error}")
                return
            if not health.ok:
                self._declare_dead(dead, "the engine reported an error (EngineCore or worker process died)")
                return
            progress = health.detail.get("streamed_tokens")
            busy = health.inflight_requests > 0 and not health.detail.get("paused", False)
            now = time.monotonic()
            cpu = health.detail.get("cpu_seconds")
            computing = cpu is not None and last_cpu is not None and cpu - last_cpu >= WORKING_CPU_FRACTION * (now - last_poll)
            last_cpu, last_poll = cpu, now
            # not before its first token: a fresh engine may compile at its first request (`VLLMEngine._warm_up`
            # does most of that at start); only the request's deadline covers the first token
            if progress != last_progress or not busy or not progress or computing:
                last_progress, last_change = progress, now
            elif now - last_change > self.config.stall_timeout_s:
                self._declare_dead(dead, f"no token streamed and no CPU used for {self.config.stall_timeout_s:.0f} s with requests in flight")
                return

    def _declare_dead(self, dead: asyncio.Event, reason: str) -> None:
        if not dead.is_set():
            self._dead_reason = reason
            dead.set()

    # -- guarded calls ------------------------------------------------------------------------------

    async def _guarded(self, call: Callable[[RolloutEngine], Awaitable[T]], what: str, timeout_s: float) -> T:
        """Run `call` on the current engine; raise EngineFailure if the engine dies or `timeout_s` passes."""
        if self._gave_up is not None:
            raise self._gave_up
        engine, dead = self.engine, self._dead
        if dead.is_set():
            raise EngineFailure(self._dead_reason)
        work = asyncio.ensure_future(call(engine))
        death = asyncio.ensure_future(dead.wait())
        try:
            done, _ = await asyncio.wait({work, death}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            death.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work in done:
            error = work.exception()
            if error is None:
                return work.result()
            if _looks_dead(error) or await self._dies_soon(engine, dead):
                self._declare_dead(dead, f"{what} failed: {type(error).__name__}: {error}")
                raise EngineFailure(self._dead_reason) from None
            raise error
        if not dead.is_set():
            self._declare_dead(dead, f"{what} missed its {timeout_s:g} s deadline")
        raise EngineFailure(self._dead_reason)

    async def _dies_soon(self, engine: RolloutEngine, dead: asyncio.Event) -> bool:
        """After a call failed: is the engine dying? vLLM raises plain exceptions from calls that were
        cut off (`Call to pause_scheduler method failed: cancelled`) a few seconds before its health
        reports the death, so wait up to DEATH_GRACE_S for that before treating it as a request error."""
        deadline = time.monotonic() + DEATH_GRACE_S
        while time.monotonic() < deadline:
            if dead.is_set() or not engine.health().ok:
                return True
            await asyncio.sleep(0.25)
        return False

    async def _recover(self, epoch: int, seen_by: str) -> None:
        """Replace the engine of `epoch` (once, whoever asks first); raise EngineGaveUp past the budget.
        `seen_by`: the call that found the engine dead (a group, an evaluation, a weight update), named in
        `failures` when the watchdog found it first: a death first met by a weight update, with every
        group already generated, requeues nothing."""
        async with self._lock:
            if self._gave_up is not None:
                raise self._gave_up
            if epoch != self._epoch:  # someone else already restarted it
                return
            reason = self._dead_reason or "unknown failure"
            self.failures.append(reason if reason.startswith(seen_by) else f"{reason} (seen by {seen_by})")
            if self._watchdog is not None:
                self._watchdog.cancel()
            # the dead engine stays `self._engine` (its death event is set, so calls on it fail fast
            # and come here to wait) until `_start_new` puts the new one in its place
            if self._engine is not None:
                await self._dispose(self._engine)
            if self.restarts >= self.config.max_restarts:
                self._gave_up = self._giving_up(reason)
                raise self._gave_up
            self.restarts += 1
            self.log(f"engine failure: {reason}; restarting it with weights v{self.version} ({self.restarts}/{self.config.max_restarts})")
            await self._start_new()

    # -- RolloutEngine ------------------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig, request_id: str) -> list[Sample]:
        """Generate one group; if the engine dies meanwhile, generate it again on the restarted engine."""
        while True:
            epoch = self._epoch
            try:
                return await self._guarded(
                    lambda engine: engine.generate(prompt_token_ids, sampling, request_id), f"group {request_id}", self.config.request_timeout_s
                )
            except EngineFailure:
                self.requeued_groups += 1
                await self._recover(epoch, f"group {request_id}")

    async def greedy(self, prompts: list[list[int]], max_new_tokens: int, request_id: str) -> list[list[int]]:
        """Greedy completions; if the engine dies meanwhile, decoded again on the restarted engine."""
        while True:
            epoch = self._epoch
            try:
                return await self._guarded(
                    lambda engine: engine.greedy(prompts, max_new_tokens, request_id), f"evaluation {request_id}", self.config.request_timeout_s
                )
            except EngineFailure:
                await self._recover(epoch, f"evaluation {request_id}")

    async def update_weights(self, state_dict: Weights, version: int) -> None:
        """Apply weights; they are also kept so a restarted engine starts from them."""
        self._published = (state_dict, version)
        while True:
            epoch = self._epoch
            try:
                await self._guarded(
                    lambda engine: engine.update_weights(state_dict, version), f"weight update v{version}", self.config.update_timeout_s
                )
                return
            except EngineFailure:
                await self._recover(epoch, f"weight update v{version}")

    async def pause(self) -> None:
        await self._guarded(lambda engine: engine.pause(), "pause", self.config.update_timeout_s)

    async def resume(self) -> None:
        await self._guarded(lambda engine: engine.resume(), "resume", self.config.update_timeout_s)

    def health(self) -> EngineHealth:
        health = self.engine.health()
        health.detail = dict(health.detail) | {"restarts": self.restarts, "requeued_groups": self.requeued_groups}
        return health

    def settings(self) -> dict:
        return self.engine.settings()
