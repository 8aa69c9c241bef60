"""Fault injection with the real vLLM engine on the tiny model, through the real CLI.

- one run meets three engine faults in turn (`engine.max_restarts=2`): the vLLM EngineCore or worker
  SIGKILLed mid-run (restarted, its groups requeued, a reward that fails on 5% of calls counted), the
  engine hung (SIGSTOP: alive, never progressing; the stall watchdog must be what declares it dead),
  and a third death: past `engine.max_restarts` the run stops with a checkpoint, one paragraph and a
  non-zero exit, and leaves no process behind; `--resume` then finishes with every step logged once
  and no prompt group trained twice (one run for three faults: 4 engine starts where three runs took 6);
- the engine hangs where the watchdog waits 10 minutes: a call's own deadline declares it dead and a
  new engine carries on; then the whole `parityrl train` process group is SIGKILLed after a
  checkpoint: `--resume` finishes with every step logged exactly once and the versions continuous;
- the main process alone is SIGKILLed: every process of the run dies with it.

Kill steps and victims come from `random.Random(FAULT_SEED)` (env `PARITYRL_FAULT_SEED`, default 0),
printed in every failure message, so a failure can be replayed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
STEPS = 10
FAULT_SEED = int(os.environ.get("PARITYRL_FAULT_SEED", "0"))


def train_command(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "parityrl.cli", "train",
        "--set", f"model.path={model_dir}",
        "--set", f"train.steps={STEPS}",
        "--set", "train.prompts_per_step=4",
        "--set", "train.eval_every=5",
        "--set", "train.checkpoint_every=3",
        "--set", "sampling.n=4",
        "--set", "task.eval_size=32",
        "--set", "engine.enforce_eager=true",
        "--set", "logging.tensorboard=false",
        "--run-dir", str(run_dir), "--no-plot", *extra,
    ]  # fmt: skip


def environment() -> dict[str, str]:
    # the reward workers import tests/rewards_for_tests.py
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def logged_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, process: subprocess.Popen, timeout_s: float, what: str, log: Path | None = None) -> None:
    """Poll `predicate`; fail (with the run's log tail when `log` is given) if the run exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        problem = f"training exited ({process.returncode}) before {what}" if process.poll() is not None else None
        if problem is None and time.monotonic() > deadline:
            problem = f"timed out after {timeout_s:.0f} s waiting for {what}"
        if problem is not None:
            raise AssertionError(problem + ("\n" + log.read_text()[-3000:] if log is not None and log.is_file() else ""))
        time.sleep(0.5)


def vllm_processes(root_pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            # vLLM titles them VLLM::EngineCore/Worker, but not always (not with TORCHINDUCTOR_CACHE_DIR set):
            # they are also the run's only children started by multiprocessing's spawn (reward workers are not)
            command = " ".join(child.cmdline())
            if "VLLM::" in command or child.name().startswith("VLLM::") or "multiprocessing.spawn" in command:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def assert_each_step_once(run_dir: Path, steps: int) -> list[dict]:
    records = [r for r in logged_steps(run_dir) if r["step"] > 0]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["version"] for r in records] == list(range(1, steps + 1))
    group_ids = [gid for r in records for gid in r["pipeline/group_ids"]]
    assert len(group_ids) == len(set(group_ids)), "a prompt group was trained on twice"
    return records


def engine_failures_logged(log: Path) -> list[str]:
    """The supervisor's line for each engine death ('engine failure: REASON; restarting it ...')."""
    return [line.split("engine failure: ", 1)[1] for line in log.read_text().splitlines() if "engine failure: " in line]


def test_killed_then_hung_then_dying_engine_stops_the_run_and_resume_finishes(tiny_model_dir, tmp_path):
    run_dir, log_path = tmp_path / "run", tmp_path / "train.log"
    # 8 prompts x 8 samples as in the demo: 64 rewards per step, so every-20th failures stay under 10%.
    # Steps without end: the third death stops the run (a policy that collapsed to empty completions ran
    # 400 steps in 160 s, before the third kill, in one run). The update deadline is far above the stall
    # timeout: within 30 s of a stop only the watchdog can fire
    command = train_command(
        tiny_model_dir, run_dir, "--set", "task.reward=rewards_for_tests:fails_every_20th",
        "--set", "train.prompts_per_step=8", "--set", "sampling.n=8", "--set", "train.steps=100000", "--set", "train.checkpoint_every=0",
        "--set", "engine.max_restarts=2", "--set", "engine.stall_timeout_s=5", "--set", "engine.update_timeout_s=120",
    )  # fmt: skip
    shared_before = shared_memory_names()
    process = subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=environment(), start_new_session=True)
    rng = random.Random(FAULT_SEED)
    everything: list[psutil.Process] = []
    seen: set[int] = set()  # the pids of every engine so far
    replay = f"(PARITYRL_FAULT_SEED={FAULT_SEED})"

    def steps_logged() -> int:
        return len([r for r in logged_steps(run_dir) if r["step"] > 0])

    def next_engine(after_steps: int, what: str) -> list[psutil.Process]:
        """Wait for `after_steps` more logged steps and an engine not seen before; its processes."""
        target = steps_logged() + after_steps
        wait_for(lambda: steps_logged() >= target, process, 600, f"step {target} before {what}", log_path)
        wait_for(lambda: {p.pid for p in vllm_processes(process.pid)} - seen, process, 300, f"an engine before {what}", log_path)
        engine = [p for p in vllm_processes(process.pid) if p.pid not in seen]
        seen.update(p.pid for p in engine)
        everything.extend(psutil.Process(process.pid).children(recursive=True))
        return sorted(engine, key=lambda p: p.name())  # a fixed order for the seeded choice

    try:
        # 1. a vLLM process killed
        victim = rng.choice(next_engine(rng.randint(2, 4), "the kill"))
        first_salt = json.loads((run_dir / "engine_settings.json").read_text())["cache_salt"]
        replay += f" {victim.name()} killed;"
        victim.kill()
        # 2. the new engine stopped while its requests stream. A stop that lands in a weight update (paused)
        # or while nothing is in flight is no stall for the watchdog to see: resumed, and stopped again later
        stopped = next_engine(1, "the stop")
        for attempt in range(1, 5):
            for member in stopped:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.suspend()
            began = time.monotonic()
            while time.monotonic() - began < 30 and not {p.pid for p in vllm_processes(process.pid)} - seen and process.poll() is None:
                time.sleep(0.5)
            if {p.pid for p in vllm_processes(process.pid)} - seen or process.poll() is not None:
                break
            for member in stopped:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.resume()
            target = steps_logged() + 1
            wait_for(lambda target=target: steps_logged() >= target, process, 600, f"a step after stop attempt {attempt}", log_path)
        replay += f" stopped at attempt {attempt};"
        # 3. a third death: past engine.max_restarts=2
        rng.choice(next_engine(1, "the last kill")).kill()
        assert process.wait(timeout=300) == 1, replay + log_path.read_text()[-3000:]
        _, alive = psutil.wait_procs(everything, timeout=15)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for member in everything:  # a stopped process outlives the test otherwise
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
    output = log_path.read_text()
    failures = engine_failures_logged(log_path)
    assert len(failures) == 2, (replay, failures)  # the third death is the one the run stops on
    # the watchdog, nothing else, declared the stopped engine dead
    assert "no token streamed and no CPU used for 5 s" in failures[1], (replay, failures)
    assert "engine.max_restarts=2" in output and "parityrl train --resume" in output, output[-3000:]
    # vLLM logs the dead EngineCore's stack (lines it prefixes with its process), and an EngineCore whose worker
    # was killed dies with a traceback that multiprocessing heads "Process EngineCore:"; parityrl ends in one paragraph
    lines = output.splitlines()
    own = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)") and not lines[i - 1].startswith("Process ")]
    assert not own and "the run stopped at step" in output, output[-3000:]
    records = [r for r in logged_steps(run_dir) if r["step"] > 0]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints[-1] == f"step_{records[-1]['step']:06d}", (checkpoints, records[-1]["step"])
    assert not alive, f"left running after the run stopped: {[(p.pid, p.name()) for p in alive]}"
    # every engine's queues (the killed, the stopped, the last) are unlinked: RAM otherwise
    assert not shared_memory_left(shared_before), (replay, shared_memory_left(shared_before, grace_s=0))
    assert sum(r["pipeline/engine_restarts"] for r in records) == 2
    # a death met by a group's request redoes the groups in flight; one met first by a weight update (or an
    # evaluation) can come when every slot's group is already generated (measured: 'weight update v6 failed',
    # 0 requeued; and the watchdog's 'the engine reported an error ... (seen by weight update v4)', 0 requeued)
    if any("group " in failure for failure in failures):
        assert sum(r["pipeline/requeued_groups"] for r in records) >= 1, (replay, failures)
    # the flaky reward failed on ~5% of calls: counted, never more than 10% of a step
    assert sum(r["pipeline/reward_errors"] for r in records) > 0 and max(r["pipeline/reward_errors"] for r in records) <= 0.1 * 64
    # vLLM through the pipeline, fp32: the parity probe (lag-0 tokens) agrees with the trainer, also on the
    # restarted engines (which loaded the current weights themselves)
    parity = [r["parity/kl"] for r in records if r.get("parity/kl") is not None]
    assert len(parity) >= len(records) // 2 and max(parity) <= 1e-9, parity
    # an engine restart keeps fix 2's rule: the new engine caches, salted with a nonce of its own (no block
    # of the dead one can match) and the version it was given, and parity above holds on its steps too
    last_settings = json.loads((run_dir / "engine_settings.json").read_text())
    assert last_settings["prefix_caching"] == "versioned" and last_settings["worker"]["enable_prefix_caching"] is True
    assert last_settings["cache_salt"] != first_salt, (first_salt, last_settings["cache_salt"])

    # the checkpoint the run stopped with continues: each step once, no group trained twice
    stopped_at = records[-1]["step"]
    resumed = subprocess.run(
        [sys.executable, "-m", "parityrl.cli", "train", "--resume", str(run_dir), "--no-plot", "--set", f"train.steps={stopped_at + 3}"],
        stdout=open(tmp_path / "resume.log", "w"), stderr=subprocess.STDOUT, env=environment(), timeout=900,
    )  # fmt: skip
    assert resumed.returncode == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert_each_step_once(run_dir, stopped_at + 3)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine_restarts"] >= 2 and summary["reward_errors"] > 0, summary
    assert summary["eval_success_end"] is not None


