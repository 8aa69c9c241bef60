"""`parityrl compare RUN_DIR...`: Figure-1 panels with seed bands and a computed inside/outside verdict.

Inputs. Each run directory holds `metrics.jsonl` (one object per step, `null` for undefined values) and
usually `config.yaml`. A path without `metrics.jsonl` is searched recursively for run directories, so
`parityrl compare ablate_out` works. Runs are grouped into *configurations*: a run directory named
`seed<N>` belongs to the configuration named after its parent (`ablate_out/<config>/seed<N>/`); any
other run directory is a configuration of its own. The reference configuration is `--reference`, else
the one named `reference`.

Outputs in OUT_DIR: `figure1.png` (2x2 panels rl/clip_rate, rl/kl_new_old (log y), rl/entropy,
rl/reward; one colour per configuration, the reference in black; line = mean over seeds, shaded band =
min..max over seeds, the same band the verdict uses), `verdict.md`, `verdict.json`, `compare.html`
(standalone: the PNG is embedded as base64). Smoothing is a centred rolling mean applied to each seed
*for the figure only* (default window: n_steps // 25, at least 1, i.e. light); the verdict always uses
the raw values.

The statistic (per configuration C, per metric, against reference R). Step 0 (logged before any RL
step) and null values are dropped; only steps where both C and R have values are compared, so runs of
different length are compared on their common steps.

1. Step coverage. At each step s, the reference band is [min, max] over R's seeds, widened on each side
   by `TOLERANCE` (0.5) x its width; the width is floored at `FLOOR` (5%) of the reference's mean |value|
   over the run so that a band where all seeds coincide (a saturated reward, a clip rate of exactly 0)
   does not turn rounding into "outside". `coverage` = fraction of steps at which C's seed-mean lies in
   the widened band. Why: it follows the curves in time (reward and entropy trend), needs no
   distributional assumption, and with many steps one noisy step cannot flip the verdict.
2. Level. Each seed's mean over the compared steps is its *level*. C's mean level must lie in the
   prediction interval of R's levels: mean_R +- t(1 - alpha/2, n_R - 1) * s_R * sqrt(1/n_R + 1/n_C), with
   s_R = std (ddof 1) of R's levels and alpha = 0.05/4 (5% over the family of four metrics, Bonferroni).
   This is a two-sample t test using the reference's spread: its false-"outside" rate is alpha at any
   seed count, and it is wide exactly when the reference seeds disagree. For rl/kl_new_old and
   rl/clip_rate (positive, multiplicative, skewed across seeds) it runs on log levels. Half-width
   floored at `FLOOR` (log1p(FLOOR) on the log scale). Reported as `ratio` (C's mean / R's mean) and
   `ratio band` (the interval / R's mean). Why: coverage alone can be fooled by a reference band that
   is wide at a few steps; a systematic offset of the whole curve shows here. Why not the [min, max]
   of the 3 reference seed levels: its width is itself very noisy (a resample of the reference fell
   outside it ~15% of the time per metric in simulation).

C is **inside** iff coverage >= `MIN_COVERAGE` (0.5) *and* its level passes; otherwise **outside**.
Simulated with 3 vs 3 seeds, 40 steps, per-seed offsets plus AR(1) drift and per-step noise (lognormal
for KL and clip; the generator of tests/test_compare.py), over 60 draws: a resample of the reference
was called outside on at least one of the four metrics in 6/60 draws, a configuration with 10x KL and
clip was outside on both in 60/60, one with 3x in 59/60. With a single reference seed only the floors
are left, which the summary states.

Attribution: when a configuration named `naive-v1` exists, every other non-reference configuration
also gets the share of the naive->reference gap it closes on rl/kl_new_old and rl/clip_rate:
(mean_naive - mean_C) / (mean_naive - mean_ref), on the means over common steps (1 = at the reference,
0 = no better than naive).
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from parityrl.metrics import read_metrics, write_json_atomic, write_text_atomic

METRICS = ("rl/clip_rate", "rl/kl_new_old", "rl/entropy", "rl/reward")
LOG_Y = {"rl/kl_new_old"}
GAP_METRICS = ("rl/kl_new_old", "rl/clip_rate")
NAIVE = "naive-v1"
DEFAULT_REFERENCE = "reference"

TOLERANCE = 0.5  # band widened by this x its width on each side
FLOOR = 0.05  # band width floor, as a fraction of the reference's mean |value|
MIN_COVERAGE = 0.5  # fraction of steps the seed-mean must spend inside the widened band
# false-"outside" rate of the level test per metric: 5% over the family of four metrics (Bonferroni), so that
# "inside on all four" is not failed by chance one run in five
LEVEL_ALPHA = 0.05 / 4
LOG_LEVEL = {"rl/kl_new_old", "rl/clip_rate"}  # level test on log per-seed means (positive, skewed)

SEED_DIR = re.compile(r"^seed[_-]?\d+$")
IGNORED_CONFIG_KEYS = ("seed", "_versions", "logging.")


# --------------------------------------------------------------------------- loading


@dataclass
class Configuration:
    name: str
    runs: list[Path]
    steps: np.ndarray
    """Sorted steps (step 0 dropped) at which any seed logged any of METRICS."""
    values: dict[str, np.ndarray]
    """metric -> [seeds, steps] with NaN where a seed logged nothing."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Flattened config.yaml of the first seed (empty if absent)."""


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
                if isinstance(value, (int, float)) and math.isfinite(value):
                    values[metric][seed, column] = float(value)
    return Configuration(name, runs, np.array(steps, dtype=int), values, _read_settings(runs[0]))


