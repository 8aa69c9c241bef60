"""`train.device` and the ray-backend options, without a GPU, vLLM or Ray: where the trainer puts its
model, optimizer state, batches and exported weights; which CPUs each engine replica gets; which
scale-out configs are refused."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from parityrl.assets import build_model, build_tokenizer
from parityrl.batch import Sample, pack_samples
from parityrl.config import ConfigError, load_config
from parityrl.hardware import cpu_thread_binding, resolve_device
from parityrl.train.trainer import Trainer

# -- resolve_device ---------------------------------------------------------------------------------


def test_auto_follows_cuda_availability(monkeypatch):
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"train\.device=cuda.*no CUDA device.*train\.device: cpu or auto"):
        resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


# -- the trainer on train.device=cpu ------------------------------------------------------------------


def _samples(tokenizer, replicas=(0, 1)) -> list[Sample]:
    prompt = tokenizer("12+34=", add_special_tokens=False)["input_ids"]
    completion = tokenizer("46", add_special_tokens=False)["input_ids"]
    return [Sample(prompt, completion, [-1.0] * len(completion), [0] * len(completion), replica=r) for r in replicas]


def test_trainer_on_cpu_keeps_params_optimizer_state_and_exports_on_cpu(tmp_path):
    config = load_config(None, ["train.device=cpu", "train.objective=grpo"])
    tokenizer = build_tokenizer(tmp_path)
    build_model(config, tokenizer, tmp_path)
    trainer = Trainer(config, tmp_path, pad_id=tokenizer.pad_token_id)
    assert trainer.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())

    metrics = trainer.step(_samples(tokenizer), torch.tensor([1.0, -1.0]))
    assert metrics["train/skipped_steps"] == 0 and trainer.version == 1
    state = trainer.optimizer.state
    assert state, "AdamW has no state after a step"
    for per_param in state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                assert value.device.type == "cpu"

    exported = trainer.state_dict_for_engines()
    params = dict(trainer.model.named_parameters())
    assert exported and all(t.device.type == "cpu" and t.is_contiguous() for t in exported.values())
    for name, tensor in exported.items():  # copies: the trainer can keep stepping while engines load them
        if name in params:
            assert tensor.data_ptr() != params[name].data_ptr()
            assert torch.equal(tensor, params[name].detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
def test_trainer_on_cuda_steps_on_the_gpu_and_exports_cpu_tensors(tmp_path):
    config = load_config(None, ["train.device=cuda", "train.objective=grpo"])
    tokenizer = build_tokenizer(tmp_path)
    build_model(config, tokenizer, tmp_path)
    trainer = Trainer(config, tmp_path, pad_id=tokenizer.pad_token_id)
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    metrics = trainer.step(_samples(tokenizer), torch.tensor([1.0, -1.0]))
    assert metrics["train/skipped_steps"] == 0
    assert all(v.device.type == "cuda" for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step")
    assert all(t.device.type == "cpu" for t in trainer.state_dict_for_engines().values())  # engines load host tensors


def test_packed_batch_to_keeps_every_field(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    samples = _samples(tokenizer, replicas=(1, 0)) + [Sample([5, 6], [7], [-0.5], [3])]  # last: no replica
    packed = pack_samples(samples, tokenizer.pad_token_id)
    moved = packed.to("cpu")
    assert type(moved) is type(packed)
    for field in dataclasses.fields(packed):
        before, after = getattr(packed, field.name), getattr(moved, field.name)
        assert after.device.type == "cpu" and after.dtype == before.dtype, field.name
        assert torch.equal(before, after), field.name
    assert moved.replica.tolist() == [1, 0, -1]
    assert moved.version_per_token[2, 0].item() == 3


# -- engine replicas' CPU binding ------------------------------------------------------------------------


def test_replica_cpu_binding_counts_down_from_the_last_cpu_and_wraps(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert [cpu_thread_binding(1, r) for r in range(6)] == ["3", "2", "1", "0", "3", "2"]
    assert cpu_thread_binding(2, 0) == "2,3" and cpu_thread_binding(2, 1) == "0,1" and cpu_thread_binding(2, 2) == "2,3"
    assert cpu_thread_binding(8, 0) == "0,1,2,3"  # never more threads than allowed CPUs

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 9}, raising=False)  # affinity, not 0..n-1
    assert [cpu_thread_binding(1, r) for r in range(3)] == ["9", "4", "9"]


def test_core_split_separates_shares_while_the_engine_idles_and_restores():
    """`CoreSplit` on CPU: every thread of this process (one started inside too) off the engine's cores,
    all cores while the engine idles (train.threads: auto), the original affinity and thread count
    afterwards. Broken once: without the restore in `__exit__` the last affinity assertion fails."""
    import threading

    from parityrl.hardware import CoreSplit, cpu_ids

    assert cpu_ids("1") == {1} and cpu_ids("2-3") == {2, 3} and cpu_ids("0,3") == {0, 3}
    assert cpu_ids("auto") is None and cpu_ids("nobind") is None
    original, threads_before = os.sched_getaffinity(0), torch.get_num_threads()
    if len(original) < 2:
        pytest.skip("needs two CPUs")
    engine_cpu = max(original)
    trainer_cpus = original - {engine_cpu}
    inside: dict[str, set[int]] = {}
    with CoreSplit(str(engine_cpu), [], threads=len(trainer_cpus), adaptive=True) as split:
        worker = threading.Thread(target=lambda: inside.setdefault("thread", os.sched_getaffinity(0)))
        worker.start()
        worker.join()
        assert os.sched_getaffinity(0) == trainer_cpus and inside["thread"] == trainer_cpus
        assert split.update(engine_idle_frac=0.4) == len(trainer_cpus)  # between the thresholds: no change
        assert split.update(engine_idle_frac=0.9) == len(original) and os.sched_getaffinity(0) == original
        assert split.update(engine_idle_frac=0.1) == len(trainer_cpus) and os.sched_getaffinity(0) == trainer_cpus
    assert os.sched_getaffinity(0) == original and torch.get_num_threads() == threads_before


def test_core_split_gives_the_core_back_when_sharing_does_not_pay():
    """A sharing trial whose steps are not faster than the separate steps before it ends, and no new
    trial starts for HOLD_STEPS steps, however idle the engine looks; a trial that pays goes on. (Without
    the trial the demo shared after each evaluation and lost 0.24 s per step; broken once by judging
    the trial against the wrong side of PAYS_BELOW: the first block of assertions failed.)"""
    from parityrl.hardware import CoreSplit

    original = os.sched_getaffinity(0)
    if len(original) < 2:
        pytest.skip("needs two CPUs")
    engine_cpu = max(original)
    trainer_cpus = original - {engine_cpu}
    separate, shared = len(trainer_cpus), len(original)
    with CoreSplit(str(engine_cpu), [], threads=separate, adaptive=True) as split:
        for _ in range(split.TRIAL_STEPS):
            assert split.update(engine_idle_frac=0.3, step_s=0.20) == separate
        assert split.update(engine_idle_frac=0.6, step_s=0.20) == shared  # trial starts
        for _ in range(split.TRIAL_STEPS - 1):
            assert split.update(engine_idle_frac=0.4, step_s=0.30) == shared
        assert split.update(engine_idle_frac=0.4, step_s=0.30) == separate  # slower than 3 x 0.20: back
        for _ in range(split.HOLD_STEPS):
            assert split.update(engine_idle_frac=0.9, step_s=0.20) == separate  # held
        assert split.update(engine_idle_frac=0.9, step_s=0.20) == shared  # a new trial, judged on 3 x 0.20
        for _ in range(split.TRIAL_STEPS + 5):
            assert split.update(engine_idle_frac=0.4, step_s=0.10) == shared  # it pays: sharing goes on
        assert split.update(engine_idle_frac=0.1, step_s=0.10) == separate  # the engine got busy
    fixed = CoreSplit(str(engine_cpu), [], threads=len(original), adaptive=False)  # more threads than left: shares on purpose
    with fixed:
        assert not fixed.active and os.sched_getaffinity(0) == original
    with CoreSplit("auto", [], threads=1, adaptive=True) as nothing:  # no explicit binding: nothing to split
        assert not nothing.active and nothing.update(0.9) == torch.get_num_threads()


# -- RunConfig validation of the ray options ------------------------------------------------------------


@pytest.mark.parametrize("override", ["engine.replicas=2", "train.world_size=2"])
def test_scale_out_with_the_local_backend_is_refused(override):
    with pytest.raises(ConfigError, match=r"pipeline\.backend: ray"):
        load_config(None, [override])


def test_samples_per_step_must_split_over_world_size():
    # defaults: 8 prompts x 8 samples = 64
    with pytest.raises(ConfigError, match=r"64 samples per step.*train\.world_size=3"):
        load_config(None, ["pipeline.backend=ray", "train.world_size=3"])
    config = load_config(None, ["pipeline.backend=ray", "train.world_size=4", "engine.replicas=2"])
    assert (config.train.world_size, config.engine.replicas) == (4, 2)


def test_ray_resources_parse_from_set():
    config = load_config(
        None,
        ["pipeline.backend=ray", "ray.address=HEAD_IP:6379", "ray.engine_resources={engines: 1}", "ray.trainer_resources={trainers: 1}"],
    )
    assert config.ray.address == "HEAD_IP:6379"
    assert config.ray.engine_resources == {"engines": 1.0} and config.ray.trainer_resources == {"trainers": 1.0}


def test_threads_auto_resolves_to_counts_for_local_runs_and_ray_ranks():
    """`train.threads: auto` must turn into a number wherever threads are counted: the local trainer
    (the cores the engine leaves), a Ray rank (1) and the Ray CPU budget. Broken once: the Ray CPU
    budget multiplied the string 'auto' (TypeError when a Ray run started)."""
    from parityrl.cluster import logical_cpus_needed
    from parityrl.hardware import rank_threads, trainer_threads
    from parityrl.train.distributed import actor_resources

    config = load_config(None, ["pipeline.backend=ray", "engine.replicas=2", "train.world_size=2", "train.prompts_per_step=8"])
    assert config.train.threads == "auto"
    assert trainer_threads(config.train, cores=2, engine_threads=1) == 1 and trainer_threads(config.train, cores=8, engine_threads=2) == 6
    assert rank_threads(config.train) == 1 and logical_cpus_needed(config) == 2 * 1 + 2 * 1
    assert actor_resources(config)["num_cpus"] == 1
    fixed = load_config(None, ["train.threads=3"])
    assert trainer_threads(fixed.train, cores=2, engine_threads=1) == 3 and rank_threads(fixed.train) == 3


def test_the_trainer_step_runs_with_the_thread_count_the_core_split_set():
    """torch's thread count belongs to each thread: an executor thread that has computed once keeps its
    count, so `torch.set_num_threads` in the loop's thread never reached `trainer.step` (the demo's
    "2 threads" steps ran on 1). `with_torch_threads` carries the count into the executor thread; without
    it this test sees 1 thread in the second call."""
    import asyncio

    from parityrl.hardware import with_torch_threads

    before = torch.get_num_threads()

    async def counts() -> tuple[int, int]:
        torch.set_num_threads(1)
        first = await asyncio.to_thread(with_torch_threads, torch.get_num_threads(), torch.get_num_threads)
        torch.set_num_threads(2)  # what CoreSplit does when the trainer takes the engine's core
        second = await asyncio.to_thread(with_torch_threads, torch.get_num_threads(), torch.get_num_threads)
        return first, second

    try:
        assert asyncio.run(counts()) == (1, 2)
    finally:
        torch.set_num_threads(before)


def test_thread_count_follows_the_engine_within_a_step():
    """`follow_thread_count`: the count is set before each decoder layer's forward and again in the
    backward pass, in the step's own thread, so the trainer can take the engine's core when the engine
    stops generating halfway through a step. Each call records the count in force when it ran: every
    call after the first sees the count the previous one set (the forward and backward passes call it
    once per layer each)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from parityrl.train.trainer import follow_thread_count

    before = torch.get_num_threads()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2))
    calls: list[tuple[int, int]] = []

    def threads_now() -> int:
        wanted = 1 + len(calls) % 2
        calls.append((wanted, torch.get_num_threads()))
        return wanted

    handles = follow_thread_count(model, threads_now)
    try:
        torch.set_num_threads(2)
        model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
        assert len(calls) == 6  # 3 layers: a forward pre-hook and a gradient hook each
        assert all(seen == calls[i - 1][0] for i, (_, seen) in enumerate(calls) if i > 0)
        for handle in handles:
            handle.remove()
        model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
        assert len(calls) == 6
    finally:
        torch.set_num_threads(before)
