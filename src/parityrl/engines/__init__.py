"""Rollout engines behind one protocol (`base.RolloutEngine`): `vllm` (vLLM V1) and `reference` (torch)."""

from __future__ import annotations

from pathlib import Path

from parityrl.batch import Sample
from parityrl.config import RunConfig
from parityrl.engines.base import EngineHealth, RolloutEngine

__all__ = ["EngineHealth", "RolloutEngine", "Sample", "make_engine"]


def make_engine(config: RunConfig, model_dir: Path, max_logprobs: int | None = None) -> RolloutEngine:
    """Build (not start) the configured engine for `model_dir`. `max_logprobs`: let vLLM return up to
    this many top logprobs per position (`check --full-vocab`; vLLM's default is 20)."""
    if config.engine.kind == "reference":
        from parityrl.engines.reference import ReferenceEngine

        return ReferenceEngine(
            model_dir,
            config.model.dtype,
            lm_head_fp32=config.engine.lm_head_fp32,
            seed=config.seed,
            max_batch=config.engine.max_num_seqs,
            threads=config.engine.omp_threads,
        )
    from parityrl.engines.vllm import (
        VLLMEngine,  # imported lazily: vLLM is heavy and optional for unit use
    )

    extra = {"max_logprobs": max_logprobs} if max_logprobs else None
    return VLLMEngine(model_dir, config.model.dtype, config.engine, seed=config.seed, extra_engine_args=extra)
