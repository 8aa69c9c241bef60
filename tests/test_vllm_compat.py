"""Release differences (`engines/vllm_compat.py`), without starting an engine: a vLLM without
engine-stamped weight versions is reported, and an engine that could not tag its tokens refuses to start."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from parityrl.config import EngineConfig
from parityrl.engines import vllm_compat
from parityrl.engines.vllm import VLLMEngine

pytestmark = pytest.mark.vllm  # imports vLLM (no engine starts)


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


def test_a_release_that_requires_preloaded_libraries_gets_them_or_says_how(monkeypatch):
    """vLLM 0.18.1's CPU worker refuses to start without libtcmalloc and libiomp in LD_PRELOAD; 0.32
    only warns, and its engine keeps the environment parityrl measured parity in."""
    assert vllm_compat.requires_preloaded_libraries() is False and vllm_compat.engine_preload("") is None  # 0.32
    monkeypatch.setattr(vllm_compat, "requires_preloaded_libraries", lambda: True)  # as 0.18.1
    monkeypatch.setattr(vllm_compat.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(vllm_compat.ctypes.util, "find_library", lambda name: f"lib{name}.so.4" if "tcmalloc" in name else None)
    preload = vllm_compat.engine_preload("/opt/other.so")
    assert preload is not None and preload.split()[0] == "/opt/other.so" and "libtcmalloc_minimal.so.4" in preload
    assert vllm_compat.engine_preload(preload) is None  # already there: left alone
    monkeypatch.setattr(vllm_compat.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install libtcmalloc-minimal4"):
        vllm_compat.engine_preload("")


def test_unfinished_requests_on_a_release_whose_frontend_lacks_the_method():
    assert vllm_compat.unfinished_requests(SimpleNamespace(get_num_unfinished_requests=lambda: 3)) == 3
    older = SimpleNamespace(output_processor=SimpleNamespace(get_num_unfinished_requests=lambda: 2))  # 0.18.1
    assert vllm_compat.unfinished_requests(older) == 2


def test_an_aborted_requests_last_output_with_extra_logprob_entries_is_dropped(tmp_path):
    """vLLM 0.18.1, pause in abort mode: the aborted request's last output has 1 new token and 3
    logprob entries (earlier positions again). The sample keeps what was streamed before and is an
    abort; the same mismatch on a request that was not aborted is still an error."""

    def output(ids, entries, finish_reason=None):
        logprobs = [{token: SimpleNamespace(logprob=value)} for token, value in entries]
        completion = SimpleNamespace(token_ids=ids, logprobs=logprobs, finish_reason=finish_reason)
        return SimpleNamespace(outputs=[completion], finished=finish_reason is not None)

    def engine_streaming(*outputs):
        async def generate(prompt, params, request_id):
            for item in outputs:
                yield item

        return SimpleNamespace(generate=generate)

    engine = VLLMEngine(tmp_path, "float32", EngineConfig(), seed=0)
    params = SimpleNamespace(logprobs=0)
    engine.engine = engine_streaming(output([26], [(26, -0.5)]), output([27], [(27, -0.2), (26, 0.0), (27, -0.2)], "abort"))
    sample = asyncio.run(engine._generate_one([1, 2], params, "aborted"))
    assert (sample.completion_token_ids, sample.logprobs_old, sample.finish_reason) == ([26], [-0.5], "abort")
    engine.engine = engine_streaming(output([26], [(26, -0.5)]), output([27], [(27, -0.2), (26, 0.0)], "length"))
    with pytest.raises(RuntimeError, match="1 new tokens but 2 logprob entries"):
        asyncio.run(engine._generate_one([1, 2], params, "finished"))
