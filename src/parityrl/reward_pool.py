"""`WorkerPool`: rewards and environments called in worker processes with a per-call timeout, never in
the trainer. `RewardPool` scores completions; `EnvironmentPool` plays environment turns (`environments`).

math-verify times its parsing out with `signal.alarm`, which only works in a main thread (it fails
with "doesn't support threaded environment" under `asyncio.to_thread`), and a user function may hang
or crash. Each worker runs the reward in its own main thread; the pool enforces the per-call timeout
from outside and kills a worker that overruns it. The reward functions themselves are in `rewards`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe, wait
from typing import TYPE_CHECKING, Any, NamedTuple

from parityrl.rewards import RewardFn, RewardItem, RewardResult, resolve_reward, score_one

if TYPE_CHECKING:
    from parityrl.config import TaskConfig


class RewardPoolError(RuntimeError):
    """The pool cannot call at all: a worker failed to start, or the pool was closed."""


class CallResult(NamedTuple):
    """What one call in a worker gave: its value, or None with `error` set."""

    value: Any
    error: str | None = None


# Worker pool


@dataclass(eq=False)
class _Job:
    """One `score` call: its items, the results filled in as workers answer, and the caller's future."""

    items: list[tuple]
    future: concurrent.futures.Future
    results: list[CallResult | None] = field(init=False)
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.remaining = len(self.items)

    def record(self, index: int, result: CallResult) -> None:
        self.results[index] = result
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(list(self.results))


@dataclass(eq=False)
class _Chunk:
    """Items of one job sent to a worker in one message; the worker answers them in this order."""

    job: _Job
    indices: list[int]


