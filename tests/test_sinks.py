"""Where a run's numbers go and where its prompts come from: TensorBoard and W&B carry what
metrics.jsonl carries, a `datasets` directory is a task, and a Ray replica set spreads groups by load.
(Every other pipeline test turns TensorBoard off, and none used W&B or `task.kind: hf_dataset`.)"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import pytest

from parityrl.batch import Sample
from parityrl.config import load_config
from parityrl.engines.ray_replicas import ReplicaSet
from parityrl.metrics import MetricsLogger, read_metrics


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of `tag` as TensorBoard reads the run (its purge-on-resume rules applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def wandb_offline_history(run_dir: Path) -> list[dict[str, float]]:
    """The history rows of the offline W&B run under `run_dir`, read from its .wandb file: wandb's
    record log (a 7-byte file header, then 32 kB blocks of records with a 7-byte header each: CRC,
    length, chunk type), each record a `wandb_internal_pb2.Record`. wandb ships no reader for it."""
    from wandb.proto import wandb_internal_pb2

    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    data, position, chunk, rows = files[0].read_bytes(), 7, b"", []
    block = 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # the rest of a block too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_a_run_from_a_datasets_directory_logs_the_same_numbers_to_jsonl_tensorboard_and_wandb(tiny_model_dir, tmp_path, monkeypatch):
    from datasets import Dataset

    from parityrl.pipeline import run_training

    dataset_dir = tmp_path / "addition"
    rows = [{"question": f"{a}+{b}=", "solution": str(a + b)} for a in range(10, 40) for b in range(10, 12)]
    Dataset.from_list(rows).save_to_disk(str(dataset_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = load_config(None, [
        "engine.kind=reference", f"model.path={tiny_model_dir}", "task.kind=hf_dataset", f"task.path={dataset_dir}",
        "task.prompt_field=question", "task.answer_field=solution", "task.eval_size=8", "train.steps=3", "train.prompts_per_step=2",
        "sampling.n=4", "train.eval_every=2", "logging.tensorboard=true", "logging.wandb=true",
    ])  # fmt: skip
    run_dir = tmp_path / "run"
    summary = asyncio.run(run_training(config, run_dir))
    assert summary["steps"] == 3

    logged = {r["step"]: r for r in read_metrics(run_dir) if r["step"] > 0}
    assert sorted(logged) == [1, 2, 3]
    for tag in ("rl/reward", "parity/kl", "train/loss"):
        expected = {step: row[tag] for step, row in logged.items()}
        assert tensorboard_scalars(run_dir / "tb", tag) == pytest.approx(expected, rel=1e-6), tag  # TensorBoard stores float32
        history = {row["_step"]: row[tag] for row in wandb_offline_history(run_dir) if tag in row}
        assert history == pytest.approx(expected, rel=1e-12), tag
    eval_steps = [r["step"] for r in read_metrics(run_dir) if "eval/success" in r]
    assert tensorboard_scalars(run_dir / "tb", "eval/success").keys() == set(eval_steps)


def test_tensorboard_after_a_resume_shows_each_step_once_with_the_new_value(tmp_path):
    first = MetricsLogger(tmp_path, tensorboard=True)
    for step in (1, 2, 3, 4):
        first.log(step, {"rl/reward": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, tensorboard=True, purge_step=3)  # resumed from the checkpoint of step 2
    for step in (3, 4, 5):
        resumed.log(step, {"rl/reward": 10.0 * step})
    resumed.close()
    assert tensorboard_scalars(tmp_path / "tb", "rl/reward") == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0, 5: 50.0}


class HeldReplica:
    """A replica whose requests finish when the test says: enough to watch the routing."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future] = []

    async def generate(self, prompt_token_ids, sampling, request_id) -> list[Sample]:
        done = asyncio.get_running_loop().create_future()
        self.waiting.append(done)
        await done
        return [Sample(prompt_token_ids, [5, 6], [-1.0, -1.0], [0, 0])]


def test_replica_set_sends_each_group_to_the_replica_with_the_fewest_outstanding_groups():
    async def scenario() -> None:
        replicas = [HeldReplica() for _ in range(3)]
        engine = ReplicaSet(replicas)  # type: ignore[arg-type]

        async def started(count: int) -> list[asyncio.Task]:
            tasks = [asyncio.create_task(engine.generate([1, 2], None, f"g{i}")) for i in range(count)]
            await asyncio.sleep(0)
            return tasks

        first = await started(4)  # 3 replicas idle -> 0, 1, 2 (ties by index), then 0 again
        assert engine.outstanding == [2, 1, 1]
        replicas[1].waiting[0].set_result(None)
        replicas[2].waiting[0].set_result(None)
        finished = await asyncio.gather(first[1], first[2])
        assert [s.replica for group in finished for s in group] == [1, 2]
        assert engine.outstanding == [2, 0, 0]
        second = await started(3)  # the idle ones first: 1, 2, then the least loaded of [2, 1, 1]: 1
        assert engine.outstanding == [2, 2, 1]
        assert [len(r.waiting) for r in replicas] == [2, 3, 2]
        for replica in replicas:
            for future in replica.waiting:
                if not future.done():
                    future.set_result(None)
        await asyncio.gather(*first, *second)
        assert engine.outstanding == [0, 0, 0] and engine.samples_per_replica == [2, 3, 2]

    asyncio.run(scenario())
