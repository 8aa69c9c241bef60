"""Run directories: what `parityrl train` may write into, and the config a resume continues with.

A run directory belongs to one run. Training into one that already holds a run is refused (exit 2)
unless `--resume` (continue it) or `--overwrite` (delete that run's files first) says what to do.
A resume reads the run's own `config.yaml`; `--set` may change only what does not change what the run
is (`RESUMABLE_OVERRIDES`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from pydantic import ValidationError

from parityrl.config import ConfigError, RunConfig, deep_merge, format_validation_error, parse_overrides
from parityrl.errors import UserError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "engine_settings.json")
RUN_DIRS = ("checkpoints", "tb", "plots")
RESUMABLE_OVERRIDES = (
    "train.steps",
    "train.eval_every",
    "train.checkpoint_every",
    "logging.",
    "engine.max_restarts",
    "engine.start_timeout_s",
    "engine.request_timeout_s",
    "engine.update_timeout_s",
    "engine.stall_timeout_s",
    "train.collective_timeout_s",
    # the layout: where the same computation runs (checkpoints keep optimizer state by parameter name)
    "train.world_size",
    "train.fsdp",
    "engine.replicas",
    "pipeline.backend",
    "ray.",
)
"""Keys (or key prefixes ending in '.') a resume may override: length, cadence, logging, fault
tolerance, and the layout (trainer ranks, FSDP, engine replicas, Ray)."""


def holds_a_run(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in RUN_FILES + RUN_DIRS)


def refuse_existing_run(run_dir: Path, overwrite: bool) -> None:
    """Refuse a directory that holds a run unless `overwrite` (checked before anything is written)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file; give a directory path.")
    if holds_a_run(run_dir) and not overwrite:
        raise UserError(
            f"{run_dir} already holds a run (config.yaml, metrics or checkpoints). Continue it with "
            f"`parityrl train --resume {run_dir}`, start over with --overwrite (deletes that run's files), "
            "or pick another --run-dir."
        )


def clear_run(run_dir: Path) -> None:
    """Delete the run's own files (never anything else a user keeps in the directory)."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _allowed(key: str) -> bool:
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE_OVERRIDES)


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys.extend(_leaf_keys(value, f"{path}.") if isinstance(value, dict) else [path])
    return keys


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The config saved in RUN_DIR/config.yaml with the permitted `key=value` overrides applied."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: no config.yaml there, so it is not a parityrl run directory (or it never started).")
    saved = yaml.safe_load(path.read_text())
    if not isinstance(saved, dict):
        raise UserError(f"--resume {run_dir}: {path} is not a saved run config (expected a mapping).")
    saved.pop("_versions", None)
    tree = parse_overrides(overrides)
    refused = [key for key in _leaf_keys(tree) if not _allowed(key)]
    if refused:
        raise UserError(
            f"--resume {run_dir}: --set {', '.join(refused)} would change what the run is; a resume may only change "
            f"{', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in RESUMABLE_OVERRIDES)}. "
            "Start a new run (another --run-dir) to change the rest."
        )
    try:
        return RunConfig.model_validate(deep_merge(saved, tree))
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, RunConfig, f"{path} with --set overrides")) from None
