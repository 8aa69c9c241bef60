"""Every metric parityrl logs or reports, once: its name, what it means, where it is drawn.

Names are part of the interface (../shared/DESIGN.md, "Metrics"). Everything that lists metrics reads
this module: the PNG panels (`plot.py`), `compare`'s Figure 1 and verdict (`parity/compare*.py`), the
table of `parityrl check` (`cli.py`) and docs/metrics.md (`scripts/update_references.py`, kept
current by `tests/test_metric_registry.py`). A new metric is added here, in the panel it belongs to.

Token quantities average over generated tokens; `old` is the engine's logprob at sampling time, `new`
the trainer's under its current weights, `r = new − old`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from itertools import groupby


@dataclass(frozen=True)
class Panel:
    name: str
    title: str
    """What the panel's metrics have in common (a section heading of docs/metrics.md)."""
    plotted: bool
    """Drawn as RUN_DIR/plots/<name>.png. False for metrics that only `parityrl check` reports."""


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    """One line, as in docs/metrics.md's table."""
    panel: str
    log_scale: bool = False
    """Plot the y axis on a log scale (the value spans decades, e.g. a KL between 1e-12 and 1e-2)."""
    scalar: bool = True
    """False for values that are not one number per step (a list, a string): never plotted."""
    check_title: str | None = None
    """Short column title in the table of `parityrl check`; None: not a column there."""
    compared: bool = False
    """One of the four Figure-1 metrics that `parityrl compare` draws and gives a verdict on."""
    mismatch_signal: bool = False
    """Positive and grows multiplicatively with engine/trainer mismatch: `compare` tests its level on a log
    scale and reports the share of the naive->reference gap each fix closes on it."""
    tabulated: bool = False
    """`parityrl compare` also lists it per configuration, without a verdict: the mismatch, staleness or abort
    that a fix acts on, measured in the RL runs themselves (`run_level` says how a run is summarised)."""
    family: str | None = None
    """Metrics with the same family share one row of docs/metrics.md (the statistics of one check comparison)."""
    good: str | None = None
    """What a healthy run shows, printed under the metric's plot (the parity panel's captions)."""


PANELS: tuple[Panel, ...] = (
    Panel("rl", "learning signal and outcome", plotted=True),
    Panel("parity", "engine vs trainer on the same tokens at the same weights", plotted=True),
    Panel("pipeline", "staleness and faults of the batch", plotted=True),
    Panel("episode", "multi-turn episodes (`task.kind: environment`)", plotted=True),
    Panel("perf", "throughput", plotted=True),
    Panel("train", "the optimiser step", plotted=True),
    Panel("check", "reported by `parityrl check` only (keys of `--json`)", plotted=False),
)

# The statistics of one engine-vs-recompute comparison in `parityrl check` (scoring.Mismatch.summary):
# key suffix -> meaning.
COMPARISON_STATISTICS: dict[str, str] = {
    "kl": "k3 per token",
    "abs_diff_mean": "mean |engine − trainer logprob|",
    "abs_diff_max": "max |engine − trainer logprob|",
    "frac_abs_diff_gt_1e-3": "fraction of tokens with |engine − trainer logprob| > 1e-3",
    "outside_support_frac": "sampled tokens outside the trainer's top-k/top-p support",
    "tokens": "tokens compared",
}


def _check_comparison(prefix: str, subject: str, check_titles: dict[str, str] | None = None) -> tuple[Metric, ...]:
    """The statistics `parityrl check` reports under `prefix` for one comparison of `subject`."""
    titles = check_titles or {}
    return tuple(
        Metric(f"{prefix}/{statistic}", f"{meaning}, for {subject}", "check", check_title=titles.get(statistic), family=subject)
        for statistic, meaning in COMPARISON_STATISTICS.items()
    )


