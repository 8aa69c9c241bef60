"""Metric sinks: RUN_DIR/metrics.jsonl always (one object per line, with `step`), TensorBoard optional.

Each JSONL line is written with a single `write` and flushed + fsynced, so a crash never leaves a
half-written record in front of good ones. Metrics that are undefined for a step (for example
`parity/kl` when no sequence qualified) are written as null and skipped in TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb_config: dict | None = None, purge_step: int | None = None):
        """purge_step: on a resume, the first step this session logs; TensorBoard drops its older
        events from that step on (metrics.jsonl is cut back by `truncate_metrics` before)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)
        self._wandb = None
        if wandb_config is not None:
            import wandb  # optional dependency

            self._wandb = wandb.init(project="parityrl", config=wandb_config, dir=str(run_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step} | {key: _clean(value) for key, value in metrics.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and v is not None}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: is this a parityrl run directory?")
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def truncate_metrics(run_dir: Path, last_step: int) -> int:
    """Keep only the records of steps <= `last_step` in metrics.jsonl (atomically); -1 empties it.

    A resume continues from a checkpoint's step: the steps logged after it by the stopped session are
    done again, so they are dropped here and every step appears once. A torn last line is dropped too.
    Returns the number of records kept."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return len(kept)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    """One JSON object per line, written atomically (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(record, default=str) + "\n" for record in records))


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file, fsync, rename: readers see the old or the new file, never a torn one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
