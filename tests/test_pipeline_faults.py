"""Faults the loop must survive or stop on cleanly, on the reference engine (fast, no vLLM):
non-finite steps are skipped and three in a row stop the run with a checkpoint; a reward that fails
on most samples stops it with one message naming the reward's error and the prompt."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import torch

from parityrl.batch import Sample
from parityrl.config import load_config
from parityrl.pipeline import RunStopped, run_training
from parityrl.train.checkpoint import latest_checkpoint, load_run_state
from parityrl.train.trainer import Trainer

TESTS = Path(__file__).resolve().parent


def reference_config(model_dir: Path, *extra: str):
    return load_config(
        None,
        [
            "engine.kind=reference",
            f"model.path={model_dir}",
            "train.steps=6",
            "train.prompts_per_step=2",
            "train.eval_every=3",
            "train.checkpoint_every=2",
            "sampling.n=4",
            "task.eval_size=16",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def test_trainer_skips_nonfinite_logprobs_and_gradients_without_touching_weights(tiny_model_dir):
    config = reference_config(tiny_model_dir)
    trainer = Trainer(config, tiny_model_dir, pad_id=0)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    good = Sample([1, 20, 21], [22, 23], [-1.0, -2.0], [0, 0])
    bad = Sample([1, 20, 21], [22, 23], [-1.0, float("nan")], [0, 0])
    metrics = trainer.step([good, bad], torch.tensor([1.0, -1.0]))
    assert metrics["train/skipped_steps"] == 1 and "NaN" in metrics["train/skip_reason"]
    # a NaN advantage makes the loss NaN: no optimiser step either
    metrics = trainer.step([good, good], torch.tensor([float("nan"), 1.0]))
    assert metrics["train/skipped_steps"] == 1 and "non-finite" in metrics["train/skip_reason"]
    assert trainer.version == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    metrics = trainer.step([good, good], torch.tensor([1.0, -1.0]))
    assert metrics["train/skipped_steps"] == 0 and trainer.version == 1


def test_three_nonfinite_steps_in_a_row_stop_the_run_with_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    # from the second step on, the engine "reports" a NaN logprob in every batch (as a diverged bf16
    # model does); the real Trainer.step must skip those steps and the loop stop after three
    real_step = Trainer.step

    def step_with_nan_from_engine(self, samples, advantages, probe=None):
        if self.version >= 1:
            samples[0].logprobs_old[0] = float("nan")
        return real_step(self, samples, advantages, probe)

    monkeypatch.setattr(Trainer, "step", step_with_nan_from_engine)
    config = reference_config(tiny_model_dir, "pipeline.mode=sync")
    with pytest.raises(RunStopped, match="3 steps in a row were skipped") as stopped:
        asyncio.run(run_training(config, tmp_path))
    assert "--resume" in str(stopped.value)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("train/skipped_steps") for r in steps if r["step"] > 0] == [0, 1, 1, 1]
    assert [r["version"] for r in steps if r["step"] > 0] == [1, 1, 1, 1]
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and load_run_state(checkpoint).step == 4


def test_failing_reward_stops_the_run_with_its_error_and_prompt(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.syspath_prepend(str(TESTS))
    assert str(TESTS) in sys.path
    config = reference_config(tiny_model_dir, "task.reward=rewards_for_tests:raises")
    with pytest.raises(RunStopped) as stopped:
        asyncio.run(run_training(config, tmp_path))
    message = str(stopped.value)
    assert "8 of 8 rewards failed" in message and "ValueError: cannot score" in message and "prompt '" in message
    assert latest_checkpoint(tmp_path) is not None


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_resume_continues(tiny_model_dir, tmp_path):
    import signal
    import subprocess
    import time

    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "parityrl.cli", "train", "--set", f"model.path={tiny_model_dir}", "--set", "engine.kind=reference",
        "--set", "train.steps=200", "--set", "train.eval_every=100", "--set", "task.eval_size=16",
        "--set", "logging.tensorboard=false", "--run-dir", str(run_dir), "--no-plot",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and sum(1 for _ in metrics.open()) >= 4):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 1 and "SIGTERM received" in output and "--resume" in output
    last_step = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert load_run_state(latest_checkpoint(run_dir)).step == last_step < 200  # stopped between steps, checkpointed there
    resumed = subprocess.run(
        [sys.executable, "-m", "parityrl.cli", "train", "--resume", str(run_dir), "--set", f"train.steps={last_step + 3}", "--no-plot"],
        capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert [s for s in steps if s > 0] == list(range(1, last_step + 4))


def test_weight_update_that_hangs_is_a_dead_engine_and_the_new_one_gets_the_weights(tiny_model_dir):
    """A hang during an update is invisible to the stall watchdog (generation is paused, nothing streams):
    `engine.update_timeout_s` must catch it, and the restarted engine must serve the update's weights."""
    import time

    from parityrl.engines import make_engine
    from parityrl.engines.supervisor import SupervisedEngine
    from parityrl.policy import load_policy

    config = reference_config(tiny_model_dir, "engine.update_timeout_s=2", "engine.stall_timeout_s=600", "sampling.max_new_tokens=4")
    built = []

    def factory():
        engine = make_engine(config, tiny_model_dir)
        if not built:  # the first incarnation hangs in its first update, holding the pause

            async def hang(state_dict, version):
                await asyncio.Event().wait()

            engine.update_weights = hang
        built.append(engine)
        return engine

    log: list[str] = []
    supervised = SupervisedEngine(factory, config.engine, log=log.append)
    state_dict = {name: tensor + 0.01 for name, tensor in load_policy(tiny_model_dir, "float32", False).state_dict().items()}

    async def update_then_generate():
        await supervised.start()
        try:
            started = time.monotonic()
            await supervised.update_weights(state_dict, 1)
            update_s = time.monotonic() - started
            samples = await supervised.generate([1, 20, 21], config.sampling, "g0")
        finally:
            await supervised.close()
        return update_s, samples

    update_s, samples = asyncio.run(update_then_generate())
    assert supervised.restarts == 1 and len(built) == 2, log
    assert supervised.failures == ["weight update v1 missed its 2 s deadline"]
    assert 2 <= update_s < 60  # the deadline, then a restart of a torch engine (seconds)
    assert built[1].version == 1 and samples[0].version_per_token[0] == 1
    loaded = built[1].model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state_dict.items())


def test_resume_without_a_finished_checkpoint_starts_over_and_logs_each_step_once(tiny_model_dir, tmp_path):
    """Killed while writing its first checkpoint (seen on SmolLM2: only `step_000001.tmp` was left), a run
    resumes from step 0; the step-0 evaluation and step 1 it had logged must not appear twice."""
    import shutil

    config = reference_config(tiny_model_dir, "train.steps=2", "train.checkpoint_every=1", "pipeline.mode=sync")
    asyncio.run(run_training(config, tmp_path))
    checkpoints = tmp_path / "checkpoints"
    shutil.rmtree(checkpoints / "step_000002")
    (checkpoints / "step_000001").rename(checkpoints / "step_000001.tmp")  # the write that was cut off
    asyncio.run(run_training(config, tmp_path, resume=True))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000001", "step_000002"]