def load_configurations(run_dirs: list[Path]) -> dict[str, Configuration]:
    groups: dict[str, list[Path]] = {}
    for run in find_run_dirs(run_dirs):
        groups.setdefault(configuration_name(run), []).append(run)
    return {name: _load_configuration(name, sorted(runs)) for name, runs in groups.items()}


# --------------------------------------------------------------------------- statistic


@dataclass
class MetricVerdict:
    configuration: str
    metric: str
    seeds: int
    steps: int
    """Steps compared (common to this configuration and the reference)."""
    mean: float | None
    reference_mean: float | None
    ratio: float | None
    """mean / reference_mean."""
    ratio_band: tuple[float, float] | None
    """Prediction interval of the reference's per-seed means (see `level_test`), as ratios to reference_mean."""
    coverage: float | None
    """Fraction of compared steps where the seed-mean lies in the widened reference band."""
    level_inside: bool | None
    verdict: str
    """'inside', 'outside' or 'n/a' (no common data)."""


def _widen(lo: np.ndarray | float, hi: np.ndarray | float, floor: float) -> tuple[Any, Any]:
    width = np.maximum(np.asarray(hi) - np.asarray(lo), floor)
    return lo - TOLERANCE * width, hi + TOLERANCE * width


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmean without the all-NaN RuntimeWarning (all-NaN slices give NaN)."""
    count = np.sum(~np.isnan(a), axis=axis)
    total = np.nansum(a, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def t_quantile(prob: float, df: int) -> float:
    """Student t quantile (no scipy): bisection on the CDF, integrated numerically from the density."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:
        x = np.linspace(0.0, t, 20001)
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))
        return 0.5 + float(np.sum((density[1:] + density[:-1]) * np.diff(x)) / 2)

    lo, hi = 0.0, 1e3
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < prob else (lo, mid)
    return (lo + hi) / 2


