"""The byte layouts that carry weights to the vLLM worker (`engines/vllm_worker.py`), without vLLM."""

from __future__ import annotations

import os

import pytest
import torch

from parityrl.engines.base import weight_specs
from parityrl.engines.vllm_worker import (
    NamelessSharedBuffer,
    layout_of_specs,
    map_shared_file,
    pack_tensors,
    tensor_layout,
    tensor_views,
    unpack_tensors,
    write_tensors,
)


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
    """The frontend writes the buffer, the worker reads it through its own mapping of the same file
    (MAP_SHARED), mapped before anything is written: every write must be visible to it. (Mapped with
    shared=False, the reader kept seeing stale bytes and this test failed.)"""
    weights = mixed_weights()
    layout = tensor_layout(weights)
    path = tmp_path / "weights"
    path.write_bytes(bytes(layout["nbytes"]))
    writer = map_shared_file(str(path), layout["nbytes"])
    reader = map_shared_file(str(path), layout["nbytes"])  # mapped before anything is written
    for scale in (1.0, -3.0):
        write_tensors(writer, ((name, tensor * scale) for name, tensor in weights.items()), layout)
        for name, view in tensor_views(reader, layout):
            assert torch.equal(view, weights[name] * scale), (name, scale)


def test_chunked_weights_land_by_name_whatever_order_they_arrive_in():
    """Chunked publication (`WeightChunks`): the buffer is laid out from the specs before any tensor
    arrives, then filled as chunks come; a chunk that never comes is an error, not zero weights."""
    weights = mixed_weights()
    specs = weight_specs(weights)
    layout = layout_of_specs(specs)
    assert layout == tensor_layout(weights)
    buffer = torch.zeros(layout["nbytes"], dtype=torch.uint8)
    write_tensors(buffer, reversed(list(weights.items())), layout)
    for name, view in tensor_views(buffer, layout):
        assert torch.equal(view, weights[name]), name
    with pytest.raises(ValueError, match="never came"):
        write_tensors(buffer, list(weights.items())[:-1], layout)


def test_update_buffer_has_no_name_and_nothing_outlives_a_killed_writer(tmp_path):
    """The `shm` transport's buffer is mapped by another process through its path while the writer
    holds it, yet never has a name in the directory: a writer SIGKILLed mid-update leaves nothing there.
    (A named buffer outlived a run killed mid-update: CI found it in /dev/shm; this test failed then.)"""
    import signal
    import subprocess
    import sys

    script = (
        "import sys, time, torch\n"
        "from parityrl.engines.vllm_worker import NamelessSharedBuffer\n"
        f"buffer = NamelessSharedBuffer(4096, {str(tmp_path)!r}, prefix='parityrl-weights-')\n"
        "buffer.tensor[:4] = torch.tensor([7, 1, 2, 9], dtype=torch.uint8)\n"
        "print(buffer.path, flush=True)\n"
        "time.sleep(600)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        path = writer.stdout.readline().strip()
        assert path, "the writer died before it made its buffer"
        assert list(tmp_path.iterdir()) == [], "the buffer has a name another run's crash would leave behind"
        reader = map_shared_file(path, 4096)  # what the vLLM worker does with the path it is sent
        assert reader[:4].tolist() == [7, 1, 2, 9]
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    assert list(tmp_path.iterdir()) == []
    assert reader[:4].tolist() == [7, 1, 2, 9]  # a mapping keeps the memory alive after its writer is gone

    buffer = NamelessSharedBuffer(64, str(tmp_path), prefix="parityrl-weights-")
    fd = buffer.fd
    buffer.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the memory goes once the worker drops its mapping


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def test_check_perturbs_a_tied_embedding_and_head_alike():
    """`check`'s stand-in for an optimiser step must keep tied weights tied: vLLM loads only the
    embedding of a tied pair and the trainer the last name, so noised apart they ran different heads
    (post_update/kl 2.4e-4 on a tied Llama, 2.4e-14 once tied)."""
    from parityrl.parity.check import perturbed_weights

    perturbed = perturbed_weights(tied_llama(), scale=0.05, seed=3)
    assert torch.equal(perturbed["lm_head.weight"], perturbed["model.embed_tokens.weight"])
    assert not torch.equal(perturbed["lm_head.weight"], tied_llama().lm_head.weight)  # it does perturb


def test_file_transport_stages_tied_weights(tmp_path):
    """safetensors refuses two names on one tensor; the `file` transport must still ship a tied model."""
    from safetensors.torch import load_file

    from parityrl.config import EngineConfig
    from parityrl.engines.vllm import VLLMEngine

    model = tied_llama()
    engine = VLLMEngine(tmp_path, "float32", EngineConfig(weight_update="reload"), seed=0)
    assert engine.weight_transport == "file"
    method, path = engine._stage_weights(model.state_dict(), str(tmp_path))
    loaded = load_file(path)
    assert method == "parityrl_load_weights_file" and set(loaded) == set(model.state_dict())
    assert torch.equal(loaded["lm_head.weight"], model.lm_head.weight)
