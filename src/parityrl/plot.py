"""`parityrl plot RUN_DIR`: one PNG per plotted panel of `parityrl.metric_registry.PANELS`, its metrics in registry order.

Each metric is drawn raw (faint) with a moving average over it, so the trend reads at a glance and the
noise stays visible; metrics the run never logged a number for are left out (a panel with none is not
drawn); a metric with a `good` text gets it as a caption under its plot.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from parityrl.metric_registry import Metric, plot_panels
from parityrl.metrics import read_metrics

SMOOTH_FRACTION = 0.05
"""Moving-average window as a fraction of the run's steps (at least 1, at most 25 steps)."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key`; null (undefined) and non-numeric values are left out."""
    points = [(r["step"], float(r[key])) for r in records if _is_number(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start), one per value."""
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged


def _draw_metric(ax, steps: list[int], values: list[float], metric: Metric, window: int) -> None:
    if len(steps) < 30 or window <= 1:
        ax.plot(steps, values, marker=".", linewidth=1.2)
    else:
        ax.plot(steps, values, linewidth=0.8, alpha=0.3, color="C0")
        ax.plot(steps, moving_average(values, window), linewidth=1.6, color="C0", label=f"mean of {window} steps")
        ax.legend(frameon=False, fontsize=7, loc="best")
    if metric.log_scale and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_title(metric.name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if metric.good:
        caption = textwrap.fill(f"{metric.meaning}. Good: {metric.good}.", 78)
        ax.text(0.0, -0.28, caption, transform=ax.transAxes, va="top", ha="left", fontsize=7, color="dimgrey")


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_metrics(run_dir)
    steps_in_run = max((r["step"] for r in records), default=0)
    window = max(1, min(25, round(SMOOTH_FRACTION * steps_in_run)))
    written = []
    for panel, metrics in plot_panels().items():
        drawn = [(metric, *series(records, metric.name)) for metric in metrics]
        drawn = [(metric, steps, values) for metric, steps, values in drawn if steps]  # never logged: left out
        (out_dir / f"{panel}.png").unlink(missing_ok=True)  # a panel this run has nothing for is not drawn
        if not drawn:
            continue
        columns = 2 if len(drawn) <= 4 else 3
        rows = math.ceil(len(drawn) / columns)
        captioned = any(metric.good for metric, _, _ in drawn)
        fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, (4.4 if captioned else 3.2) * rows), squeeze=False)
        for ax, (metric, steps, values) in zip(axes.flat, drawn):
            _draw_metric(ax, steps, values, metric, window)
        for ax in list(axes.flat)[len(drawn):]:
            ax.axis("off")
        fig.suptitle(f"{run_dir.name}: {panel}")
        fig.tight_layout()
        path = out_dir / f"{panel}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
