"""`parityrl plot RUN_DIR`: PNG panels of the rl/, parity/, pipeline/ and perf/ metrics."""

from __future__ import annotations

import math
from pathlib import Path

from parityrl.metrics import read_metrics

PANEL_GROUPS = {
    "rl": ["rl/clip_rate", "rl/kl_new_old", "rl/entropy", "rl/reward"],
    "parity": ["parity/kl", "parity/abs_diff_mean", "parity/abs_diff_max", "parity/coverage", "parity/outside_support_frac"],
    "pipeline": ["pipeline/kv_staleness_kl", "pipeline/lag_mean", "pipeline/lag_max", "pipeline/mixed_version_frac", "eval/success"],
    "perf": ["perf/rollout_tok_s", "perf/train_tok_s", "perf/weight_sync_s", "perf/engine_idle_frac", "perf/trainer_idle_frac"],
}
LOG_SCALE = {"parity/kl", "parity/abs_diff_mean", "parity/abs_diff_max", "pipeline/kv_staleness_kl", "rl/kl_new_old"}


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_metrics(run_dir)
    written = []
    for group, keys in PANEL_GROUPS.items():
        columns = 2 if len(keys) <= 4 else 3
        rows = math.ceil(len(keys) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1.2)
                if key in LOG_SCALE and all(v > 0 for v in values):
                    ax.set_yscale("log")
            else:
                ax.text(0.5, 0.5, "no qualifying tokens in this run", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(f"{run_dir.name}: {group}")
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