def level_test(
    ref_levels: np.ndarray, cfg_levels: np.ndarray, floor: float, log_scale: bool
) -> tuple[bool, tuple[float, float]]:
    """Is the configuration's mean of per-seed levels inside the reference's prediction interval?

    Interval: mean(ref) +- t(1 - LEVEL_ALPHA/2, n_ref - 1) * s_ref * sqrt(1/n_ref + 1/n_cfg), s_ref = std (ddof 1)
    of the reference's per-seed levels: a two-sample t test with the reference's spread, so the false-"outside"
    rate is LEVEL_ALPHA at any seed count, and the interval is wide exactly when the reference seeds disagree.
    On a log scale (KL, clip: positive, multiplicative, skewed across seeds) the test runs on log levels.
    Half-width >= `floor`; with a single reference seed only the floor is left. Returns (inside, interval in
    the metric's own units).
    """
    f, f_inv = (np.log, np.exp) if log_scale else (lambda v: v, lambda v: v)
    ref_t, cfg_t = f(ref_levels), f(cfg_levels)
    centre = float(np.mean(ref_t))
    n_ref, n_cfg = len(ref_t), len(cfg_t)
    half = 0.0
    if n_ref >= 2:
        t = t_quantile(1 - LEVEL_ALPHA / 2, n_ref - 1)
        half = t * float(np.std(ref_t, ddof=1)) * math.sqrt(1 / n_ref + 1 / n_cfg)
    half = max(half, math.log1p(FLOOR) if log_scale else floor)
    inside = abs(float(np.mean(cfg_t)) - centre) <= half
    return inside, (float(f_inv(centre - half)), float(f_inv(centre + half)))


def _seed_levels(values: np.ndarray) -> np.ndarray:
    """Mean over steps of each seed, seeds without data dropped."""
    levels = _nanmean(values, axis=1)
    return levels[~np.isnan(levels)]


def band_test(name: str, metric: str, ref: np.ndarray, cfg: np.ndarray) -> MetricVerdict:
    """Verdict of `cfg` [seeds, steps] against `ref` [seeds, steps] on already-aligned steps."""
    cfg_mean = _nanmean(cfg, axis=0)
    has_ref = np.any(~np.isnan(ref), axis=0)
    common = has_ref & ~np.isnan(cfg_mean)
    if not common.any():
        return MetricVerdict(name, metric, cfg.shape[0], 0, None, None, None, None, None, None, "n/a")
    ref, cfg_mean = ref[:, common], cfg_mean[common]
    ref_mean_curve = _nanmean(ref, axis=0)
    ref_level = float(np.mean(ref_mean_curve))
    floor = FLOOR * float(np.mean(np.abs(ref_mean_curve))) + 1e-12
    # 1. step coverage: seed-mean inside the per-step widened [min, max] of the reference seeds
    lo, hi = _widen(np.nanmin(ref, axis=0), np.nanmax(ref, axis=0), floor)
    coverage = float(np.mean((cfg_mean >= lo) & (cfg_mean <= hi)))
    # 2. level: the configuration's per-seed means vs the reference's, by a t prediction interval
    ref_levels, cfg_levels = _seed_levels(ref), _seed_levels(cfg[:, common])
    log_scale = metric in LOG_LEVEL and bool(np.all(ref_levels > 0) and np.all(cfg_levels > 0))
    level_inside, (level_lo, level_hi) = level_test(ref_levels, cfg_levels, floor, log_scale)
    level = float(np.mean(cfg_mean))
    ratio = level / ref_level if ref_level != 0 else None
    ratio_band = (float(level_lo) / ref_level, float(level_hi) / ref_level) if ref_level != 0 else None
    if ratio_band is not None and ref_level < 0:
        ratio_band = (ratio_band[1], ratio_band[0])
    inside = coverage >= MIN_COVERAGE and level_inside
    return MetricVerdict(
        name, metric, cfg.shape[0], int(common.sum()), level, ref_level, ratio, ratio_band, coverage,
        level_inside, "inside" if inside else "outside",
    )


