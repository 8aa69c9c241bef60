"""Every real-model figure of README.md and docs/real-model.md is re-derived here from the committed data it
cites (run directories under docs/smollm2/, benchmark JSON under benchmarks/results/): a figure edited away
from its data, or data replaced under a figure, fails.

    .venv/bin/python tests/test_real_model_figures.py    # prints every figure line the two pages must hold
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README, REAL_MODEL = REPO / "README.md", REPO / "docs" / "real-model.md"
SEEDS = {0: REPO / "docs" / "smollm2" / "seed0", 1: REPO / "docs" / "smollm2" / "seed1"}
VS_TRL = REPO / "benchmarks" / "results" / "vs_trl_smollm2.json"
STEP_MEMORY = REPO / "docs" / "smollm2" / "step_memory"
MICRO_BATCH_TOKENS = REPO / "benchmarks" / "results" / "micro_batch_tokens.json"
ATTRIBUTE_FP32 = REPO / "docs" / "smollm2" / "check" / "attribute_fp32.json"
BF16_FLOOR = REPO / "docs" / "smollm2" / "bf16_floor.json"
ATTRIBUTE_BF16 = REPO / "docs" / "smollm2" / "check" / "attribute_bf16.json"
GB_PER_GIB = 2**30 / 1e9


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def at_steps(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every evaluation that logged `metric`."""
    return [(r["step"], r[metric]) for r in rows(run_dir) if r.get(metric) is not None]


def arrow(run_dir: Path, metric: str, digits: int = 3) -> str:
    """"0.078 → 0.242 → 0.469": the metric at every evaluation (start, every `eval_every` steps, end)."""
    return " → ".join(f"{value:.{digits}f}" for _, value in at_steps(run_dir, metric))


def per_seed(metric: str, digits: int = 3) -> str:
    return "; ".join(f"{arrow(run_dir, metric, digits)} (seed {seed})" for seed, run_dir in SEEDS.items())


def points(run_dir: Path, metric: str) -> float:
    """The change of `metric` from the start to the end, in points."""
    values = at_steps(run_dir, metric)
    return 100 * (values[-1][1] - values[0][1])


def parity_kl_median(run_dir: Path) -> float:
    return statistics.median(r["parity/kl"] for r in rows(run_dir) if r.get("parity/kl") is not None)


def trainer_peak_gb(run_dir: Path) -> float:
    return max(r["perf/trainer_peak_rss_gb"] for r in rows(run_dir) if r.get("perf/trainer_peak_rss_gb"))


def learning_lines() -> list[str]:
    """The learning table of docs/real-model.md (and the README's shorter one)."""
    # the estimate is the config's, the same for both seeds; seed 0 ran before summary.json kept it
    estimate_gib = summary(SEEDS[1])["trainer_memory_estimate_gib"]
    return [
        f"| held-out, the training file's templates (128 problems): success | {per_seed('eval/success')} |",
        f"| out of distribution (150 problems, `data/math_word_problems_ood.jsonl`): success | {per_seed('eval/ood_success')} |",
        f"| out of distribution: answered (a `\\boxed{{}}` or an answer line) | {per_seed('eval/ood_answered', 2)} |",
        f"| out of distribution: correct when answered | {per_seed('eval/ood_correct_given_answered')} |",
        f"| out of distribution: last number right, whatever the format | {per_seed('eval/ood_last_number_correct')} |",
        f"| held-out: answered | {per_seed('eval/answered', 2)} |",
        f"| held-out: correct when answered | {per_seed('eval/correct_given_answered')} |",
        "| RL time for 20 steps | " + "; ".join(f"{summary(d)['rl_seconds'] / 60:.0f} min (seed {seed})" for seed, d in SEEDS.items()) + " |",
        "| trainer peak (`perf/trainer_peak_rss_gb`) | " + "; ".join(f"{trainer_peak_gb(d):.2f} GB (seed {seed})" for seed, d in SEEDS.items())
        + f"; the preflight estimated {estimate_gib * GB_PER_GIB:.2f} GB before the engine started |",
        "| `parity/kl` (bf16), median over steps | " + "; ".join(f"{parity_kl_median(d):.1e} (seed {seed})" for seed, d in SEEDS.items()) + " |",
    ]


