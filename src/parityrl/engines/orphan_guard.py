"""Every vLLM process a run starts dies with the run, whatever killed it.

vLLM's EngineCore is a child of the `parityrl` process and its worker a child of the EngineCore.
When the run ends normally it closes them; when it is SIGKILLed (the OOM killer, `kill -9`, a
terminal that goes away) nothing closes them, and they kept 2.8 GB and a fifth of a core for as long
as nobody noticed. The guard is a vLLM general plugin (entry point `vllm.general_plugins`), which
vLLM loads in each of its processes: in a process started under a parityrl run
(`RUN_PID_ENV` set) it starts a daemon thread that checks every `CHECK_EVERY_S` whether the
process's parent is still the one that started it and the run's main process still exists, and
SIGKILLs its own process when either is gone. The chain follows: the EngineCore goes within a second
of the run, its worker within a second of the EngineCore. Before it goes, it unlinks the POSIX shared
memory it maps (`/dev/shm/psm_*`: vLLM's message queues between frontend, EngineCore and worker,
unlinked by their owner at a clean shutdown) and the `file` transport's weight directories
(`parityrl-weights-<run pid>-*`, removed by the run once the worker has loaded them): after a SIGKILL
nobody else would, and tmpfs keeps them, in RAM, until the machine restarts (270 MB per update of
SmolLM2). The default `shm` transport's buffers have no name to leave (`NamelessSharedBuffer`): vLLM's
own shutdown can end these processes before the guard's next look, so a name is not left to it.

Polling rather than `PR_SET_PDEATHSIG`: the kernel sends that signal when the *thread* that forked
the child exits, and vLLM starts its processes from threads that may end long before the run does.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import threading
import time
from pathlib import Path

RUN_PID_ENV = "PARITYRL_RUN_PID"
"""The run's main process id, exported before the engine starts (vLLM's processes inherit it)."""
CHECK_EVERY_S = 0.5


def register() -> None:
    """The `vllm.general_plugins` entry point: guard this process if a parityrl run started it."""
    run_pid = os.environ.get(RUN_PID_ENV)
    if run_pid is None or int(run_pid) == os.getpid():
        return  # not under a run, or the run's own process (vLLM loads plugins there too)
    guard_process(int(run_pid))


def guard_process(run_pid: int) -> threading.Thread:
    """Start the watchdog thread of this process (idempotent per process)."""
    global _guard
    if _guard is not None and _guard.is_alive():
        return _guard
    parent = os.getppid()
    _guard = threading.Thread(target=_watch, args=(run_pid, parent), name="parityrl-orphan-guard", daemon=True)
    _guard.start()
    return _guard


_guard: threading.Thread | None = None


def _watch(run_pid: int, parent: int) -> None:
    while True:
        time.sleep(CHECK_EVERY_S)
        if os.getppid() != parent or not _exists(run_pid):
            # the run is gone: nothing of this process is worth keeping (no checkpoint lives here)
            unlink_mapped_shared_memory()
            unlink_run_weight_buffers(run_pid)
            os.kill(os.getpid(), signal.SIGKILL)


SHARED_MEMORY_PREFIXES = ("/dev/shm/psm_", "/dev/shm/sem.mp-")
"""Python's `multiprocessing.shared_memory` segments (vLLM's shared-memory message queues) and its
named semaphores (their locks): the resource tracker that would unlink them dies with the run."""


def mapped_shared_memory(maps_path: str = "/proc/self/maps") -> set[str]:
    """The `psm_*` segments and `sem.mp-*` semaphores a process maps (its `/proc/PID/maps`), still linked."""
    try:
        with open(maps_path) as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if any(prefix in line for prefix in SHARED_MEMORY_PREFIXES)}
    except OSError:
        return set()
    return {path for path in paths if path.startswith(SHARED_MEMORY_PREFIXES) and not path.endswith("(deleted)")}


def unlink_paths(paths) -> list[str]:
    """Unlink each path that still exists; returns those unlinked. A process that still maps one keeps its
    mapping (unlinking removes only the name)."""
    unlinked = []
    for path in sorted(paths):
        with contextlib.suppress(OSError):
            os.unlink(path)
            unlinked.append(str(path))
    return unlinked


def unlink_mapped_shared_memory(maps_path: str = "/proc/self/maps") -> list[str]:
    """Unlink every `psm_*` segment and `sem.mp-*` semaphore this process maps (the run they served is gone)."""
    return unlink_paths(mapped_shared_memory(maps_path))


def unlink_run_weight_buffers(run_pid: int, directory: str = "/dev/shm") -> list[str]:
    """Remove the weight files and directories the run `run_pid` left (`VLLMEngine` names them
    `parityrl-weights-<pid>-*`)."""
    paths = glob.glob(os.path.join(directory, f"parityrl-weights-{run_pid}-*"))
    directories = [path for path in paths if os.path.isdir(path)]
    for path in directories:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(directories + unlink_paths(path for path in paths if path not in directories))


def _exists(pid: int) -> bool:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 0)
        return True
    return False


def unlink_unmapped(paths) -> list[str]:
    """Unlink each of `paths` (this project's queues, named by a run that died) that no live process
    maps; returns those unlinked. What a SIGKILL to a whole run's process group leaves: its engine's
    processes, their guards and the resource tracker all die at once, so none can unlink them."""
    wanted = {str(path) for path in paths if str(path).startswith(SHARED_MEMORY_PREFIXES)}
    if not wanted:
        return []
    in_use = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        in_use |= mapped_shared_memory(str(maps)) & wanted
    return unlink_paths(wanted - in_use)


def recorded_shared_memory(settings: object) -> set[str]:
    """Every `shared_memory` list in an engine_settings.json (one engine's, or each replica's)."""
    if isinstance(settings, dict):
        found = {str(path) for path in settings.get("shared_memory", [])}
        return found.union(*(recorded_shared_memory(value) for value in settings.values()))
    if isinstance(settings, list):
        return set().union(*(recorded_shared_memory(value) for value in settings))
    return set()
