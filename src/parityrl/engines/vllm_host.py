"""Host-side helpers of the vLLM engine: per-sample seeds and the EngineCore/worker processes an
engine started (so a dead engine's leftovers can be killed). Cores and threads: `parityrl.hardware`."""

from __future__ import annotations

import contextlib
import hashlib


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