def held_out_twins() -> tuple[int, int]:
    """(held-out problems with a training problem of the same template and numbers, held-out problems) of
    configs/smollm2_math.yaml's split: names, items and pronouns blanked, numbers kept."""
    import re

    from parityrl.config import load_config
    from parityrl.tasks import load_task

    config = load_config(REPO / "configs" / "smollm2_math.yaml")
    task = load_task(config.task.model_copy(update={"path": str(REPO / config.task.path), "eval_path": None}))
    words = re.compile(r"\b([A-Z][a-z]+|he|she|him|her|apples|pencils|marbles|stickers|cookies|books|cards|shells|coins|stamps)\b")

    def twin_key(prompt: str) -> str:
        return words.sub("_", prompt)

    training = {twin_key(p.prompt) for p in task.train}
    return sum(twin_key(p.prompt) in training for p in task.eval), len(task.eval)


def readme_lines() -> list[str]:
    gains = {seed: (points(d, "eval/ood_success"), points(d, "eval/success")) for seed, d in SEEDS.items()}
    return [
        "| held-out success, training's templates | " + "; ".join(f"{arrow(d, 'eval/success')} (seed {seed})" for seed, d in SEEDS.items()) + " |",
        "| success out of distribution | " + "; ".join(f"{arrow(d, 'eval/ood_success')} (seed {seed})" for seed, d in SEEDS.items()) + " |",
        "| gain, points (held-out / out of distribution) | "
        + "; ".join(f"{held:+.1f} / {ood:+.1f} (seed {seed})" for seed, (ood, held) in gains.items()) + " |",
    ]


def trl_lines() -> list[str]:
    """The TRL table of docs/real-model.md and the README's sentence."""
    result = json.loads(VS_TRL.read_text())["regimes"][0]
    sides, comparisons = result["sides"], result["comparisons"]
    p = sides["parityrl"]

    def side_row(label: str, key: str, fmt: str) -> str:
        cells = [format(sides[name][key], fmt) for name in ("parityrl", "trl", "trl-no-gc")]
        ratios = [format(comparisons[name][RATIO_OF[key]], ".2f") for name in ("trl", "trl-no-gc")]
        return f"| {label} | {' | '.join(cells)} | {' | '.join(ratios)} |"

    return [
        side_row("all processes, peak RSS (GiB)", "process_tree_peak_rss_gib", ".2f"),
        side_row("trainer process alone, peak RSS (GiB)", "trainer_peak_rss_gib", ".2f"),
        side_row("step wall, median (s)", "median_step_wall_s", ".0f"),
        side_row("trainer's own work per step: score + backward (s)", "median_trainer_work_s", ".1f"),
        f"Runs per side: parityrl {len(p['repeats'])}, TRL with its defaults {len(sides['trl']['repeats'])}, TRL without gradient "
        f"checkpointing {len(sides['trl-no-gc']['repeats'])}; {p['steps']} steps each; medians. In short",
    ]


RATIO_OF = {
    "process_tree_peak_rss_gib": "process_tree_peak_rss_ratio",
    "trainer_peak_rss_gib": "trainer_peak_rss_ratio",
    "median_step_wall_s": "median_step_wall_ratio",
    "median_trainer_work_s": "trainer_work_ratio",
}


def trl_sentence() -> str:
    result = json.loads(VS_TRL.read_text())["regimes"][0]
    default, no_gc = result["comparisons"]["trl"], result["comparisons"]["trl-no-gc"]
    return (
        f"all processes {default['process_tree_peak_rss_ratio']:.2f}× TRL's memory with its defaults "
        f"({no_gc['process_tree_peak_rss_ratio']:.2f}× with its gradient checkpointing off), "
        f"step wall {default['median_step_wall_ratio']:.2f}× ({no_gc['median_step_wall_ratio']:.2f}×)"
    )