METRICS: tuple[Metric, ...] = (
    # --- rl
    Metric("rl/clip_rate", "fraction of units (sequences for GSPO, tokens otherwise) whose clipped branch is active", "rl",
           compared=True, mismatch_signal=True),
    Metric("rl/kl_new_old", "k3 estimator `exp(r) − r − 1`, `r = new − old`", "rl", log_scale=True, compared=True, mismatch_signal=True),
    Metric("rl/entropy", "entropy of the trainer's sampling distribution (after temperature/top-k/top-p)", "rl", compared=True),
    Metric("rl/reward", "mean reward", "rl", compared=True),
    Metric("rl/success", "fraction of samples with reward 1", "rl"),
    Metric("rl/completion_len", "mean completion length (tokens) of the samples trained on", "rl", tabulated=True),
    Metric("rl/completion_lens", "length (tokens) of each sample trained on, in batch order: the distribution behind "
           "`rl/completion_len` (an abort-mode update cuts long samples short)", "rl", scalar=False),
    Metric("eval/success", "greedy success on the held-out split (start, every `train.eval_every` steps, end)", "rl"),
    Metric("eval/answered", "`math_verify` reward: share of held-out completions that state a final answer (a `\\boxed{}` or "
           "an answer line), not a bare last line", "rl"),
    Metric("eval/correct_given_answered", "`math_verify` reward: `eval/success` among the completions that answered "
           "(`eval/answered`): arithmetic, with format taken out (left out when none answered)", "rl"),
    Metric("eval/last_number_correct", "`math_verify` reward: share of held-out completions whose last number is the answer, "
           "whatever the format", "rl"),
    Metric("eval/ood_success", "`eval/success` on the `task.eval_path` set (problems outside the training distribution)", "rl"),
    Metric("eval/ood_answered", "`eval/answered` on the `task.eval_path` set", "rl"),
    Metric("eval/ood_correct_given_answered", "`eval/correct_given_answered` on the `task.eval_path` set", "rl"),
    Metric("eval/ood_last_number_correct", "`eval/last_number_correct` on the `task.eval_path` set", "rl"),
    # --- parity
    Metric("parity/kl", "`rl/kl_new_old` restricted to sequences generated entirely by the trainer's current version: "
           "pure engine-vs-trainer mismatch (in `check`: k3 per token at the same weights)", "parity", log_scale=True, check_title="kl",
           tabulated=True, good="fp32: 1e-12 to 1e-9 (rounding only). bf16: the engine's own bf16 arithmetic, 1e-5 to 1e-3 "
           "(`parityrl check` reports it as parity_fp32/kl); far above it, or growing, is a backend mismatch"),
    Metric("parity/abs_diff_mean", "mean |new − old| on the tokens of `parity/kl`", "parity", log_scale=True, check_title="mean|Δ|"),
    Metric("parity/abs_diff_max", "max |new − old| on the tokens of `parity/kl`", "parity", log_scale=True, check_title="max|Δ|",
           good="fp32: below 1e-5. A single token far off (e.g. 0.1 in fp32) is one sampled at a top-k/top-p edge"),
    Metric("parity/coverage", "fraction of the trained batch's tokens that `parity/*` could use themselves: generated by the "
           "trainer's current version (the probe's tokens, `parity/probe_tokens`, are counted apart)", "parity",
           good="sync mode: 1. Async: 0 is normal (the batch is a version behind); `parity/*` then comes from the probe"),
    Metric("parity/probe_tokens", "tokens of the parity probe (`pipeline.parity_probe_prompts`: generated right after each update, "
           "scored before the next step, not trained on) that qualified for `parity/*`", "parity"),
    Metric("parity/outside_support_frac", "sampled tokens outside the trainer's top-k/top-p support; they are masked out of the loss "
           "(never −inf/NaN)", "parity", check_title="outside", tabulated=True, good="0, or under 1% at a top-p/top-k cut-off"),
    Metric("parity/kl_per_turn", "`parity/kl` of each episode turn (turn 1 first; `task.kind: environment`), batch and probe",
           "parity", scalar=False),
    Metric("parity/kl_per_replica", "`parity/kl` of each engine replica (`pipeline.backend: ray`), by replica id", "parity", scalar=False),
    # full-distribution parity (`parityrl check --full-vocab`): the engine lists its top-K processed logprobs per position;
    # with K < vocabulary size the unlisted tokens are pooled into one outcome on both sides (lower bounds of KL and TV)
    Metric("parity/full_kl", "mean over sampled positions of KL(engine‖trainer) over the whole processed distribution "
           "(positions whose supports differ left out)", "parity", log_scale=True, check_title="full kl"),
    Metric("parity/full_tv", "mean over sampled positions of the total variation between the engine's and the trainer's processed "
           "distributions (positions whose supports differ left out)", "parity", log_scale=True, check_title="full tv"),
    Metric("parity/support_mismatch_frac", "fraction of sampled positions whose truncated (top-k/top-p) supports differ between "
           "engine and trainer (a token with mass on one side only)", "parity", check_title="supp≠"),
    # --- pipeline
    Metric("pipeline/kv_staleness_kl", "k3 of tokens produced after an inflight update (on KV built by old weights) vs a full recompute",
           "pipeline", log_scale=True, check_title="kv stale", tabulated=True),
    Metric("pipeline/lag_mean", "trainer version minus the version that generated each token, averaged over tokens", "pipeline"),
    Metric("pipeline/lag_max", "largest lag of any token in the batch", "pipeline"),
    Metric("pipeline/mixed_version_frac", "fraction of sequences that span a weight update", "pipeline"),
    Metric(
        "pipeline/aborted_frac",
        "fraction of the samples trained on that a weight update aborted (`engine.update_mode: abort`): cut short, so "
        "long completions are under-represented",
        "pipeline",
        tabulated=True,
    ),
    Metric("pipeline/dropped_groups", "prompt groups dropped for being more than `pipeline.max_lag` versions behind", "pipeline"),
    Metric("pipeline/reward_errors", "rewards that failed (raised, NaN or timed out; scored 0) in this step", "pipeline"),
    Metric("pipeline/requeued_groups", "prompt groups generated again after an engine failure, in this step", "pipeline"),
    Metric("pipeline/engine_restarts", "engine restarts in this step", "pipeline"),
    Metric("pipeline/group_ids", "ids of the prompt groups trained on in this step (unique over the run, across restarts and resumes)",
           "pipeline", scalar=False),
    # --- episode
    Metric("episode/turns", "assistant turns per episode, mean over the step's episodes", "episode"),
    Metric("episode/env_tokens", "environment and template tokens per episode (context, not trained on), mean", "episode"),
    Metric("episode/env_errors", "environment calls that failed (raised, hung, returned the wrong type; the episode scored 0) in this step", "episode"),
    Metric("episode/tool_calls", "`tool` messages per episode (the environment's answers to tool calls), mean", "episode"),
    Metric("episode/tool_call_success", "fraction of `tool` messages that do not start with `error` (calls that ran); none without calls", "episode"),
    Metric("episode/retokenization_drift_frac", "episodes whose conversation, rendered as text and tokenized again (the naive "
           "multi-turn path), gives other tokens than the ones sampled: what a re-tokenizing trainer would train on wrongly", "episode"),
    Metric("episode/turn1_success", "fraction of episodes solved at their first turn (reward >= 1 after one turn)", "episode"),
    # --- perf
    Metric("perf/rollout_tok_s", "tokens the engine generated per wall-clock second since the previous step", "perf"),
    Metric("perf/rollout_tok_s_per_replica", "`perf/rollout_tok_s` of each engine replica (`pipeline.backend: ray`), by replica id",
           "perf", scalar=False),
    Metric("perf/train_tok_s", "completion tokens per second of the optimiser step", "perf"),
    Metric(
        "perf/weight_sync_s",
        "seconds the last weight publication took (stage, pause, load, resume); async mode publishes in the "
        "background, so this is the previous step's, overlapped with this one",
        "perf",
    ),
    Metric("perf/batch_wait_s",
           "seconds this step waited for its batch (sync mode: the whole generation and reward of it; async: what the engine had not produced yet)", "perf"),
    Metric("perf/forward_s", "seconds of this step's forward passes (model body, chunked head, processed distribution, loss), all micro-batches", "perf"),
    Metric("perf/backward_s", "seconds of this step's backward passes (with the recomputation activation checkpointing does), all micro-batches", "perf"),
    Metric("perf/trainer_rss_gb", "resident memory of the trainer process (a Ray rank: rank 0's) at the end of this step, GB", "perf"),
    Metric("perf/trainer_peak_rss_gb", "peak resident memory of the trainer process since it started (the kernel's high-water mark), GB", "perf"),
    Metric("train/micro_batches", "forward/backward passes this step took (`train.micro_batch_tokens`, `train.micro_batch_size`)", "train"),
    Metric("perf/probe_wait_s", "seconds this step waited, after its backward passes, for the parity probe's samples (part of train/step_s)", "perf"),
    Metric("perf/trainer_threads", "torch threads this step's forward and backward ran with (`train.threads: auto` adapts them)", "perf"),
    Metric("perf/prefix_cache_hit_frac", "prompt tokens of the step's samples that vLLM served from its prefix cache (`engine.prefix_caching`), "
           "over all their prompt tokens: prefill work saved", "perf"),
    Metric("perf/engine_idle_frac", "fraction of the RL wall time so far that the engine had no request", "perf"),
    Metric("perf/trainer_idle_frac", "fraction of the RL wall time so far that the trainer waited for a batch", "perf"),
    # --- train
    Metric("train/loss", "objective loss per unit (sequence for GSPO, token otherwise)", "train"),
    Metric("train/grad_norm", "global gradient norm before clipping", "train"),
    Metric("train/tokens", "completion tokens in the batch", "train"),
    Metric("train/step_s", "seconds of the optimiser step", "train"),
    Metric("train/skipped_steps", "1 when the step was skipped for a NaN/inf logprob, loss or gradient (weights unchanged)", "train"),
    Metric("train/skip_reason", "why the step was skipped", "train", scalar=False),
    Metric("train/world_size", "data-parallel trainer ranks that took the step (`pipeline.backend: ray`)", "train"),
    # --- check only; the first two are the static comparison's statistics that training does not log
    Metric("parity/frac_abs_diff_gt_1e-3", COMPARISON_STATISTICS["frac_abs_diff_gt_1e-3"], "check", check_title=">1e-3"),
    Metric("parity/tokens", COMPARISON_STATISTICS["tokens"] + " by the static comparison", "check"),
    Metric("parity/full_positions", "sampled positions compared by `check --full-vocab`", "check"),
    Metric("parity/full_listed_tokens", "most tokens the engine listed at one position (K); below the vocabulary size the rest is "
           "pooled, so `parity/full_kl` and `parity/full_tv` are lower bounds", "check"),
    Metric("inflight/sequences", "sequences generated across the inflight weight update", "check"),
    Metric("inflight/spanning_frac", "fraction of them that span the update", "check"),
    Metric("inflight/aborted_frac", "fraction of in-flight requests the update aborted", "check", check_title="aborted"),
    Metric("inflight/unreplayable_frac", "fraction of the spanning sequences left out of `inflight_v1_kept_kv/*`: they waited in "
           "vLLM's queue across the update and read prompt blocks cached at v (`engine.prefix_caching: versioned`)", "check"),
    *_check_comparison("inflight_v", "tokens of version v of in-flight sequences, vs a full recompute at v"),
    *_check_comparison("inflight_v1_kept_kv", "v+1 tokens of sequences spanning the update, vs a reference that applied the update "
                       "at the same position keeping its KV", {"abs_diff_max": "v+1 max|Δ|"}),
    *_check_comparison("post_update", "requests started after the update, vs a full v+1 recompute; among them a sequence sampled "
                       "at v past its prompt's last KV block, asked for as a prompt (fix 2's hazard)", {"kl": "post kl"}),
    Metric("post_update/hazard_prompt_tokens", "length of the sequence sampled at v and requested as a prompt after the update (0: "
           "the engine has no block cache, or the context cannot hold it and a continuation)", "check"),
    Metric("post_update/cached_prompt_frac", "prompt tokens of the post-update requests vLLM served from its prefix cache (under "
           "`versioned` only blocks of v+1, shared by a group's samples)", "check"),
    Metric("parity/same_samples_frac", "`check --attribute`: fraction of the static samples whose tokens are the same in every "
           "row (the same prompts and seeds; a setting that moves the logits, such as the head's dtype, changes a few)", "check"),
    *_check_comparison("parity_common", "`check --attribute`: the static samples whose tokens are the same in every row, so each "
                       "row's mismatch is measured on the same tokens", {"kl": "kl, same tokens"}),
    *_check_comparison("parity_fp32", "the static samples of a bf16 run, vs the trainer computing the same weights in fp32: the "
                       "engine's own rounding, the floor under `parity/kl` for any bf16 trainer", {"kl": "kl vs fp32"}),
)

_BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}


def metric(name: str) -> Metric:
    """The registry entry of `name`; a KeyError names the unknown metric."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a registered metric (parityrl.metric_registry.METRICS)") from None


def plot_panels() -> dict[str, tuple[Metric, ...]]:
    """Panel name -> the metrics drawn in RUN_DIR/plots/<name>.png, in registry order."""
    return {p.name: tuple(m for m in METRICS if m.panel == p.name and m.scalar) for p in PANELS if p.plotted}


def check_columns() -> tuple[Metric, ...]:
    """The columns of `parityrl check`'s table, `parity/kl` first (the table also shows it as a ratio)."""
    kl = metric("parity/kl")
    return (kl, *(m for m in METRICS if m.check_title and m is not kl))


def compared_metrics() -> tuple[Metric, ...]:
    """The Figure-1 metrics of `parityrl compare`, in panel order (clip rate, KL, entropy, reward)."""
    return tuple(m for m in METRICS if m.compared)


def tabulated_metrics() -> tuple[Metric, ...]:
    """The metrics `parityrl compare` lists per configuration next to its verdict (no band test)."""
    return tuple(m for m in METRICS if m.tabulated)


def run_level(metric: Metric, values: list[float]) -> float:
    """One run's value of a tabulated metric: the median over its steps for a log-scale metric (a KL over
    the ~30 tokens of one step's probe has rare spikes a mean would follow), else the mean; NaN if none."""
    if not values:
        return float("nan")
    return statistics.median(values) if metric.log_scale else statistics.fmean(values)


def _table_cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | would end the markdown cell


def _readme_rows(metrics: list[Metric]) -> list[str]:
    """One row per metric; the statistics of one check comparison (one family) share a row."""
    rows: list[str] = []
    for _, grouped in groupby(metrics, key=lambda m: m.family or m.name):
        group = list(grouped)
        names = ", ".join(f"`{m.name}`" for m in group)
        meaning = group[0].meaning if len(group) == 1 else f"as `parity/*` of the static check, for {group[0].family}"
        rows.append(f"| {names} | {_table_cell(meaning)} |")
    return rows


def reference_markdown() -> str:
    """docs/metrics.md's table: a bold row per panel, then one row per metric (per check comparison)."""
    lines = ["| metric | meaning |", "|---|---|"]
    for panel in PANELS:
        where = f" (`plots/{panel.name}.png`)" if panel.plotted else ""
        lines.append(f"| **{panel.name}** | {_table_cell(panel.title)}{where} |")
        lines += _readme_rows([m for m in METRICS if m.panel == panel.name])
    return "\n".join(lines)
