"""Host-side helpers of the vLLM engine: per-sample seeds, the EngineCore/worker processes an engine
started (so a dead engine's leftovers can be killed) and the repair of torch's compile cache after a
compile was killed. Cores and threads: `parityrl.hardware`."""

from __future__ import annotations

import contextlib
import hashlib
import struct
from pathlib import Path


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


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the given processes have used so far; gone ones count 0. What tells a
    slow engine (a long bf16 prefill on a CPU without native bf16: minutes without a token) from a hung one."""
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


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


def truncated_elf(path: Path) -> bool:
    """Is `path` a shared library whose writing stopped part-way? Its ELF header must be whole and the
    section header table (which the linker writes last, at the end of the file) must fit in the file."""
    with open(path, "rb") as library:
        data = library.read(64)
    size = path.stat().st_size
    if len(data) < 52 or data[:4] != b"\x7fELF":
        return True
    order = "<" if data[5] == 1 else ">"
    if data[4] == 2:  # 64-bit
        if len(data) < 64:
            return True
        (section_offset,) = struct.unpack_from(order + "Q", data, 0x28)
        entry_size, entries = struct.unpack_from(order + "HH", data, 0x3A)
    else:
        (section_offset,) = struct.unpack_from(order + "I", data, 0x20)
        entry_size, entries = struct.unpack_from(order + "HH", data, 0x2E)
    return size < section_offset + entry_size * entries


def repair_compile_cache(cache_dir: Path | None = None) -> list[Path]:
    """Delete the truncated objects and libraries a killed compile left in torch inductor's cache; return them.

    Inductor compiles and links a kernel straight to its final path and later trusts any file there: a
    process killed mid-link (an engine restarted during its first, compiling request; a run killed)
    leaves a short `.so` that every later engine fails to load ("file too short"), run after run.
    Deleted, the kernel is compiled again. A file whose kernel lock another process holds is being
    written right now and is left alone."""
    from filelock import FileLock, Timeout

    if cache_dir is None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

        cache_dir = Path(inductor_cache_dir())
    removed = []
    for compiled in [*Path(cache_dir).rglob("*.so"), *Path(cache_dir).rglob("*.o")]:
        kernel_lock = Path(cache_dir) / "locks" / (compiled.name.split(".")[0] + ".lock")
        # OSError: gone meanwhile; Timeout: being compiled right now
        with contextlib.suppress(OSError, Timeout), FileLock(str(kernel_lock), timeout=0) if kernel_lock.exists() else contextlib.nullcontext():
            if truncated_elf(compiled):
                compiled.unlink()
                removed.append(compiled)
    return removed