def _aligned(ref: Configuration, cfg: Configuration, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Both configurations' [seeds, steps] restricted to their common steps."""
    _, ref_idx, cfg_idx = np.intersect1d(ref.steps, cfg.steps, return_indices=True)
    return ref.values[metric][:, ref_idx], cfg.values[metric][:, cfg_idx]


def gap_closed(naive: MetricVerdict, cfg: MetricVerdict) -> float | None:
    """(naive - cfg) / (naive - reference) on the means; None when undefined."""
    if naive.mean is None or cfg.mean is None or cfg.reference_mean is None:
        return None
    gap = naive.mean - cfg.reference_mean
    if abs(gap) <= 1e-12 * max(abs(naive.mean), 1e-300):
        return None
    return (naive.mean - cfg.mean) / gap


# --------------------------------------------------------------------------- result


@dataclass
class CompareResult:
    reference: str
    configurations: dict[str, list[str]]
    """name -> run directories (seeds)."""
    verdicts: list[MetricVerdict]
    gap_closed: dict[str, dict[str, float | None]]
    """config -> metric -> share of the naive->reference gap closed (empty without a naive-v1 run)."""
    settings_diff: dict[str, dict[str, Any]]
    """config -> config.yaml keys whose value differs from the reference's."""
    summary: str
    markdown: str = ""
    paths: dict[str, Path] = field(default_factory=dict)

    def outside(self) -> dict[str, list[str]]:
        """config -> metrics on which it is outside the reference band."""
        result: dict[str, list[str]] = {}
        for v in self.verdicts:
            if v.verdict == "outside":
                result.setdefault(v.configuration, []).append(v.metric)
        return result

    def verdict(self, configuration: str, metric: str) -> str:
        return next(v.verdict for v in self.verdicts if v.configuration == configuration and v.metric == metric)

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "configurations": self.configurations,
            "statistic": {"tolerance": TOLERANCE, "floor": FLOOR, "min_coverage": MIN_COVERAGE, "level_alpha": LEVEL_ALPHA, "log_level": sorted(LOG_LEVEL)},
            "verdicts": [asdict(v) for v in self.verdicts],
            "outside": self.outside(),
            "gap_closed": self.gap_closed,
            "settings_diff": self.settings_diff,
            "summary": self.summary,
        }


def _settings_diff(ref: Configuration, cfg: Configuration) -> dict[str, Any]:
    keys = sorted(set(ref.settings) | set(cfg.settings))
    return {k: cfg.settings.get(k) for k in keys if ref.settings and cfg.settings and ref.settings.get(k) != cfg.settings.get(k)}


def _summary(reference: str, verdicts: list[MetricVerdict], ref_seeds: int) -> str:
    outside: dict[str, list[str]] = {}
    others: list[str] = []
    for v in verdicts:
        if v.configuration not in outside and v.configuration not in others:
            others.append(v.configuration)
        if v.verdict == "outside":
            outside.setdefault(v.configuration, []).append(v.metric)
    inside = [c for c in others if c not in outside]
    parts = [f"{c} on {', '.join(ms)}" for c, ms in outside.items()]
    text = f"Outside the {reference} seed band: {'; '.join(parts)}." if parts else f"No configuration leaves the {reference} seed band."
    if inside:
        text += f" Inside on all compared metrics: {', '.join(inside)}."
    if ref_seeds < 2:
        text += f" Note: {reference} has a single seed, so its band is only the {FLOOR:.0%} floor."
    return text


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


