"""Rollout engines behind one protocol (`base.RolloutEngine`): `vllm` (vLLM V1) and `reference` (torch)."""

from __future__ import annotations

from pathlib import Path

from parityrl.config import RunConfig
from parityrl.engines.base import EngineHealth, RolloutEngine
from parityrl.scoring import Sample

__all__ = ["EngineHealth", "RolloutEngine", "Sample", "make_engine"]


def make_engine(config: RunConfig, model_dir: Path) -> RolloutEngine:
    """Build (not start) the configured engine for `model_dir`."""
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

    return VLLMEngine(model_dir, config.model.dtype, config.engine, seed=config.seed)