def startup_line() -> str:
    started = {seed: summary(run_dir)["startup_s"] for seed, run_dir in SEEDS.items()}
    return (
        "In the two learning runs above (compile cache warm) the command was ready to train after "
        + " and ".join(f"{s['total']:.0f} s" for s in started.values())
        + ", the engine's start "
        + " and ".join(f"{s['engine']:.0f} s" for s in started.values())
        + " of it (`startup_s` in their summary.json)."
    )


def step_memory_lines() -> list[str]:
    """The step table of docs/real-model.md: medians over the steps after the first of `benchmarks/step_memory.py`'s runs."""
    lines = []
    for tokens in (64, 256, 1024):
        measured = [json.loads(line) for line in (STEP_MEMORY / f"metrics-{tokens}.jsonl").read_text().splitlines()]
        steps = [r for r in measured if r["step"] > 1 and "perf/forward_s" in r]

        def median(key: str, steps: list[dict] = steps) -> float:
            return statistics.median(r[key] for r in steps)

        lengths = [r["rl/completion_len"] for r in measured if "rl/completion_len" in r]
        peak_gb = max(r["perf/trainer_peak_rss_gb"] for r in measured if "perf/trainer_peak_rss_gb" in r)
        lines.append(
            f"| {tokens} ({statistics.mean(lengths):.0f}) | {peak_gb:.1f} GB | {median('perf/batch_wait_s'):.0f} s | "
            f"{median('perf/forward_s'):.0f} s | {median('perf/backward_s'):.0f} s | {median('perf/weight_sync_s'):.2f} s |"
        )
    return lines


def micro_batch_lines() -> list[str]:
    """The micro-batch budget table of docs/real-model.md: each value's last step (AdamW's state exists) of
    `benchmarks/micro_batch_tokens.py`."""
    measured = json.loads(MICRO_BATCH_TOKENS.read_text())
    lines = []
    for value in measured["values"]:
        last = value["steps"][-1]
        lines.append(
            f"| {value['micro_batch_tokens']} | {last['micro_batches']} | {last['peak_gb']:.2f} GB | {last['forward_s']:.0f} s "
            f"| {last['backward_s']:.0f} s | {last['step_s']:.0f} s |"
        )
    return lines


ATTRIBUTE_LABELS = {
    "configured": "all four fixes",
    "fix1 off (raw logprobs)": "fix 1 off (raw logprobs)",
    "fix2 off (prefix caching + async scheduling at vLLM defaults)": "fix 2 off (prefix caching, async scheduling at vLLM's defaults)",
    "fix3 off (pause aborts + clears caches)": "fix 3 off (pause aborts, clears caches)",
    "fix4 off (bf16/model-dtype head, both sides)": "fix 4 off (bf16 head on both sides)",
    "fix4 one-sided (fp32 head on engine only)": "fp32 head on the engine only",
}


def attribute_lines() -> list[str]:
    measured = json.loads(ATTRIBUTE_FP32.read_text())
    labels = {key: label for key, label in ATTRIBUTE_LABELS.items() if "one-sided" not in key}
    labels["fix4 off (bf16/model-dtype head, both sides)"] = "fix 4 off / one-sided"
    return [
        f"| {label} | {measured[key]['parity/kl']:.2g} | {measured[key]['parity/abs_diff_max']:.2g} | {measured[key]['parity/tokens']} |"
        for key, label in labels.items()
    ]


