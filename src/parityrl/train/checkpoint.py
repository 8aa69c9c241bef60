"""Resumable checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is RUN_DIR/checkpoints/step_NNNNNN/: the policy as an HF model directory (loadable by
any HF tool and by `model.path`), the tokenizer, and `run_state.pt` with the optimizer state, the
step, the policy version, the RNG states, the prompt sampler's state and the prompt groups that were
drawn but not yet trained on (regenerated first after a resume, so no group is lost or trained twice).

Writes are atomic: everything goes to a `.tmp` directory, is fsynced, then renamed into place; a
crash mid-write leaves the previous checkpoints intact. The newest `KEEP` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from parityrl.tasks import Problem

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "run_state.pt"
KEEP = 2
_NAME = re.compile(r"^step_(\d{6,})$")


@dataclass
class RunState:
    """The loop's own state at the end of `step` (the trainer's model and optimizer are saved beside it)."""

    step: int
    """Last completed optimiser step."""
    version: int
    """Policy version after that step (what the engines serve)."""
    sampler_state: Any
    """`random.Random.getstate()` of the prompt sampler."""
    pending_prompts: list[Problem] = field(default_factory=list)
    """Groups drawn from the sampler but not trained on yet (generating, or waiting for the trainer)."""
    counters: dict[str, float] = field(default_factory=dict)
    """Run totals carried across resumes (rollout tokens, RL seconds, engine restarts, ...)."""
    eval_success: float | None = None
    """Last held-out success measured."""


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a `.tmp` left by a crash is not one)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: Path, model, optimizer: torch.optim.Optimizer, tokenizer, state: RunState) -> Path:
    """Write checkpoint `step_{state.step}` atomically and prune all but the newest KEEP."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    payload = {
        "run_state": asdict(state) | {"pending_prompts": [asdict(p) for p in state.pending_prompts]},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }
    torch.save(payload, tmp / STATE_FILE)
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. a stop right after a periodic checkpoint)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(run_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_run_state(checkpoint: Path, optimizer: torch.optim.Optimizer | None = None) -> RunState:
    """Read `run_state.pt`; restore the optimizer (if given) and the global torch/python RNG states."""
    payload = torch.load(Path(checkpoint) / STATE_FILE, weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["torch_rng"])
    random.setstate(payload["python_rng"])
    raw = dict(payload["run_state"])
    raw["pending_prompts"] = [Problem(**p) for p in raw.get("pending_prompts", [])]
    return RunState(**raw)
