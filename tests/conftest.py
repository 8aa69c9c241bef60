"""Fixtures shared by the suite, and the markers that say what a test needs.

Markers (pyproject.toml lists them): `vllm`, `ray`, `smollm2` are declared by the tests that need
them; `tiny_model` is added here to every test that asks for `tiny_model_dir`, and `vllm` to every
test that asks for `vllm_slot`, so neither can be forgotten. `unit` is derived: a test with none of
those needs. `integration` is the rest. A test that declares `unit` and has a need is a collection
error. `slow` is the full tier only (`bash scripts/test.sh --all`).

One vLLM engine runs at a time (2 cores): `vllm_slot` holds at most one, shared by every test that
asks for it; its users run together (collection order, below) and it is closed before any other
test runs, so a test that starts engines of its own never shares the machine with an idle one.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from parityrl.assets import prepare_model
from parityrl.config import load_config
from parityrl.tasks import load_task

REPO = Path(__file__).resolve().parents[1]
NEEDS = ("vllm", "ray", "smollm2", "tiny_model")
"""Markers that say what a test needs beyond the package and its CPU dependencies."""
ENGINE_SEED = 1234
"""Every engine of `vllm_slot` samples with this seed: the same request ids give the same tokens
on engines that differ only in what they report (processed vs raw logprobs)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tiny_model_dir" in item.fixturenames:
            item.add_marker(pytest.mark.tiny_model)
        if "vllm_slot" in item.fixturenames:
            item.add_marker(pytest.mark.vllm)
        needs = sorted({marker.name for marker in item.iter_markers()} & set(NEEDS))
        if needs and item.get_closest_marker("unit") is not None:
            raise pytest.UsageError(f"{item.nodeid} is marked unit but needs {', '.join(needs)}: drop the unit marker (it is derived)")
        item.add_marker(pytest.mark.integration if needs else pytest.mark.unit)
    # the shared engine's users first, the default (fp32, processed logprobs) engine's before the slow
    # tier's other engines: one start per kind of engine. Speed only: every test passes in any order
    # (the slot restores the engine's weights before each use)
    def order(item: pytest.Item) -> tuple[int, int]:
        if "vllm_slot" not in item.fixturenames:
            return (1, 0)
        return (0, item.get_closest_marker("slow") is not None)

    items.sort(key=order)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if nextitem is None or "vllm_slot" not in nextitem.fixturenames:
        EngineSlot.close_shared()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The built tiny model after a short SFT warm-up (a non-trivial distribution), cached across runs
    under runs/test-assets (PARITYRL_TEST_ASSETS overrides) and shared by every test."""
    cache = os.environ.get("PARITYRL_TEST_ASSETS", str(REPO / "runs" / "test-assets"))
    config = load_config(None, ["assets.sft.steps=300", "assets.sft.target_success=null", f"assets.cache_dir={cache}"])
    return prepare_model(config, load_task(config.task))


class EngineSlot:
    """At most one live `VLLMEngine` on the tiny model, reused while tests ask for the same kind.

    `get(...)` returns the engine in its start state whatever earlier tests did with it: weights
    updated since are replaced by the model directory's (a new version number; tests compare with
    `engine.version`, never with 0) and no request is in flight. A test that needs another
    `logprobs_mode` or dtype replaces the engine."""

    shared: EngineSlot | None = None

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.loop = asyncio.new_event_loop()
        self.engine = None
        self.kind: tuple | None = None
        self.clean_version = 0
        self.start_health = None
        self.starts = 0
        self.torch_threads: int | None = None

    def get(self, logprobs_mode: str = "processed_logprobs", dtype: str = "float32"):
        """processed_logprobs: weights updated in place (the default); raw_logprobs: vLLM's reload, so
        both update paths run against the trainer. fp32 engines run compiled (the default path), bf16
        eagerly. Up to 128 top logprobs per position (the tiny model's whole vocabulary: check --full-vocab)."""
        from parityrl.config import EngineConfig
        from parityrl.engines.vllm import VLLMEngine

        kind = (logprobs_mode, dtype)
        if self.engine is None or self.kind != kind:
            self.close()
            weight_update = "inplace" if logprobs_mode == "processed_logprobs" else "reload"
            config = EngineConfig(logprobs_mode=logprobs_mode, weight_update=weight_update, enforce_eager=dtype != "float32")
            engine = VLLMEngine(self.model_dir, dtype, config, seed=ENGINE_SEED, extra_engine_args={"max_logprobs": 128})
            import torch

            # scoring in this process uses one thread while the engine lives: its worker is bound to the
            # other core, and oversubscribed OpenMP threads spin (an SFT went from 75 s to >10 min)
            self.torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            began = time.perf_counter()
            self.run(engine.start())
            self.starts += 1
            print(f"\n[vllm] engine start #{self.starts} {kind}: {time.perf_counter() - began:.1f} s")
            self.engine, self.kind, self.clean_version = engine, kind, engine.version
            self.start_health = engine.health()
        self._restore()
        return self.engine

    def _restore(self) -> None:
        engine = self.engine
        health = engine.health()
        assert health.ok and health.inflight_requests == 0, f"the shared engine was left busy or broken: {health}"
        engine.config.update_mode = "keep"
        if engine.version != self.clean_version:
            from parityrl.policy import export_state_dict, load_policy

            state = export_state_dict(load_policy(self.model_dir, "float32", lm_head_fp32=True))
            self.run(engine.update_weights(state, engine.version + 1))
            self.clean_version = engine.version

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        if self.engine is not None:
            self.run(self.engine.close())
            self.engine, self.kind = None, None
            import torch

            torch.set_num_threads(self.torch_threads)

    @classmethod
    def close_shared(cls) -> None:
        if cls.shared is not None:
            cls.shared.close()


@pytest.fixture(scope="session")
def vllm_slot(tiny_model_dir):
    """The shared engine slot (see `EngineSlot`); closed between its users and other tests."""
    slot = EngineSlot.shared = EngineSlot(tiny_model_dir)
    yield slot
    slot.close()
    slot.loop.close()
    EngineSlot.shared = None
