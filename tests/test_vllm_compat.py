"""Release differences (`engines/vllm_compat.py`), without starting an engine: a vLLM without
engine-stamped weight versions is reported, and an engine that could not tag its tokens refuses to start."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from parityrl.config import EngineConfig
from parityrl.engines import vllm_compat
from parityrl.engines.vllm import VLLMEngine

pytestmark = pytest.mark.unit


def test_a_release_without_weight_versions_is_a_finding_and_needs_streaming(monkeypatch, tmp_path):
    assert vllm_compat.stamps_weight_versions() and vllm_compat.findings() == []  # the pinned release (0.32) has them
    assert vllm_compat.weight_version_spans(SimpleNamespace(token_ids=[1])) is None  # 0.31.0's CompletionOutput

    monkeypatch.setattr(vllm_compat, "stamps_weight_versions", lambda: False)  # as vLLM 0.31.0
    monkeypatch.setattr("parityrl.engines.vllm.stamps_weight_versions", lambda: False)
    (finding,) = vllm_compat.findings()
    assert "weight versions" in finding and "engine.stream" in finding
    # without spans and without a stream no token could be tagged: refused before any process starts
    engine = VLLMEngine(tmp_path, "float32", EngineConfig(), seed=0, stream=False)
    with pytest.raises(RuntimeError, match="engine.stream is false"):
        asyncio.run(engine.start())
    assert engine.engine is None and engine.process_ids == []


def test_a_shim_switched_off_is_a_finding_and_an_unknown_name_is_an_error(monkeypatch):
    monkeypatch.setenv(vllm_compat.SHIMS_OFF_ENV, "stream_tags")
    assert any("shim stream_tags switched off" in finding for finding in vllm_compat.findings())
    with pytest.raises(AttributeError):  # what parityrl did on 0.31.0 before the shim
        vllm_compat.weight_version_spans(SimpleNamespace(token_ids=[1]))
    monkeypatch.setenv(vllm_compat.SHIMS_OFF_ENV, "stream_tag")
    with pytest.raises(ValueError, match="unknown shims"):
        vllm_compat.findings()