def render_markdown(result: CompareResult) -> str:
    lines = [f"# parityrl compare — reference: {result.reference}", "", result.summary, ""]
    lines += ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for row in _table_rows(result):
        row[-1] = f"**{row[-1]}**" if row[-1] == "outside" else row[-1]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Inside = seed-mean inside the reference's [min, max] seed band (widened by {TOLERANCE}× its width per side, "
        f"width floored at {FLOOR:.0%} of the reference mean) on ≥ {MIN_COVERAGE:.0%} of the common steps ('steps inside band'), "
        "and the mean of per-seed means inside the reference's t prediction interval (two-sided, α = 0.05/4; log scale for KL and clip) ('ratio band').",
    ]
    if result.gap_closed:
        lines += ["", "## Share of the naive→reference gap closed", ""] + [f"- {line}" for line in _gap_lines(result)]
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
<p>Inside = seed-mean inside the reference's [min, max] seed band widened by {TOLERANCE}&times; its width per side
(width floored at {FLOOR:.0%} of the reference mean) on &ge; {MIN_COVERAGE:.0%} of the common steps, and the mean over steps
of each seed inside the reference's t prediction interval (two-sided, &alpha; = 0.05/4; log scale for KL and clip; 'ratio band').</p>
{f"<h2>Share of the naive&rarr;reference gap closed</h2><ul>{gaps}</ul>" if gaps else ""}
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
    console.print(result.summary, markup=False)


def _smoothed(values: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling mean per seed, NaN-aware (figure only)."""
    if window <= 1:
        return values
    out = np.full_like(values, np.nan)
    half = window // 2
    for j in range(values.shape[1]):
        chunk = values[:, max(0, j - half) : j + half + 1]
        out[:, j] = _nanmean(chunk, axis=1)
    return np.where(np.isnan(values), np.nan, out)


def plot_figure(configs: dict[str, Configuration], reference: str, path: Path, smooth: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    palette = plt.get_cmap("tab10").colors
    order = [reference] + [n for n in configs if n != reference]
    windows: set[int] = set()
    for ax, metric in zip(axes.flat, METRICS):
        positive = True
        for i, name in enumerate(order):
            cfg = configs[name]
            window = smooth if smooth is not None else max(1, len(cfg.steps) // 25)
            windows.add(window)
            values = _smoothed(cfg.values[metric], window)
            keep = np.any(~np.isnan(values), axis=0)
            if not keep.any():
                continue
            steps, values = cfg.steps[keep], values[:, keep]
            colour = "black" if name == reference else palette[(i - 1) % len(palette)]
            label = f"{name} (n={values.shape[0]})"
            ax.plot(steps, _nanmean(values, axis=0), color=colour, linewidth=1.5, label=label)
            ax.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=colour, alpha=0.18, linewidth=0)
            positive &= bool(np.nanmin(values) > 0)
        if metric in LOG_Y and ax.has_data():
            ax.set_yscale("log" if positive else "symlog", **({} if positive else {"linthresh": 1e-6}))
        ax.set_title(metric)
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
    ref = configs[ref_name]
    others = [name for name in sorted(configs) if name != ref_name]
    verdicts = [band_test(name, m, *_aligned(ref, configs[name], m)) for name in others for m in METRICS]
    gaps: dict[str, dict[str, float | None]] = {}
    if NAIVE in others:
        by_key = {(v.configuration, v.metric): v for v in verdicts}
        for name in others:
            if name != NAIVE:
                gaps[name] = {m: gap_closed(by_key[(NAIVE, m)], by_key[(name, m)]) for m in GAP_METRICS}
    result = CompareResult(
        reference=ref_name,
        configurations={n: [str(r) for r in c.runs] for n, c in configs.items()},
        verdicts=verdicts,
        gap_closed=gaps,
        settings_diff={n: _settings_diff(ref, configs[n]) for n in others},
        summary=_summary(ref_name, verdicts, len(ref.runs)),
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.paths = {k: out_dir / f for k, f in (("figure", "figure1.png"), ("markdown", "verdict.md"), ("json", "verdict.json"), ("html", "compare.html"))}
    plot_figure(configs, ref_name, result.paths["figure"], smooth)
    result.markdown = render_markdown(result)
    write_text_atomic(result.paths["markdown"], result.markdown)
    write_json_atomic(result.paths["json"], result.to_json())
    write_text_atomic(result.paths["html"], render_html(result, result.paths["figure"].read_bytes()))
    return result
