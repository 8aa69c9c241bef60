"""Resumable checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is RUN_DIR/checkpoints/step_NNNNNN/: the policy as an HF model directory (loadable by
any HF tool and by `model.path`), the tokenizer, and `run_state.pt` with the optimizer state, the
step, the policy version, the RNG states, the prompt sampler's state and the prompt groups that were
drawn but not yet trained on (regenerated first after a resume, so no group is lost or trained twice).

Writes are atomic: everything goes to a `.tmp` directory, is fsynced, then renamed into place; a
crash mid-write leaves the previous checkpoints intact, and a write that fails (full disk, file-size
limit) removes its `.tmp` and stops the run with one paragraph. The newest `KEEP` checkpoints are kept.
`MANIFEST` lists every file's size, so `--resume` can tell a damaged checkpoint (a truncated or
missing file, e.g. copied or restored by hand) from an intact one and fall back to the previous one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from parityrl.errors import UserError
from parityrl.tasks import Problem

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "run_state.pt"
MANIFEST = "manifest.json"
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


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint directory, or None if it is intact: every file its manifest
    lists is there with its size, and the weights' safetensors headers read back. (A checkpoint from
    before manifests is checked for the state file and readable weights only.)"""
    checkpoint = Path(checkpoint)
    manifest_path = checkpoint / MANIFEST
    if manifest_path.is_file():
        try:
            sizes = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as error:
            return f"{MANIFEST} is unreadable ({error})"
        for name, size in sizes.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} is {path.stat().st_size} bytes, {size} when written (truncated or replaced)"
    elif not (checkpoint / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        return "it has no model weights (*.safetensors)"
    from safetensors import safe_open

    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own error types for a damaged header
            return f"{path.name} cannot be read ({error})"
    return None


def latest_checkpoint(run_dir: Path, report=None) -> Path | None:
    """The newest intact checkpoint of a run. Damaged ones are skipped, each named through
    `report(line)`; if every checkpoint is damaged, a `UserError` says so (resuming from step 0
    silently would throw the run away)."""
    damaged: list[str] = []
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            if damaged and report is not None:
                report(f"damaged checkpoint skipped ({'; '.join(damaged)}): resuming from {checkpoint.name}, the newest intact one")
            return checkpoint
        damaged.append(f"{checkpoint.name}: {problem}")
    if damaged:
        raise UserError(
            f"no intact checkpoint to resume {run_dir} from ({'; '.join(damaged)}). Restore the files from a copy, "
            f"or start the run again without --resume (with --overwrite to replace it)."
        )
    return None


def save_checkpoint(run_dir: Path, model, optimizer: torch.optim.Optimizer, tokenizer, state: RunState) -> Path:
    """Write checkpoint `step_{state.step}` atomically and prune all but the newest KEEP. A failed
    write (full disk, read-only or size-limited file system) removes its `.tmp` and raises a
    `UserError` that names the intact previous checkpoint."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step_{state.step:06d}"
    tmp = root / (final.name + ".tmp")
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        _write_checkpoint(tmp, model, optimizer, tokenizer, state)
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_write_failure(error):
            raise
        previous = checkpoint_dirs(run_dir)
        raise UserError(
            f"could not write the checkpoint of step {state.step} to {tmp}: {_first_line(error)}. "
            + (f"The previous checkpoint, {previous[-1].name}, is intact. " if previous else "There is no earlier checkpoint. ")
            + f"Free space in {root} (or make it writable), then continue with `parityrl train --resume {run_dir}`.",
            exit_code=1,
        ) from None
    if final.exists():  # the same step saved again (e.g. a stop right after a periodic checkpoint)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(run_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# how torch.save (RuntimeError) and safetensors (SafetensorError) report a failed write
_WRITE_FAILURE = re.compile(r"os error|I/O error|No space|File too large|PytorchStreamWriter|inline_container|unexpected pos", re.IGNORECASE)


def _is_write_failure(error: Exception) -> bool:
    return isinstance(error, OSError) or bool(_WRITE_FAILURE.search(str(error)))


def _first_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _write_checkpoint(directory: Path, model, optimizer: torch.optim.Optimizer, tokenizer, state: RunState) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    payload = {
        "run_state": asdict(state) | {"pending_prompts": [asdict(p) for p in state.pending_prompts]},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }
    torch.save(payload, directory / STATE_FILE)
    sizes = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps(sizes, indent=1))
    _fsync_tree(directory)


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
