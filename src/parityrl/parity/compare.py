"""`parityrl compare RUN_DIR...`: Figure-1 panels with seed bands and a computed inside/outside verdict.

This module reads the runs and renders the outputs; the statistic (seed bands, the band test, verdicts)
is `parity/compare_stats.py`, which documents it.

Inputs. Each run directory holds `metrics.jsonl` (one object per step, `null` for undefined values) and
usually `config.yaml`. A path without `metrics.jsonl` is searched recursively for run directories, so
`parityrl compare ablate_out` works. Runs are grouped into *configurations*: a run directory named
`seed<N>` belongs to the configuration named after its parent (`ablate_out/<config>/seed<N>/`); any
other run directory is a configuration of its own. The reference configuration is `--reference`, else
the one named `reference`.

Outputs in OUT_DIR: `figure1.png` (2x2 panels of the Figure-1 metrics of `metric_registry`: rl/clip_rate,
rl/kl_new_old (log y), rl/entropy, rl/reward; one colour per configuration, the reference in black; line =
mean over seeds, shaded band = min..max over seeds, the same band the verdict uses), `verdict.md`,
`verdict.json`, `compare.html` (standalone: the PNG is embedded as base64). Smoothing is a centred
rolling mean applied to each seed *for the figure only* (default window: n_steps // 25, at least 1, i.e.
light); the verdict always uses the raw values.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from parityrl.metric_registry import compared_metrics, run_level, tabulated_metrics
from parityrl.metrics import read_metrics, write_json_atomic, write_text_atomic
from parityrl.parity.compare_stats import (
    DEFAULT_REFERENCE,
    FLOOR,
    LEVEL_ALPHA,
    LOG_LEVEL,
    METRICS,
    MIN_COVERAGE,
    NAIVE,
    TOLERANCE,
    CompareResult,
    Configuration,
    judge,
    nanmean,
)

SEED_DIR = re.compile(r"^seed[_-]?\d+$")
IGNORED_CONFIG_KEYS = ("seed", "_versions", "logging.")


# --------------------------------------------------------------------------- loading


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories among `paths`; a path without metrics.jsonl is searched recursively."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "metrics.jsonl").is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p.parent for p in path.rglob("metrics.jsonl")))
        else:
            raise FileNotFoundError(f"{path}: not a run directory (no metrics.jsonl) nor a folder holding runs")
    if not found:
        raise FileNotFoundError(f"no metrics.jsonl under {', '.join(map(str, paths))}")
    unique: dict[Path, Path] = {}  # deduplicated by real path, reported as given (no machine paths in reports)
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def configuration_name(run_dir: Path) -> str:
    return run_dir.parent.name if SEED_DIR.match(run_dir.name) else run_dir.name


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _read_settings(run_dir: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    flat = _flatten(tree) if isinstance(tree, dict) else {}
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i) for i in IGNORED_CONFIG_KEYS)}


def _load_configuration(name: str, runs: list[Path]) -> Configuration:
    records = [read_metrics(run) for run in runs]
    steps = sorted({r["step"] for recs in records for r in recs if r.get("step", 0) > 0 and any(r.get(m) is not None for m in METRICS)})
    index = {step: i for i, step in enumerate(steps)}
    values = {m: np.full((len(runs), len(steps)), np.nan) for m in METRICS}
    for seed, recs in enumerate(records):
        for record in recs:
            column = index.get(record.get("step", 0))
            if column is None:
                continue
            for metric in METRICS:
                value = record.get(metric)
                if _finite(value):
                    values[metric][seed, column] = float(value)
    measured = {
        metric.name: [
            run_level(metric, [float(r[metric.name]) for r in recs if r.get("step", 0) > 0 and _finite(r.get(metric.name))]) for recs in records
        ]
        for metric in tabulated_metrics()
    }
    return Configuration(name, runs, np.array(steps, dtype=int), values, _read_settings(runs[0]), measured)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_configurations(run_dirs: list[Path]) -> dict[str, Configuration]:
    groups: dict[str, list[Path]] = {}
    for run in find_run_dirs(run_dirs):
        groups.setdefault(configuration_name(run), []).append(run)
    return {name: _load_configuration(name, sorted(runs)) for name, runs in groups.items()}


# --------------------------------------------------------------------------- rendering


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


def _table_rows(result: CompareResult) -> list[list[str]]:
    rows = []
    for v in result.verdicts:
        band = f"[{_fmt(v.ratio_band[0])}, {_fmt(v.ratio_band[1])}]" if v.ratio_band else "–"
        coverage = "–" if v.coverage is None else f"{v.coverage:.0%}"
        rows.append([v.configuration, str(v.seeds), v.metric, _fmt(v.mean), _fmt(v.reference_mean), _fmt(v.ratio), band, coverage, str(v.steps), v.verdict])
    return rows


TABLE_HEADER = ["configuration", "seeds", "metric", "mean", "reference mean", "ratio", "ratio band", "steps inside band", "steps", "verdict"]


def _gap_lines(result: CompareResult) -> list[str]:
    lines = []
    for name, shares in result.gap_closed.items():
        text = ", ".join(f"{'–' if s is None else f'{s:.0%}'} on {m}" for m, s in shares.items())
        lines.append(f"{name}: share of the {NAIVE}→{result.reference} gap closed: {text}")
    return lines


MEASURED_NOTE = (
    "Measured in the runs, no verdict: each run's median over its steps for KL-like metrics (a step's parity probe "
    "has ~30 tokens and rare spikes), its mean otherwise; then the mean over seeds, with the seeds' min–max."
)


def _measured_rows(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    metrics = [m.name for m in tabulated_metrics()]
    rows = []
    for name, table in result.measured.items():
        cells = []
        for metric in metrics:
            level = table.get(metric, {})
            mean, low, high = level.get("mean"), level.get("min"), level.get("max")
            cells.append("–" if mean is None else f"{_fmt(mean)} [{_fmt(low, 2)}–{_fmt(high, 2)}]")
        rows.append([name, *cells])
    return ["configuration", *metrics], rows


def _rule_text() -> str:
    """The inside/outside rule in one paragraph, with the statistic's current constants."""
    return (
        f"Inside = seed-mean inside the reference's [min, max] seed band (widened by {TOLERANCE}× its width per side, "
        f"width floored at {FLOOR:.0%} of the reference mean) on ≥ {MIN_COVERAGE:.0%} of the common steps ('steps inside band'), "
        f"and the mean of per-seed means inside the reference's t prediction interval (two-sided, α = 0.05/{len(METRICS)} = {LEVEL_ALPHA:.4g}; "
        f"log scale for {', '.join(sorted(LOG_LEVEL))}) ('ratio band')."
    )