@dataclass(eq=False)
class _Worker:
    """A worker process and the parent's end of its pipe."""

    process: subprocess.Popen
    conn: Connection
    ready: bool = False
    chunk: _Chunk | None = None
    answered: int = 0
    """Items of `chunk` already answered; the next index is the one being scored."""
    deadline: float = math.inf
    """Monotonic time by which the item being scored must be answered (before `ready`: by which the
    worker must have started)."""

    def kill(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.conn.close()
        return self.process.wait()


_WORKER_CODE = "from parityrl.reward_pool import _worker_main; _worker_main()"
WORKER_START_TIMEOUT_S = 120.0
"""A worker that has not imported its reward by then breaks the pool (generous: a user reward may
import heavy packages on a loaded machine)."""


class WorkerPool:
    """Calls a reward or an environment (`kind`) in `workers` worker processes with a timeout of
    `timeout_s` per item; `RewardPool` and `EnvironmentPool` are its two uses.

    Design. Workers are fresh interpreters (`python -c`, not fork: the trainer holds torch threads
    and a vLLM client, and not multiprocessing spawn, which re-runs the caller's `__main__`) that
    import only this module and the reward. One dispatcher thread owns them. A `score` call is split
    into one chunk per worker and each chunk goes to an idle worker in one message, so 64 completions
    cost `workers` submissions, not 64 round trips. The worker scores the chunk's items in order in its
    main thread and streams each result back (a few dozen bytes) as soon as it has it, so the
    dispatcher always knows which item is running and since when: the timeout applies to each item
    on its own (a chunk-level timeout could not tell which item hung), and when one overruns,
    only that item scores 0.0 ("timed out after X s"). The dispatcher kills that worker (a hung
    worker cannot block later calls), starts a replacement, and queues the chunk's unscored items
    again. A worker that dies mid-item (a crash, `os._exit`) costs that item the same way ("reward
    worker died"). A reward that raises costs only its item (0.0, "ExceptionType: message").

    Starting a worker takes one interpreter start plus the reward's imports (about 0.5 s with
    math-verify); the constructor does not wait for it, the first `score` does. Use `close()` (or
    `with RewardPool(...)`) to stop the workers.
    """

    def __init__(self, kind: str, spec: str, args: dict | None, label: str, *, workers: int, timeout_s: float):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        _resolve(kind, spec, args or {})  # a wrong name or an unimportable module fails here, in the caller
        self.kind, self.spec, self.args, self.label = kind, spec, args or {}, label
        self.timeout_s, self.worker_count = timeout_s, workers
        self._submitted: collections.deque[_Job] = collections.deque()
        self._pending: collections.deque[_Chunk] = collections.deque()
        self._lock = threading.Lock()
        self._closing = False
        self._broken: str | None = None
        self._wake_reader, self._wake_writer = Pipe(duplex=False)
        self._workers: list[_Worker] = [self._start_worker() for _ in range(workers)]
        self._thread = threading.Thread(target=self._dispatch_forever, name=f"{kind}-pool", daemon=True)
        self._thread.start()

    # -- caller side (any thread) --

    def submit(self, items: Sequence[tuple]) -> concurrent.futures.Future:
        """Queue `items` (argument tuples); the future resolves to their CallResults in order
        (RewardPoolError if the pool is closed or cannot start its workers)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        # running from the start: a cancelled awaiting caller leaves a future the dispatcher can still set
        future.set_running_or_notify_cancel()
        job = _Job([tuple(item) for item in items], future)
        with self._lock:
            if self._closing or self._broken:
                future.set_exception(RewardPoolError(self._broken or "reward pool is closed"))
                return future
            if not job.items:
                future.set_result([])
                return future
            self._submitted.append(job)
        self._wake()
        return future

    def close(self) -> None:
        """Stop the workers; queued and running calls fail with RewardPoolError. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._wake()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _wake(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._wake_writer.send_bytes(b"")

    # -- dispatcher thread --

    def _start_worker(self) -> _Worker:
        parent_end, worker_end = Pipe(duplex=True)
        environment = dict(os.environ)
        # the trainer's import path, so a user reward or environment importable here is importable in the worker
        environment["PYTHONPATH"] = os.pathsep.join(os.path.abspath(entry or os.curdir) for entry in sys.path)
        # a user reward that imports torch or numpy must not start one thread per core next to the trainer
        environment.setdefault("OMP_NUM_THREADS", "1")
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, str(worker_end.fileno()), self.kind, self.spec, json.dumps(self.args)],
            pass_fds=[worker_end.fileno()],
            env=environment,
            stdin=subprocess.DEVNULL,
        )
        worker_end.close()
        return _Worker(process, parent_end, deadline=time.monotonic() + WORKER_START_TIMEOUT_S)

    def _dispatch_forever(self) -> None:
        try:
            while not self._closing and not self._broken:
                self._accept_submissions()
                self._assign_chunks()
                self._handle_messages(self._wait_for_activity())
                self._expire_overdue(time.monotonic())
        except Exception as error:  # a bug here must not leave callers waiting forever
            self._broken = f"{self.kind} pool dispatcher failed: {type(error).__name__}: {error}"
        finally:
            self._shut_down()

    def _accept_submissions(self) -> None:
        with self._lock:
            jobs = list(self._submitted)
            self._submitted.clear()
        for job in jobs:
            chunk_size = math.ceil(len(job.items) / self.worker_count)
            for start in range(0, len(job.items), chunk_size):
                self._pending.append(_Chunk(job, list(range(start, min(start + chunk_size, len(job.items))))))

    def _assign_chunks(self) -> None:
        for worker in self._workers:
            if not self._pending:
                return
            if worker.ready and worker.chunk is None:
                chunk = self._pending.popleft()
                worker.chunk, worker.answered = chunk, 0
                worker.conn.send(("score", [tuple(chunk.job.items[i]) for i in chunk.indices]))
                worker.deadline = time.monotonic() + self.timeout_s

    def _wait_for_activity(self) -> list:
        next_deadline = min(worker.deadline for worker in self._workers)
        wait_s = None if math.isinf(next_deadline) else max(0.0, next_deadline - time.monotonic())
        return wait([self._wake_reader, *(worker.conn for worker in self._workers)], timeout=wait_s)

    def _handle_messages(self, readable: list) -> None:
        for conn in readable:
            if conn is self._wake_reader:
                while self._wake_reader.poll():
                    self._wake_reader.recv_bytes()
                continue
            worker = next(w for w in self._workers if w.conn is conn)
            try:
                while worker.conn.poll():  # drain: a fast worker may have answered several items
                    self._handle_message(worker, worker.conn.recv())
            except (EOFError, OSError):
                self._replace_dead_worker(worker)

    def _handle_message(self, worker: _Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready, worker.deadline = True, math.inf
        elif kind == "start_failed":
            self._broken = f"{self.kind} worker for {self.label} failed to start: {message[1]}"
        elif kind == "result":
            self._record_current(worker, CallResult(message[1], message[2]))
            worker.deadline = time.monotonic() + self.timeout_s if worker.chunk is not None else math.inf

    def _record_current(self, worker: _Worker, result: CallResult) -> None:
        """Record the result of the item `worker` is calling and move it to the next item."""
        chunk = worker.chunk
        assert chunk is not None, "a worker answered without work"
        chunk.job.record(chunk.indices[worker.answered], result)
        worker.answered += 1
        if worker.answered == len(chunk.indices):
            worker.chunk, worker.deadline = None, math.inf

    def _expire_overdue(self, now: float) -> None:
        for worker in list(self._workers):
            if not worker.ready and worker.deadline <= now:
                self._broken = f"{self.kind} worker for {self.label} did not start within {WORKER_START_TIMEOUT_S:g} s"
            elif worker.chunk is not None and worker.deadline <= now:
                self._record_current(worker, CallResult(None, f"timed out after {self.timeout_s:g} s"))
                self._retire(worker)

    def _replace_dead_worker(self, worker: _Worker) -> None:
        exit_code = worker.kill()
        if not worker.ready:
            self._broken = f"{self.kind} worker for {self.label} exited while starting (exit code {exit_code})"
            return
        if worker.chunk is not None:
            self._record_current(worker, CallResult(None, f"{self.kind} worker died (exit code {exit_code})"))
        self._retire(worker)

    def _retire(self, worker: _Worker) -> None:
        """Kill `worker`, queue its unscored items first in line, and start a replacement."""
        if worker.chunk is not None:
            self._pending.appendleft(_Chunk(worker.chunk.job, worker.chunk.indices[worker.answered :]))
        if worker.process.poll() is None:
            worker.kill()
        self._workers[self._workers.index(worker)] = self._start_worker()

    def _shut_down(self) -> None:
        error = RewardPoolError(self._broken or "reward pool is closed")
        with self._lock:
            self._closing = True
            jobs = {chunk.job for chunk in self._pending} | set(self._submitted)
            self._submitted.clear()
        jobs |= {worker.chunk.job for worker in self._workers if worker.chunk is not None}
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(("stop",))
        stop_by = time.monotonic() + 1.0
        for worker in self._workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=max(0.0, stop_by - time.monotonic()))
            worker.kill()
        self._wake_reader.close()
        with self._lock:
            self._wake_writer.close()


