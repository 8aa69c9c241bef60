"""Trainer ranks take the same optimiser step as one process on the whole batch: two gloo ranks (the
code path of `pipeline.backend: ray`, without Ray), DDP or FSDP2, against a local Trainer, same
samples; and a checkpoint written by one layout resumes in another (1 -> 2 and 2 -> 1 ranks, FSDP2).
Then the Ray path (`DistributedTrainer`, two FSDP2 ranks as actors): a rank made to raise, or to hang
before a collective, stops the call with one paragraph naming it, within `train.collective_timeout_s`."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parityrl.assets import build_model, build_tokenizer
from parityrl.batch import Sample
from parityrl.config import load_config
from parityrl.policy import export_chunks, export_state_dict
from parityrl.train.checkpoint import RunState
from parityrl.train.distributed import DEADLINE_MARGIN_S, DistributedTrainer, RankFailed, TrainerRank, actor_resources
from parityrl.train.trainer import Trainer, global_normaliser

pytestmark = pytest.mark.ray

# 14 tokens per micro-batch: rank 0's half of the batch packs into 2 micro-batches, rank 1's into 3
# (sequences of 6-8 tokens), so FSDP must even the counts out or its collectives wait forever
OVERRIDES = ["train.objective=grpo", "train.lr=1e-3", "train.grad_clip=0.05", "train.micro_batch_size=2", "train.micro_batch_tokens=14", "train.device=cpu"]


def batch(seed: int) -> tuple[list[Sample], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for row in range(8):
        completion = torch.randint(4, 100, (3 + row % 3,), generator=generator).tolist()
        old = (-torch.rand(len(completion), generator=generator) * 3).tolist()
        samples.append(Sample([1, 20 + row, 21], completion, old, [0] * len(completion)))
    return samples, torch.linspace(-1, 1, 8) * (1 if seed == 0 else -0.5)


def config_for(fsdp: bool):
    layout = ["train.world_size=2", "pipeline.backend=ray"] if fsdp else []
    return load_config(None, [*OVERRIDES, f"train.fsdp={fsdp}", *layout])


def rank_step(trainer: Trainer, rank: int, world_size: int, seed: int):
    samples, advantages = batch(seed)
    shard = len(samples) // world_size
    normaliser = global_normaliser(samples, trainer.config.train.objective)
    return trainer.step_stats(samples[rank * shard : (rank + 1) * shard], advantages[rank * shard : (rank + 1) * shard], None, normaliser)


def rank_main(rank: int, world_size: int, port: int, fsdp: bool, model_dir: str, out_dir: str, plan: str) -> None:
    """One rank: `plan` is `step` (one step, then the weights), `save` (one step, then a checkpoint) or
    `resume` (the optimizer from `model_dir`'s checkpoint, then a step on the second batch)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    config = config_for(fsdp).model_copy(update={"train": config_for(fsdp).train.model_copy(update={"world_size": world_size})})
    trainer = Trainer(config, Path(model_dir), pad_id=0, distributed=True)
    out = Path(out_dir)
    if plan == "resume":
        trainer.load_checkpoint(Path(model_dir))
    result = rank_step(trainer, rank, world_size, seed=1 if plan == "resume" else 0)
    if plan == "save":
        trainer.save_checkpoint(out / "run", RunState(step=1, version=1, sampler_state=None))
    # as a publication: gathered one decoder layer at a time on every rank when sharded, kept by rank 0
    chunks = list(export_chunks(trainer.model, keep=rank == 0))
    assert rank == 0 or chunks == [], "only the publishing rank keeps chunks"
    weights = {name: tensor for chunk in chunks for name, tensor in chunk.items()}
    layer = trainer.model.model.layers[0].mlp.up_proj.weight
    local = layer.to_local() if hasattr(layer, "to_local") else layer
    if rank == 0:
        saved = {"weights": weights, "chunk_names": [list(chunk) for chunk in chunks], "grad_norm": result.grad_norm}
        torch.save(saved | {"layer_local_rows": local.shape[0], "layer_rows": layer.shape[0]}, out / f"{plan}.pt")
    # both ranks past their last collective before either tears gloo down: in a loaded CI run rank 1
    # destroyed its group while rank 0 was still saving and aborted ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


def spawn_ranks(*args, world_size: int = 2, timeout_s: float = 300) -> None:
    """`rank_main` on `world_size` processes; a rank that waits on a collective forever fails the test."""
    context = mp.spawn(rank_main, args=(world_size, free_port(), *args), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks still running after {timeout_s:.0f} s (a collective that some rank never joined)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_model(tmp_path: Path) -> Path:
    config = load_config(None, OVERRIDES)
    build_model(config, build_tokenizer(tmp_path / "model"), tmp_path / "model")
    return tmp_path / "model"


def assert_same_weights(actual: dict, expected: dict) -> None:
    # atol 1e-5 = 1% of one Adam step (lr 1e-3): Adam divides by |g|, so an entry whose gradient is ~1e-8
    # moves by up to lr when the ranks sum in another order; a wrong loss scale moves every entry by ~lr
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_ranks_step_like_one_process_on_the_whole_batch(tmp_path, fsdp):
    model_dir = tiny_model(tmp_path)
    local = Trainer(config_for(False), model_dir, pad_id=0)
    samples, advantages = batch(0)
    local_metrics = local.step(samples, advantages)
    spawn_ranks(fsdp, str(model_dir), str(tmp_path), "step")
    ranked = torch.load(tmp_path / "step.pt")
    # the clip (0.05) is active: a gradient off by the world size would clip differently and show here
    assert ranked["grad_norm"] == pytest.approx(local_metrics["train/grad_norm"], rel=1e-5)
    assert local_metrics["train/grad_norm"] > 0.05
    assert_same_weights(ranked["weights"], export_state_dict(local.model))
    # published one decoder layer per chunk (every other tensor alone), so no rank holds the whole export
    layers = local.model.config.num_hidden_layers
    layer_chunks = [names for names in ranked["chunk_names"] if names[0].startswith("model.layers.")]
    assert [{name.split(".")[2] for name in names} for names in layer_chunks] == [{str(i)} for i in range(layers)]
    assert all(len(names) == 1 for names in ranked["chunk_names"] if not names[0].startswith("model.layers."))
    # FSDP really shards: rank 0 holds half of each layer weight's rows; DDP the whole weight
    assert ranked["layer_local_rows"] == (ranked["layer_rows"] // 2 if fsdp else ranked["layer_rows"])


def test_a_checkpoint_resumes_on_another_number_of_ranks(tmp_path):
    """One process steps, checkpoints and steps again: the reference. Two FSDP ranks resume from its
    checkpoint (1 -> 2) and step: the same weights. Two FSDP ranks step and checkpoint; one process
    resumes from that (2 -> 1) and steps: the same weights again. A lost or misplaced optimizer shard
    (the AdamW moments) would move the second step's weights by ~lr."""
    model_dir = tiny_model(tmp_path)
    reference = Trainer(config_for(False), model_dir, pad_id=0)
    reference.step(*batch(0))
    one_rank = reference.save_checkpoint(tmp_path / "one", RunState(step=1, version=1, sampler_state=None))
    reference.step(*batch(1))
    expected = export_state_dict(reference.model)

    spawn_ranks(True, str(one_rank), str(tmp_path), "resume")  # 1 -> 2
    assert_same_weights(torch.load(tmp_path / "resume.pt")["weights"], expected)

    spawn_ranks(True, str(model_dir), str(tmp_path), "save")
    two_ranks = tmp_path / "run" / "checkpoints" / "step_000001"
    assert sorted(p.name for p in (two_ranks / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # a file per rank
    resumed = Trainer(config_for(False), two_ranks, pad_id=0)  # 2 -> 1
    resumed.load_checkpoint(two_ranks)
    resumed.step(*batch(1))
    assert_same_weights(export_state_dict(resumed.model), expected)


# -- a rank that fails or hangs, through Ray (`DistributedTrainer`) -------------------------------------
# The rank classes below reach the actors by name: the Ray fixture puts tests/ on the workers' PYTHONPATH.


class FailsInStep(TrainerRank):
    """Rank 1 raises in its step; rank 0 goes on into the step's first collective and waits there."""

    def step(self, *args):
        if self.rank == 1:
            raise ValueError("rank 1 was made to fail")
        return super().step(*args)


class FailsInPublication(TrainerRank):
    """Rank 1 raises instead of taking part in the weights' gathers; rank 0 waits in the first one."""

    def weight_chunks(self):
        if self.rank == 1:
            raise ValueError("rank 1 was made to fail")
        return super().weight_chunks()


class HangsInStep(TrainerRank):
    """Rank 1 sleeps instead of stepping (until the actor is killed); rank 0 waits in a collective."""

    def step(self, *args):
        if self.rank == 1:
            time.sleep(3600)
        return super().step(*args)


@pytest.fixture(scope="module")
def ray_model(tmp_path_factory):
    """A local Ray instance (whose workers can import this module) and the tiny model's directory."""
    import ray

    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield tiny_model(tmp_path_factory.mktemp("ray"))
    finally:
        ray.shutdown()


def ray_ranks(model_dir: Path, rank_class: type[TrainerRank], collective_timeout_s: float) -> DistributedTrainer:
    layout = ["train.fsdp=true", "train.world_size=2", "pipeline.backend=ray"]
    config = load_config(None, [*OVERRIDES, *layout, f"train.collective_timeout_s={collective_timeout_s}"])
    return DistributedTrainer(config, model_dir, 0, actor_resources(config), rank_class=rank_class)


def within(seconds: float, call):
    """`call()`, failing the test if it has not returned or raised after `seconds` (it is left waiting on
    the ranks: closing the trainer kills them, which ends it)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as error:  # handed to the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the driver still waits on the ranks after {seconds:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def failure_of(trainer: DistributedTrainer, call, seconds: float) -> tuple[str, float]:
    """The one-paragraph error `call(trainer)` raises, and how long it took to come."""
    try:
        began = time.monotonic()
        with pytest.raises(RankFailed) as failure:
            within(seconds, lambda: call(trainer))
        elapsed = time.monotonic() - began
        with pytest.raises(RankFailed):  # the group is broken: a later call says so at once
            trainer.save_checkpoint(Path("unused"), RunState(step=1, version=1, sampler_state=None))
    finally:
        trainer.close()
    message = str(failure.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message, elapsed


@pytest.mark.parametrize(
    ("rank_class", "call", "what"),
    [
        (FailsInStep, lambda trainer: trainer.step(*batch(0)), "in a step"),
        (FailsInPublication, lambda trainer: trainer.state_dict_for_engines(), "while publishing the weights"),
    ],
    ids=["step", "publication"],
)
def test_a_rank_that_raises_is_named_at_once(ray_model, rank_class, call, what):
    """Rank 0 waits for rank 1 in a collective until the 120 s timeout; rank 1's error comes first."""
    message, elapsed = failure_of(ray_ranks(ray_model, rank_class, collective_timeout_s=120), call, seconds=60)
    assert f"trainer rank 1 of 2 failed {what}: ValueError: rank 1 was made to fail" in message
    assert elapsed < 30, f"{elapsed:.0f} s: the error waited for rank 0's collective to time out"


def test_a_rank_that_hangs_before_a_collective_is_named_within_the_timeout(ray_model):
    """Rank 0 gives up on the collective after train.collective_timeout_s (not torch's 30-minute
    default); the driver names rank 1, which never answered, and the setting to raise."""
    timeout = 10
    trainer = ray_ranks(ray_model, HangsInStep, collective_timeout_s=timeout)
    message, elapsed = failure_of(trainer, lambda trainer: trainer.step(*batch(0)), seconds=timeout + DEADLINE_MARGIN_S + 20)
    assert "trainer rank 1 of 2 did not answer in a step" in message, message
    assert "raise train.collective_timeout_s" in message, message
    assert timeout <= elapsed < timeout + DEADLINE_MARGIN_S, elapsed