def render_markdown(result: CompareResult) -> str:
    lines = [f"# parityrl compare — reference: {result.reference}", "", result.summary, ""]
    lines += ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for row in _table_rows(result):
        row[-1] = f"**{row[-1]}**" if row[-1] == "outside" else row[-1]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", _rule_text()]
    if result.gap_closed:
        lines += ["", "## Share of the naive→reference gap closed", ""] + [f"- {line}" for line in _gap_lines(result)]
    header, rows = _measured_rows(result)
    if rows:
        lines += ["", "## Mismatch, staleness and aborts measured in the runs", "", MEASURED_NOTE, ""]
        lines += ["| " + " | ".join(f"`{h}`" if "/" in h else h for h in header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    diffs = {k: d for k, d in result.settings_diff.items() if d}
    if diffs:
        lines += ["", "## Settings that differ from the reference", ""]
        lines += [f"- {name}: " + ", ".join(f"`{k}={v}`" for k, v in d.items()) for name, d in diffs.items()]
    return "\n".join(lines) + "\n"


def render_html(result: CompareResult, png: bytes) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in TABLE_HEADER)
    body = ""
    for row in _table_rows(result):
        cls = ' class="outside"' if row[-1] == "outside" else ""
        body += f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>\n"
    gaps = "".join(f"<li>{esc(line)}</li>" for line in _gap_lines(result))
    measured_header, measured_rows = _measured_rows(result)
    measured = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>\n" for row in measured_rows)
    measured_head = "".join(f"<th>{esc(h)}</th>" for h in measured_header)
    measured_section = (
        f"<h2>Mismatch, staleness and aborts measured in the runs</h2><p>{esc(MEASURED_NOTE)}</p>"
        f"<table id='measured'><thead><tr>{measured_head}</tr></thead><tbody>{measured}</tbody></table>"
        if measured_rows
        else ""
    )
    image = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>parityrl compare: {esc(result.reference)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}tr.outside td{{background:#fde2e2;font-weight:bold}}
img{{max-width:100%}}</style></head><body>
<h1>parityrl compare — reference: {esc(result.reference)}</h1>
<p>{esc(result.summary)}</p>
<img alt="figure 1" src="data:image/png;base64,{image}">
<table id="verdict"><thead><tr>{head}</tr></thead><tbody>
{body}</tbody></table>
<p>{esc(_rule_text())}</p>
{f"<h2>Share of the naive&rarr;reference gap closed</h2><ul>{gaps}</ul>" if gaps else ""}
{measured_section}
</body></html>
"""


def render_verdict(result: CompareResult, console: Any) -> None:
    """Print the verdict table, gap shares and summary on a `rich.console.Console`."""
    from rich.table import Table

    table = Table(title=f"parityrl compare (reference: {result.reference})")
    for name in TABLE_HEADER:
        table.add_column(name, justify="left" if name in ("configuration", "metric") else "right")
    for row in _table_rows(result):
        style = "bold red" if row[-1] == "outside" else None
        table.add_row(*row, style=style)
    console.print(table)
    for line in _gap_lines(result):
        console.print(line, markup=False, highlight=False)
    header, rows = _measured_rows(result)
    if rows:
        measured = Table(title="measured in the runs (no verdict)", caption=MEASURED_NOTE)
        for name in header:
            measured.add_column(name, justify="left" if name == "configuration" else "right")
        for row in rows:
            measured.add_row(*row)
        console.print(measured)
    console.print(result.summary, markup=False)


def _smoothed(values: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling mean per seed, NaN-aware (figure only)."""
    if window <= 1:
        return values
    out = np.full_like(values, np.nan)
    half = window // 2
    for j in range(values.shape[1]):
        chunk = values[:, max(0, j - half) : j + half + 1]
        out[:, j] = nanmean(chunk, axis=1)
    return np.where(np.isnan(values), np.nan, out)


def plot_figure(configs: dict[str, Configuration], reference: str, path: Path, smooth: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = compared_metrics()
    rows = math.ceil(len(metrics) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.5 * rows), squeeze=False)
    palette = plt.get_cmap("tab10").colors
    order = [reference] + [n for n in configs if n != reference]
    windows: set[int] = set()
    for ax, metric in zip(axes.flat, metrics):
        positive = True
        for i, name in enumerate(order):
            cfg = configs[name]
            window = smooth if smooth is not None else max(1, len(cfg.steps) // 25)
            windows.add(window)
            values = _smoothed(cfg.values[metric.name], window)
            keep = np.any(~np.isnan(values), axis=0)
            if not keep.any():
                continue
            steps, values = cfg.steps[keep], values[:, keep]
            colour = "black" if name == reference else palette[(i - 1) % len(palette)]
            label = f"{name} (n={values.shape[0]})"
            ax.plot(steps, nanmean(values, axis=0), color=colour, linewidth=1.5, label=label)
            ax.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=colour, alpha=0.18, linewidth=0)
            positive &= bool(np.nanmin(values) > 0)
        if metric.log_scale and ax.has_data():
            ax.set_yscale("log" if positive else "symlog", **({} if positive else {"linthresh": 1e-6}))
        ax.set_title(metric.name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    smoothing = f", rolling mean over {max(windows)} steps" if windows and max(windows) > 1 else ""
    fig.suptitle(f"mean over seeds, band = min..max over seeds{smoothing} (reference: {reference})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- entry point


def compare_runs(run_dirs: list[Path], reference: str | None, out_dir: Path, smooth: int | None = None) -> CompareResult:
    """Group runs into configurations, test each against the reference's seed band, write the outputs."""
    configs = load_configurations(run_dirs)
    ref_name = reference or DEFAULT_REFERENCE
    if ref_name not in configs:
        raise ValueError(f"reference configuration '{ref_name}' not found; configurations: {', '.join(sorted(configs))} (use --reference)")
    result = judge(configs, ref_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.paths = {k: out_dir / f for k, f in (("figure", "figure1.png"), ("markdown", "verdict.md"), ("json", "verdict.json"), ("html", "compare.html"))}
    plot_figure(configs, ref_name, result.paths["figure"], smooth)
    result.markdown = render_markdown(result)
    write_text_atomic(result.paths["markdown"], result.markdown)
    write_json_atomic(result.paths["json"], result.to_json())
    write_text_atomic(result.paths["html"], render_html(result, result.paths["figure"].read_bytes()))
    return result
