"""Run directories: an existing run is never overwritten by accident, and a resume keeps what the run is."""

from __future__ import annotations

import pytest

from parityrl.cli import write_resolved_config
from parityrl.config import load_config
from parityrl.errors import UserError
from parityrl.metrics import truncate_metrics
from parityrl.rundir import clear_run, refuse_existing_run, resume_config


def test_resume_reads_the_saved_config_and_refuses_overrides_that_change_the_run(tmp_path):
    write_resolved_config(load_config(None, ["train.lr=3e-5", "sampling.temperature=0.7"]), tmp_path)
    config = resume_config(tmp_path, ["train.steps=300", "logging.tensorboard=false", "engine.max_restarts=5"])
    assert (config.train.lr, config.sampling.temperature, config.train.steps, config.engine.max_restarts) == (3e-5, 0.7, 300, 5)
    # the layout may change (optimizer state is kept by parameter name): two FSDP2 ranks on Ray
    config = resume_config(tmp_path, ["pipeline.backend=ray", "train.world_size=2", "train.fsdp=true", "engine.replicas=2"])
    assert (config.train.world_size, config.train.fsdp, config.engine.replicas, config.train.lr) == (2, True, 2, 3e-5)
    with pytest.raises(UserError, match="sampling.temperature, train.lr would change what the run is"):
        resume_config(tmp_path, ["sampling.temperature=1.0", "train.lr=1e-3"])
    with pytest.raises(UserError, match="no config.yaml"):
        resume_config(tmp_path / "elsewhere", [])


def test_existing_run_is_refused_unless_overwrite_which_deletes_only_the_runs_files(tmp_path):
    refuse_existing_run(tmp_path, overwrite=False)  # empty: fine
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--resume"):
        refuse_existing_run(tmp_path, overwrite=False)
    refuse_existing_run(tmp_path, overwrite=True)
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_truncate_metrics_keeps_each_step_once_and_drops_a_torn_line(tmp_path):
    lines = ['{"step": 0, "eval/success": 0.5}', '{"step": 1}', '{"step": 2}', '{"step": 3}', '{"step": 4, "x"']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert truncate_metrics(tmp_path, 2) == 3
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:3]
