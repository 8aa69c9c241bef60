"""The engine watchdog's verdicts, on an engine whose health reports are scripted (no processes):
hung (tokens stopped, requests in flight, no CPU used) is declared dead within the stall timeout;
slow (no token, but its processes compute), paused for a weight update, idle, or not yet at its
first token is left alone. The real-engine SIGSTOP run (tests/test_faults.py) shows the same on vLLM,
where the moment of the stop decides which detector can fire."""

from __future__ import annotations

import asyncio
import time

import pytest

from parityrl.config import EngineConfig
from parityrl.engines import supervisor
from parityrl.engines.base import EngineHealth
from parityrl.engines.supervisor import SupervisedEngine

STALL_S = 0.4


class ScriptedHealth:
    """Reports what the test sets: tokens streamed, requests in flight, paused, CPU seconds used
    (advancing at `cpu_per_s` of wall time, as a computing engine's processes do)."""

    def __init__(self, streamed: int, inflight: int, paused: bool = False, cpu_per_s: float = 0.0):
        self.streamed, self.inflight, self.paused, self.cpu_per_s = streamed, inflight, paused, cpu_per_s
        self.began = time.monotonic()
        self.version = 0

    def health(self) -> EngineHealth:
        cpu = 3.0 + self.cpu_per_s * (time.monotonic() - self.began)
        detail = {"streamed_tokens": self.streamed, "paused": self.paused, "cpu_seconds": cpu}
        return EngineHealth(ok=True, version=self.version, inflight_requests=self.inflight, detail=detail)


def verdict(engine: ScriptedHealth, watch_s: float, monkeypatch) -> tuple[str | None, float]:
    """(the watchdog's reason for declaring the engine dead, or None; seconds until it did)."""
    monkeypatch.setattr(supervisor, "WATCHDOG_PERIOD_S", 0.05)
    supervised = SupervisedEngine(lambda: engine, EngineConfig(stall_timeout_s=STALL_S), log=lambda _: None)

    async def watch() -> tuple[str | None, float]:
        dead = asyncio.Event()
        began = time.monotonic()
        watchdog = asyncio.create_task(supervised._watch(engine, dead))
        try:
            await asyncio.wait_for(dead.wait(), watch_s)
        except TimeoutError:
            return None, watch_s
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        return supervised._dead_reason, time.monotonic() - began

    return asyncio.run(watch())


def test_a_hung_engine_is_declared_dead_by_the_stall_watchdog(monkeypatch):
    reason, after_s = verdict(ScriptedHealth(streamed=40, inflight=3), watch_s=10 * STALL_S, monkeypatch=monkeypatch)
    assert reason is not None and "no token streamed and no CPU used" in reason
    assert STALL_S <= after_s <= STALL_S + 0.5, after_s


@pytest.mark.parametrize(
    "engine, why",
    [
        (ScriptedHealth(streamed=40, inflight=3, cpu_per_s=0.9), "computing (a long prefill): slow, not hung"),
        (ScriptedHealth(streamed=40, inflight=3, paused=True), "paused for a weight update: the update's deadline decides"),
        (ScriptedHealth(streamed=40, inflight=0), "idle: nothing to stream"),
        (ScriptedHealth(streamed=0, inflight=3), "before its first token: the request's deadline decides"),
    ],
)
def test_an_engine_that_is_slow_paused_idle_or_starting_is_left_alone(engine, why, monkeypatch):
    reason, _ = verdict(engine, watch_s=4 * STALL_S, monkeypatch=monkeypatch)
    assert reason is None, f"{why}: declared dead ({reason})"