def test_hung_engine_then_process_group_killed_resumes_with_each_step_once(tiny_model_dir, tmp_path):
    """Two faults, one run. First every vLLM process is SIGSTOPped mid-run (alive, holding requests,
    never streaming again) where the watchdog would wait 10 minutes: a call's own deadline fires first
    (the generation's or the weight update's, whichever the stop caught; 60 s, not less: a deadline
    covers a call's whole life, queueing included, and at 20 s calls of a busy but healthy engine missed
    it) and a new engine carries on; the hung one is closed, not left stopped beside it. Then, after a
    checkpoint and a step past it, the whole process group is SIGKILLed: `--resume` unlinks the queues
    the killed engine left (nothing of the run could), drops the logged steps past the checkpoint and
    finishes with every step logged once and the versions continuous. (The watchdog's verdicts: the
    three-fault run above and tests/test_supervisor.py.)"""
    run_dir, log_path = tmp_path / "run", tmp_path / "train.log"
    # 40 steps: after a 60 s deadline the new engine can find the trainer far ahead (10 steps ended 4 s
    # after a restart in one run, before the test could see a checkpoint and kill the run)
    steps = 40
    settings = ["engine.stall_timeout_s=600", "engine.request_timeout_s=60", "engine.update_timeout_s=60", f"train.steps={steps}"]
    shared_before = shared_memory_names()
    log = open(log_path, "w")
    command = train_command(tiny_model_dir, run_dir, *[arg for setting in settings for arg in ("--set", setting)])
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment(), start_new_session=True)
    stopped: list[psutil.Process] = []
    stop_after = random.Random(FAULT_SEED).randint(2, 3)
    replay = f"(PARITYRL_FAULT_SEED={FAULT_SEED}: engine stopped after step {stop_after})"
    try:
        wait_for(lambda: any(r["step"] >= stop_after for r in logged_steps(run_dir)), process, 600, f"step {stop_after}", log_path)
        stopped = vllm_processes(process.pid)
        assert stopped, f"no vLLM EngineCore/worker among the run's {[(p.pid, p.name()) for p in psutil.Process(process.pid).children(recursive=True)]}"
        for victim in stopped:
            victim.suspend()
        stopped_at = time.monotonic()
        old_pids = {victim.pid for victim in stopped}
        wait_for(lambda: {p.pid for p in vllm_processes(process.pid)} - old_pids, process, 300, "a new engine", log_path)
        print(f"hung engine: a new engine's processes {time.monotonic() - stopped_at:.1f} s after SIGSTOP")
        # a checkpoint written after the restart and a step past it, so the resume must drop logged steps
        first = max([r["step"] for r in logged_steps(run_dir)] + [0]) + 1

        def checkpointed_and_one_more() -> bool:
            folder = run_dir / "checkpoints"
            # finished checkpoints only: one being written is a `step_NNNNNN.tmp` directory
            done = [int(p.name.removeprefix("step_")) for p in folder.glob("step_*") if p.name.removeprefix("step_").isdigit()] if folder.is_dir() else []
            newest = max(done, default=0)
            return newest >= first and any(r["step"] > newest for r in logged_steps(run_dir))

        wait_for(checkpointed_and_one_more, process, 600, "a checkpoint after the restart", log_path)
        # the hung engine was closed, not left stopped beside its successor
        assert not [p for p in stopped if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], replay
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for victim in stopped:  # a stopped process outlives the test otherwise
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()
    (failure,) = engine_failures_logged(log_path)
    # the generation's deadline (its group requeued) or the weight update's (every group already generated)
    assert "deadline" in failure, (replay, failure)
    if failure.startswith("group "):
        assert sum(r["pipeline/requeued_groups"] for r in logged_steps(run_dir) if r["step"] > 0) >= 1, (replay, failure)
    assert not (run_dir / "summary.json").exists()
    time.sleep(2)  # let the killed engine's processes go
    resumed = subprocess.run(
        [sys.executable, "-m", "parityrl.cli", "train", "--resume", str(run_dir), "--no-plot"],
        stdout=log, stderr=subprocess.STDOUT, env=environment(), timeout=900,
    )
    log.close()
    output = log_path.read_text()
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming" in output
    # nothing of the killed run could unlink its engine's queues (~420 MB of RAM): the resume did
    assert "shared-memory queue(s) the stopped run's engine left" in output
    # (a 32-byte `sem.mp-*` of the killed main process's own may stay: nothing records or unlinks those)
    left = [path for path in shared_memory_left(shared_before) if not path.name.startswith("sem.mp-")]
    assert not left, f"shared memory left by the hung engine, the killed run or its resume: {left}"
    assert_each_step_once(run_dir, steps)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_success_end"] is not None and summary["eval_success_start"] is not None
    assert summary["engine_restarts"] >= 1, summary  # carried across the resume
    # training into it again without --resume/--overwrite is refused
    again = subprocess.run(
        [sys.executable, "-m", "parityrl.cli", "train", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 2 and "--resume" in again.stdout + again.stderr


def shared_memory_names() -> set[Path]:
    """vLLM's queues and their locks, and parityrl's weight buffers: RAM until unlinked."""
    return {path for pattern in ("psm_*", "sem.mp-*", "parityrl-weights-*") for path in Path("/dev/shm").glob(pattern)}


def shared_memory_left(before: set[Path], grace_s: float = 20.0) -> list[Path]:
    """What the dead run left in /dev/shm, after `grace_s` for its resource tracker: a killed vLLM
    process's semaphores are unlinked by the multiprocessing resource tracker the run started, which
    does so when the run's last process has exited, a moment *after* the main process's exit status
    is in (CI saw one `sem.mp-*` still there at that moment). Anything still there after the grace
    outlives the run."""
    deadline = time.monotonic() + grace_s
    while (left := shared_memory_names() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return sorted(left)


def test_every_process_of_a_run_dies_with_its_main_process(tiny_model_dir, tmp_path):
    """SIGKILL to the `parityrl train` process alone (what the OOM killer or `kill -9 PID` does; the
    process group survives): the vLLM EngineCore, its worker and the reward workers it started are
    gone within 15 s. Before the orphan guard the EngineCore and worker kept running (2.8 GB) until
    killed by hand; this test failed then."""
    run_dir = tmp_path / "run"
    shared_before = shared_memory_names()
    command = train_command(tiny_model_dir, run_dir, "--set", "train.steps=400", "--set", "train.checkpoint_every=0")
    # a session of its own: the test's kill reaches the main pid only, never a group
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    children: list[psutil.Process] = []
    try:
        wait_for(lambda: any(r["step"] >= 2 for r in logged_steps(run_dir)), process, 600, "step 2")
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(vllm_processes(process.pid)) >= 2  # EngineCore and its worker, among the run's children
        killed_at = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        _, alive = psutil.wait_procs(children, timeout=15)
        elapsed = time.monotonic() - killed_at
        print(f"last child of the run gone {elapsed:.1f} s after SIGKILL of the main process")
        assert not alive, f"left running 15 s after the run died: {[(p.pid, p.name()) for p in alive]}"
        # vLLM's message queues and their locks live in /dev/shm (RAM) until someone unlinks them: the dying guard did
        left = shared_memory_left(shared_before)
        assert not left, f"shared memory left by the dead run: {left}"
    finally:
        for leftover in [process.pid] + [p.pid for p in children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)
