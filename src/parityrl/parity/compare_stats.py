"""The statistic of `parityrl compare`: seed bands, the band test, verdicts (numbers only, no files).

Per configuration C, per Figure-1 metric (`metric_registry.compared_metrics()`), against reference R.
Step 0 (logged before any RL step) and null values are dropped; only steps where both C and R have
values are compared, so runs of different length are compared on their common steps.

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
   seed count, and it is wide exactly when the reference seeds disagree. For the mismatch signals
   (`Metric.mismatch_signal`: rl/kl_new_old and rl/clip_rate, positive, multiplicative, skewed across
   seeds) it runs on log levels. Half-width floored at `FLOOR` (log1p(FLOOR) on the log scale). Reported
   as `ratio` (C's mean / R's mean) and `ratio band` (the interval / R's mean). Why: coverage alone can be
   fooled by a reference band that is wide at a few steps; a systematic offset of the whole curve shows
   here. Why not the [min, max] of the 3 reference seed levels: its width is itself very noisy (a
   resample of the reference fell outside it ~15% of the time per metric in simulation).

C is **inside** iff coverage >= `MIN_COVERAGE` (0.5) *and* its level passes; otherwise **outside**.
Simulated with 3 vs 3 seeds, 40 steps, per-seed offsets plus AR(1) drift and per-step noise (lognormal
for KL and clip; the generator of tests/test_compare.py), over 60 draws: a resample of the reference
was called outside on at least one of the four metrics in 6/60 draws, a configuration with 10x KL and
clip was outside on both in 60/60, one with 3x in 59/60. With a single reference seed only the floors
are left, which the summary states.

Attribution: when a configuration named `naive-v1` exists, every other non-reference configuration
also gets the share of the naive->reference gap it closes on the mismatch signals:
(mean_naive - mean_C) / (mean_naive - mean_ref), on the means over common steps (1 = at the reference,
0 = no better than naive).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parityrl.metric_registry import compared_metrics

METRICS = tuple(m.name for m in compared_metrics())
GAP_METRICS = tuple(m.name for m in compared_metrics() if m.mismatch_signal)
LOG_LEVEL = frozenset(GAP_METRICS)  # level test on log per-seed means (positive, multiplicative, skewed)
NAIVE = "naive-v1"
DEFAULT_REFERENCE = "reference"

TOLERANCE = 0.5  # band widened by this x its width on each side
FLOOR = 0.05  # band width floor, as a fraction of the reference's mean |value|
MIN_COVERAGE = 0.5  # fraction of steps the seed-mean must spend inside the widened band
# false-"outside" rate of the level test per metric: 5% over the family of metrics (Bonferroni), so that
# "inside on all four" is not failed by chance one run in five
LEVEL_ALPHA = 0.05 / len(METRICS)


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
    measured: dict[str, list[float]] = field(default_factory=dict)
    """tabulated metric -> one level per seed (`metric_registry.run_level`; NaN where a seed logged none)."""


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


def nanmean(a: np.ndarray, axis: int) -> np.ndarray:
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
    levels = nanmean(values, axis=1)
    return levels[~np.isnan(levels)]


def band_test(name: str, metric: str, ref: np.ndarray, cfg: np.ndarray) -> MetricVerdict:
    """Verdict of `cfg` [seeds, steps] against `ref` [seeds, steps] on already-aligned steps."""
    cfg_mean = nanmean(cfg, axis=0)
    has_ref = np.any(~np.isnan(ref), axis=0)
    common = has_ref & ~np.isnan(cfg_mean)
    if not common.any():
        return MetricVerdict(name, metric, cfg.shape[0], 0, None, None, None, None, None, None, "n/a")
    ref, cfg_mean = ref[:, common], cfg_mean[common]
    ref_mean_curve = nanmean(ref, axis=0)
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


def outside_metrics(verdicts: list[MetricVerdict]) -> dict[str, list[str]]:
    """configuration -> metrics on which it is outside the reference band (configurations in verdict order)."""
    result: dict[str, list[str]] = {}
    for v in verdicts:
        if v.verdict == "outside":
            result.setdefault(v.configuration, []).append(v.metric)
    return result


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
    measured: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    """config -> tabulated metric -> {"mean", "min", "max"} over its seeds' levels (None where no seed logged it)."""
    markdown: str = ""
    paths: dict[str, Path] = field(default_factory=dict)

    def outside(self) -> dict[str, list[str]]:
        """config -> metrics on which it is outside the reference band."""
        return outside_metrics(self.verdicts)

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
            "measured": self.measured,
        }


def _measured(cfg: Configuration) -> dict[str, dict[str, float | None]]:
    table: dict[str, dict[str, float | None]] = {}
    for metric, levels in cfg.measured.items():
        finite = [level for level in levels if math.isfinite(level)]
        table[metric] = {
            "mean": sum(finite) / len(finite) if finite else None,
            "min": min(finite) if finite else None,
            "max": max(finite) if finite else None,
        }
    return table


def _settings_diff(ref: Configuration, cfg: Configuration) -> dict[str, Any]:
    keys = sorted(set(ref.settings) | set(cfg.settings))
    return {k: cfg.settings.get(k) for k in keys if ref.settings and cfg.settings and ref.settings.get(k) != cfg.settings.get(k)}


def _summary(reference: str, verdicts: list[MetricVerdict], ref_seeds: int) -> str:
    outside = outside_metrics(verdicts)
    compared = list(dict.fromkeys(v.configuration for v in verdicts))
    inside = [c for c in compared if c not in outside]
    parts = [f"{c} on {', '.join(ms)}" for c, ms in outside.items()]
    text = f"Outside the {reference} seed band: {'; '.join(parts)}." if parts else f"No configuration leaves the {reference} seed band."
    if inside:
        text += f" Inside on all compared metrics: {', '.join(inside)}."
    if ref_seeds < 2:
        text += f" Note: {reference} has a single seed, so its band is only the {FLOOR:.0%} floor."
    return text


def _gaps_closed(verdicts: list[MetricVerdict], others: list[str]) -> dict[str, dict[str, float | None]]:
    """config -> mismatch signal -> share of the naive->reference gap closed; empty without a naive-v1 configuration."""
    if NAIVE not in others:
        return {}
    by_key = {(v.configuration, v.metric): v for v in verdicts}
    return {name: {m: gap_closed(by_key[(NAIVE, m)], by_key[(name, m)]) for m in GAP_METRICS} for name in others if name != NAIVE}


def judge(configs: dict[str, Configuration], reference: str) -> CompareResult:
    """Every configuration other than `reference` tested against its seed band on each Figure-1 metric."""
    ref = configs[reference]
    others = [name for name in sorted(configs) if name != reference]
    verdicts = [band_test(name, m, *_aligned(ref, configs[name], m)) for name in others for m in METRICS]
    return CompareResult(
        reference=reference,
        configurations={n: [str(r) for r in c.runs] for n, c in configs.items()},
        verdicts=verdicts,
        gap_closed=_gaps_closed(verdicts, others),
        settings_diff={n: _settings_diff(ref, configs[n]) for n in others},
        summary=_summary(reference, verdicts, len(ref.runs)),
        measured={name: _measured(configs[name]) for name in [reference, *others]},
    )