class RewardPool(WorkerPool):
    """Scores rewards in worker processes: `score(items)` -> a RewardResult per completion (0.0 with the
    error for one that raised, timed out or killed its worker)."""

    def __init__(self, reward: str, *, workers: int = 2, timeout_s: float = 10.0):
        super().__init__("reward", reward, None, f"task.reward={reward!r}", workers=workers, timeout_s=timeout_s)
        self.reward = reward

    @classmethod
    def from_config(cls, task: TaskConfig) -> RewardPool:
        """The pool for `task.reward` with `task.reward_workers` and `task.reward_timeout_s`."""
        return cls(task.reward, workers=task.reward_workers, timeout_s=task.reward_timeout_s)

    async def score(self, items: Sequence[RewardItem]) -> list[RewardResult]:
        """Rewards of `items`, in order; awaits without blocking the event loop."""
        return _as_rewards(await asyncio.wrap_future(self.submit(items)))

    def score_sync(self, items: Sequence[RewardItem]) -> list[RewardResult]:
        """Rewards of `items`, in order; blocks the calling thread (any thread)."""
        return _as_rewards(self.submit(items).result())


def _as_rewards(results: list[CallResult]) -> list[RewardResult]:
    return [RewardResult(0.0 if r.error is not None else r.value, r.error) for r in results]


class EnvironmentPool(WorkerPool):
    """Plays environment calls in worker processes (`environments.call_environment`): `reset(problem)`
    gives the first messages, `step(problem, messages)` an `EnvStep`; each a CallResult whose error says
    what went wrong (raised, wrong type, timed out, worker died)."""

    def __init__(self, environment: str, args: dict | None = None, *, workers: int = 2, timeout_s: float = 10.0):
        super().__init__("environment", environment, args, f"task.environment={environment!r}", workers=workers, timeout_s=timeout_s)

    @classmethod
    def from_config(cls, task: TaskConfig) -> EnvironmentPool:
        return cls(task.environment, task.environment_args, workers=task.reward_workers, timeout_s=task.reward_timeout_s)

    async def reset(self, problems: Sequence[dict]) -> list[CallResult]:
        return await asyncio.wrap_future(self.submit([(problem, None) for problem in problems]))

    async def step(self, calls: Sequence[tuple[dict, list[dict]]]) -> list[CallResult]:
        """One environment turn per (problem, messages so far) pair, in order."""
        return await asyncio.wrap_future(self.submit(calls))


def _warm_up(spec: str, reward: RewardFn) -> None:
    """First math-verify call loads sympy's LaTeX parser (~20 ms); pay it before the first timed item."""
    if spec == "math_verify":
        reward("\\boxed{\\frac{1}{2}}", "0.5", "")


def _handler(kind: str, spec: str, args: dict):
    """What a worker calls on each item: (item tuple) -> (value, error or None). Resolving it imports
    the user's module, so a wrong spec fails in the caller before any worker starts."""
    if kind == "reward":
        reward = resolve_reward(spec)
        _warm_up(spec, reward)
        return lambda item: tuple(score_one(reward, RewardItem(*item)))
    from parityrl.environments import call_environment, resolve_environment

    cls = resolve_environment(spec, args)

    def play(item: tuple) -> tuple:
        problem, messages = item
        try:
            result = call_environment(cls, args, problem, messages)
        except Exception as error:
            return None, f"{type(error).__name__}: {error}"
        return result, None

    return play


def _resolve(kind: str, spec: str, args: dict) -> None:
    if kind == "reward":
        resolve_reward(spec)
    else:
        from parityrl.environments import resolve_environment

        resolve_environment(spec, args)


def _worker_main() -> None:
    """A worker: `python -c <_WORKER_CODE> FD KIND SPEC ARGS_JSON`. Calls chunks sent over FD until EOF or "stop"."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(sys.argv[1]))
    try:
        handle = _handler(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    except BaseException as error:
        conn.send(("start_failed", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message[0] == "stop":
            return
        for item in message[1]:
            conn.send(("result", *handle(item)))
