"""`pipeline.backend: ray` on this CPU: two vLLM engine replicas and two FSDP2 trainer ranks as Ray
actors, through the real CLI. One engine actor is killed mid-run: the run finishes, the replica comes
back with the current weights, every replica applied every version and each keeps engine/trainer
parity (the weights each publication gathers from the shards are the trainer's, to ~1e-9 in k3); the
run resumes from the checkpoint its ranks wrote. (DDP ranks: tests/test_distributed_trainer.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from test_faults import assert_each_step_once, logged_steps, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]

STEPS = 30


def engine_actor_processes(run_pid: int) -> list[psutil.Process]:
    """This run's engine actors: descendants of its process (the local Ray it started runs the actors
    under its raylet), never another run's on the same machine."""
    found = []
    for process in psutil.Process(run_pid).children(recursive=True):
        try:
            if "ray::EngineActor" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def test_two_replicas_two_ranks_survive_a_lost_engine_actor(tiny_model_dir, tmp_path):
    """Multi-turn episodes (the demo's environment) on two engine replicas and two FSDP ranks: an engine
    actor killed mid-run is replaced, every step is logged once with its episodes' metrics, parity holds
    on each replica, and the checkpoint resumes on one rank and one replica."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "parityrl.cli", "train",
        "--set", f"model.path={tiny_model_dir}",
        "--set", "pipeline.backend=ray", "--set", "engine.replicas=2", "--set", "train.world_size=2", "--set", "train.fsdp=true",
        "--set", f"train.steps={STEPS}", "--set", "train.eval_every=10", "--set", "task.eval_size=64",
        "--set", "pipeline.parity_probe_prompts=2",  # one probe group per replica: parity on each
        "--set", "engine.enforce_eager=true", "--set", "logging.tensorboard=false",
        "--set", "task.kind=environment", "--set", "task.environment=parityrl.environments.addition:AdditionFeedback",
        "--run-dir", str(run_dir), "--no-plot",
    ]  # fmt: skip
    log = open(tmp_path / "train.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: any(r["step"] >= 8 for r in logged_steps(run_dir)), process, 600, "step 8")
        victims = engine_actor_processes(process.pid)
        assert len(victims) == 2, victims
        victims[0].kill()
        assert process.wait(timeout=900) == 0, (tmp_path / "train.log").read_text()[-4000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine_restarts"] >= 1
    assert set(summary["samples_per_replica"]) == {"0", "1"} and min(summary["samples_per_replica"].values()) > 0
    assert summary["last_version_per_replica"] == {"0": STEPS, "1": STEPS}  # every replica has every version
    records = assert_each_step_once(run_dir, STEPS)
    assert all(r["train/world_size"] == 2 for r in records)
    assert all(r["episode/turns"] >= 1 for r in records) and max(r["episode/turns"] for r in records) > 1.5
    for replica in (0, 1):
        kls = [r["parity/kl_per_replica"][replica] for r in records if r.get("parity/kl_per_replica") and len(r["parity/kl_per_replica"]) > replica]
        kls = [kl for kl in kls if kl is not None]
        assert kls and max(kls) <= 1e-9, (replica, kls)
    settings = json.loads((run_dir / "engine_settings.json").read_text())
    assert len(settings["replicas"]) == 2

    # the checkpoint the two FSDP ranks wrote continues on one rank and one replica (2 -> 1)
    resumed = subprocess.run(
        [sys.executable, "-m", "parityrl.cli", "train", "--resume", str(run_dir), "--no-plot", "--set", f"train.steps={STEPS + 3}",
         "--set", "train.world_size=1", "--set", "train.fsdp=false", "--set", "engine.replicas=1"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    records = assert_each_step_once(run_dir, STEPS + 3)
    assert [r["train/world_size"] for r in records[STEPS:]] == [1, 1, 1]


def test_engines_and_trainer_on_two_nodes_of_a_cluster(tiny_model_dir, tmp_path):
    """Two Ray nodes on this machine, each advertising its own custom resource: the engine replica is
    pinned to one, the trainer rank to the other, and the run joins the cluster by address."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"trainers": 1}})
    try:
        cluster.add_node(num_cpus=2, resources={"engines": 1})
        cluster.wait_for_nodes()
        run_dir = tmp_path / "run"
        result = subprocess.run(
            [
                sys.executable, "-m", "parityrl.cli", "train",
                "--set", f"model.path={tiny_model_dir}", "--set", "pipeline.backend=ray",
                "--set", f"ray.address={cluster.address}",
                "--set", "ray.engine_resources={engines: 1}", "--set", "ray.trainer_resources={trainers: 1}",
                "--set", "train.steps=4", "--set", "train.eval_every=4", "--set", "task.eval_size=16",
                "--set", "engine.enforce_eager=true", "--set", "logging.tensorboard=false",
                "--run-dir", str(run_dir), "--no-plot",
            ],  # fmt: skip
            capture_output=True, text=True, timeout=900,
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    finally:
        cluster.shutdown()
    summary = json.loads((run_dir / "summary.json").read_text())
    nodes = summary["actor_nodes"]
    assert len(nodes["engines"]) == len(nodes["trainer_ranks"]) == 1
    assert nodes["engines"][0] != nodes["trainer_ranks"][0], nodes
    assert summary["last_version_per_replica"] == {"0": 4}
