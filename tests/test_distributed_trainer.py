"""Data-parallel ranks take the same optimiser step as one process on the whole batch: two gloo ranks
(the code path of `pipeline.backend: ray`, without Ray) against a local Trainer, same samples."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parityrl.assets import build_model, build_tokenizer
from parityrl.batch import Sample
from parityrl.config import load_config
from parityrl.train.trainer import Trainer, global_normaliser

pytestmark = pytest.mark.unit

OVERRIDES = ["train.objective=grpo", "train.lr=1e-3", "train.grad_clip=0.05", "train.micro_batch_size=2"]


def batch(pad_id: int) -> tuple[list[Sample], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    samples = []
    for row in range(8):
        completion = torch.randint(4, 100, (3 + row % 3,), generator=generator).tolist()
        old = (-torch.rand(len(completion), generator=generator) * 3).tolist()
        samples.append(Sample([1, 20 + row, 21], completion, old, [0] * len(completion)))
    return samples, torch.linspace(-1, 1, 8)


def rank_main(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    config = load_config(None, [*OVERRIDES, "train.device=cpu"])
    trainer = Trainer(config, model_dir, pad_id=0, distributed=True)
    samples, advantages = batch(0)
    shard = len(samples) // world_size
    normaliser = global_normaliser(samples, config.train.objective)
    result = trainer.step_stats(samples[rank * shard : (rank + 1) * shard], advantages[rank * shard : (rank + 1) * shard], None, normaliser)
    if rank == 0:
        torch.save({"weights": trainer.model.state_dict(), "grad_norm": result.grad_norm}, os.path.join(out_dir, "rank0.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_step_like_one_process_on_the_whole_batch(tmp_path):
    config = load_config(None, [*OVERRIDES, "train.device=cpu"])  # the ranks' device: on a GPU machine `auto` would be cuda
    tokenizer = build_tokenizer(tmp_path / "model")
    build_model(config, tokenizer, tmp_path / "model")
    local = Trainer(config, tmp_path / "model", pad_id=0)
    samples, advantages = batch(0)
    local_metrics = local.step(samples, advantages)
    mp.spawn(rank_main, args=(2, free_port(), str(tmp_path / "model"), str(tmp_path)), nprocs=2, join=True)
    ranked = torch.load(tmp_path / "rank0.pt")
    # the clip (0.05) is active: a gradient off by the world size would clip differently and show here
    assert ranked["grad_norm"] == pytest.approx(local_metrics["train/grad_norm"], rel=1e-5)
    assert local_metrics["train/grad_norm"] > 0.05
    # atol 1e-5 = 1% of one Adam step (lr 1e-3): Adam divides by |g|, so an entry whose gradient is ~1e-8
    # moves by up to lr when the ranks sum in another order; a wrong loss scale moves every entry by ~lr
    for name, tensor in local.model.state_dict().items():
        torch.testing.assert_close(ranked["weights"][name], tensor, rtol=1e-5, atol=1e-5)
