"""`parityrl plot RUN_DIR`: one PNG per plotted panel of `parityrl.metric_registry.PANELS`, its metrics in registry order."""

from __future__ import annotations

import math
from pathlib import Path

from parityrl.metric_registry import Metric, plot_panels
from parityrl.metrics import read_metrics


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key`; null (undefined) and non-numeric values are left out."""
    points = [(r["step"], float(r[key])) for r in records if _is_number(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def _missing_text(records: list[dict], key: str) -> str:
    """Why a subplot is empty: a metric logged only as null had no qualifying tokens; one never logged is
    absent from this run (an older run, or a metric this configuration does not produce)."""
    return "no qualifying tokens in this run" if any(key in r for r in records) else "not logged in this run"


def _draw_metric(ax, records: list[dict], metric: Metric) -> None:
    steps, values = series(records, metric.name)
    if steps:
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1.2)
        if metric.log_scale and all(v > 0 for v in values):
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, _missing_text(records, metric.name), ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_title(metric.name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_metrics(run_dir)
    written = []
    for panel, metrics in plot_panels().items():
        columns = 2 if len(metrics) <= 4 else 3
        rows = math.ceil(len(metrics) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
        for ax, metric in zip(axes.flat, metrics):
            _draw_metric(ax, records, metric)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        fig.suptitle(f"{run_dir.name}: {panel}")
        fig.tight_layout()
        path = out_dir / f"{panel}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