def bf16_floor_lines() -> list[str]:
    """The bf16 floor table: per engine build, `parity/kl` of each trainer against the same engine samples, and
    the share of the trainer's mismatch that is the engine's own arithmetic (the exact model of the engine's
    weights over the trainer as it trains)."""
    measured = json.loads(BF16_FLOOR.read_text())
    lines = [f"`{measured['command']}` on {measured['cpu']}"]
    for build in ("compiled", "eager"):
        kl = {name: measured[build][name]["parity/kl"] for name in ("a_fp32_master_autocast", "b_bf16_weights", "c_fp32", "d_bf16_weights_fp32")}
        lines.append(
            f"| {build} | {measured[build]['tokens']} | {kl['a_fp32_master_autocast']:.1e} | {kl['b_bf16_weights']:.1e} "
            f"| {kl['c_fp32']:.1e} | {kl['d_bf16_weights_fp32']:.1e} | {kl['d_bf16_weights_fp32'] / kl['a_fp32_master_autocast']:.0%} |"
        )
    return lines


def attribute_bf16_lines() -> list[str]:
    """SmolLM2 in bf16, `check --attribute`: each row's mismatch on the tokens every row drew, as a multiple of the
    configured row's; fix 2 by `post_update/kl`, fix 3 by the share of in-flight requests aborted."""
    measured = json.loads(ATTRIBUTE_BF16.read_text())
    rows = measured["check"]
    base = rows["configured"]
    lines = [f"`{measured['command']}` on {measured['cpu']}"]
    for key, label in ATTRIBUTE_LABELS.items():
        row = rows[key]
        lines.append(
            f"| {label} | {row['parity/kl']:.2g} | {row['parity_common/kl']:.2g} ({row['parity_common/kl'] / base['parity_common/kl']:.1f}×) "
            f"| {row['parity/same_samples_frac']:.0%} | {row['post_update/kl']:.2g} ({row['post_update/kl'] / base['post_update/kl']:.1f}×) "
            f"| {row['inflight/aborted_frac']:.0%} |"
        )
    return lines


FIGURES: dict[Path, Callable[[], list[str]]] = {
    README: lambda: [*readme_lines(), trl_sentence(), "{} of the {} held-out\nproblems have a training twin with the same numbers".format(*held_out_twins())],
    REAL_MODEL: lambda: [
        *learning_lines(), *trl_lines(), trl_sentence(), startup_line(), *step_memory_lines(), *micro_batch_lines(), *attribute_lines(),
        *bf16_floor_lines(), *attribute_bf16_lines(),
    ],
}


@pytest.mark.parametrize("page", list(FIGURES), ids=lambda p: p.name)
def test_every_real_model_figure_is_its_committed_data(page: Path) -> None:
    text = page.read_text()
    missing = [line for line in FIGURES[page]() if line not in text]
    assert not missing, f"{page.name} does not hold these figures as its data gives them:\n" + "\n".join(missing)


def test_the_runs_the_figures_come_from_are_the_shipped_config() -> None:
    """Both seeds ran configs/smollm2_math.yaml as shipped (their seed aside), on the OOD file of the repo."""
    import yaml

    shipped = yaml.safe_load((REPO / "configs" / "smollm2_math.yaml").read_text())
    for seed, run_dir in SEEDS.items():
        ran = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert ran["seed"] == seed
        for section in ("task", "sampling", "train"):
            assert {k: ran[section][k] for k in shipped[section]} == shipped[section], section
        # #30's goal for the shipped config: the trainer within 6 GB over its 20 steps
        assert trainer_peak_gb(run_dir) <= 6.0
        # the preflight's estimate holds for the full model too (the CI test holds the truncated one to it)
        estimate_gb = summary(SEEDS[1])["trainer_memory_estimate_gib"] * GB_PER_GIB
        assert 0.75 * estimate_gb <= trainer_peak_gb(run_dir) <= 1.25 * estimate_gb
        kept = [json.loads(line) for line in (run_dir / "eval_episodes" / "v000000.jsonl").read_text().splitlines()]
        ood = [r for r in kept if r["split"] == "ood"]
        assert len(ood) == 150 and rows(run_dir)[0]["eval/ood_success"] == sum(r["reward"] >= 1 for r in ood) / 150


if __name__ == "__main__":
    for page, lines in FIGURES.items():
        print(f"--- {page.relative_to(REPO)}")
        for line in lines():
            print(line)
