"""The byte layouts that carry weights to the vLLM worker (`engines/vllm_worker.py`), without vLLM."""

from __future__ import annotations

import pytest
import torch

from parityrl.engines.vllm_worker import map_shared_file, pack_tensors, tensor_layout, tensor_views, unpack_tensors, write_tensors

pytestmark = pytest.mark.unit


def mixed_weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(7, 5, generator=generator),
        "model.norm.weight": torch.randn(5, generator=generator).to(torch.bfloat16),  # 10 bytes: odd offsets follow
        "lm_head.weight": torch.randn(3, 5, generator=generator).t(),  # not contiguous
        "model.layers.0.mlp.up_proj.bias": torch.randn(1, generator=generator).to(torch.float16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }


def test_pack_unpack_round_trip_is_exact_for_mixed_dtypes_and_layouts():
    weights = mixed_weights()
    layout = tensor_layout(weights)
    assert all(offset % 64 == 0 for offset in layout["offsets"])  # a 10-byte bf16 tensor must not misalign the next
    assert layout["nbytes"] >= sum(t.numel() * t.element_size() for t in weights.values())
    unpacked = dict(unpack_tensors(pack_tensors(weights)))
    assert list(unpacked) == list(weights)
    for name, tensor in weights.items():
        assert unpacked[name].dtype == tensor.dtype and unpacked[name].shape == tensor.shape
        assert torch.equal(unpacked[name], tensor), name


def test_shared_buffer_written_by_one_mapping_is_read_by_another(tmp_path):
    """The frontend writes the persistent buffer, the worker maps the same file once and reads every
    later update through that mapping (MAP_SHARED): the second update must be visible to it. (Mapped
    with shared=False, the reader kept seeing stale bytes and this test failed.)"""
    weights = mixed_weights()
    layout = tensor_layout(weights)
    path = tmp_path / "weights"
    path.write_bytes(bytes(layout["nbytes"]))
    writer = map_shared_file(str(path), layout["nbytes"])
    reader = map_shared_file(str(path), layout["nbytes"])  # mapped before anything is written
    for scale in (1.0, -3.0):
        write_tensors(writer, {name: tensor * scale for name, tensor in weights.items()}, layout)
        for name, view in tensor_views(reader, layout):
            assert torch.equal(view, weights[name] * scale), (name, scale)
