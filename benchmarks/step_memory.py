"""Peak memory and the step split of a real model at several completion lengths, in one invocation.

    .venv/bin/python benchmarks/step_memory.py                           # SmolLM2, 64 / 256 / 1024 new tokens
    .venv/bin/python benchmarks/step_memory.py --lengths 64 --steps 2    # smoke run

For each length, `parityrl train CONFIG --set sampling.max_new_tokens=L` runs `--steps` steps in a
subprocess, one length after the other, with the evaluation off (`train.eval_every` past the last step;
the start evaluation still runs beside the first rollouts) and `pipeline.mode: sync`, so that a step
is generate, then score + backward, then publish, and the parts add up to the step. Measured:

- peak RSS, sampled every 0.25 s: the trainer (the command's main process), the vLLM engine (its
  EngineCore and worker processes), the whole process tree; and the trainer's own high-water mark
  (`perf/trainer_peak_rss_gb`, the kernel's, which a sampler can miss);
- weights + gradients + AdamW state (16 bytes per parameter, fp32 master weights): the part of the
  trainer's peak no setting can lower;
- the step split, median over steps after the first (the first compiles and warms caches):
  generate (`perf/batch_wait_s`: sampling and rewards of the batch), score (`perf/forward_s`: model
  body, chunked head, processed distribution, loss), backward (`perf/backward_s`), publish
  (`perf/weight_sync_s`), and the mean completion length the step actually had.

Results go to benchmarks/results/step_memory.json with the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from _common import REPO, child_env, environment, run_logged, weights_grads_adam_gib, write_results

DEFAULT_CONFIG = REPO / "configs" / "smollm2_math.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "step_memory.json"
DEFAULT_WORK = REPO / "runs" / "step_memory"
SPLIT = {"generate_s": "perf/batch_wait_s", "score_s": "perf/forward_s", "backward_s": "perf/backward_s", "publish_s": "perf/weight_sync_s"}


def run_length(config: Path, length: int, steps: int, overrides: list[str], work: Path) -> dict[str, Any]:
    run_dir = work / f"len-{length}"
    sets = [f"sampling.max_new_tokens={length}", f"train.steps={steps}", f"train.eval_every={steps + 1}",
            "pipeline.mode=sync", f"train.checkpoint_every={steps + 1}", *overrides]
    command = [sys.executable, "-m", "parityrl.cli", "train", str(config)]
    for override in sets:
        command += ["--set", override]
    command += ["--run-dir", str(run_dir), "--overwrite", "--no-plot"]
    wall, before, after, memory = run_logged(command, work / f"len-{length}.log", child_env())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_rows = [r for r in rows if r.get("step", 0) > 0 and "train/step_s" in r]
    later = steps_rows[1:] or steps_rows
    split = {name: statistics.median(r[key] for r in later if r.get(key) is not None) if any(r.get(key) is not None for r in later) else None
             for name, key in SPLIT.items()}
    return {
        "max_new_tokens": length,
        "command": command,
        "whole_s": wall,
        **memory,
        "trainer_high_water_gb": max((r.get("perf/trainer_peak_rss_gb") or 0.0) for r in steps_rows),
        "step_split_median": split,
        "mean_completion_tokens": [round(r["rl/completion_len"], 1) for r in steps_rows],
        "longest_completion_tokens": [max(r["rl/completion_lens"]) for r in steps_rows],
        "loadavg_before": before,
        "loadavg_after": after,
    }


def print_report(results: list[dict[str, Any]], wga_gib: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"peak memory and step split (weights + gradients + AdamW: {wga_gib:.2f} GiB)")
    for column in ("max new", "mean compl", "trainer GiB", "above W+G+A", "engine GiB", "tree GiB", "generate s", "score s", "backward s", "publish s"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in results:
        split = r["step_split_median"]
        cell = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
        table.add_row(
            str(r["max_new_tokens"]), f"{statistics.mean(r['mean_completion_tokens']):.0f}", cell(r["trainer_peak_rss_gib"]),
            cell(r["trainer_peak_rss_gib"] - wga_gib), cell(r["engine_peak_rss_gib"]), cell(r["process_tree_peak_rss_gib"]),
            *(cell(split[name]) for name in SPLIT),
        )
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="parityrl config (default: configs/smollm2_math.yaml)")
    parser.add_argument("--lengths", default="64,256,1024", help="comma-separated sampling.max_new_tokens values")
    parser.add_argument("--steps", type=int, default=3, help="RL steps per length (the first is left out of the medians)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every length (repeatable)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="run directories and logs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)

    from parityrl.assets import prepare_model
    from parityrl.config import load_config
    from parityrl.tasks import load_task

    config = load_config(args.config, args.set)
    model_dir = prepare_model(config, load_task(config.task))
    wga_gib = weights_grads_adam_gib(model_dir)
    env = environment()
    results: list[dict[str, Any]] = []
    failed: dict[int, str] = {}

    def save() -> None:  # after every length: a later failure (or a stopped run) keeps what was measured
        env["loadavg_at_end"] = list(os.getloadavg())
        write_results(args.out, {
            "benchmark": "step_memory",
            "command": " ".join(["benchmarks/step_memory.py", *(argv if argv is not None else sys.argv[1:])]),
            "environment": env,
            "config": str(args.config),
            "model_dir": str(model_dir),
            "weights_grads_adam_gib": round(wga_gib, 3),
            "lengths": results,
            "failed": failed,
        })

    for length in (int(x) for x in args.lengths.split(",") if x.strip()):
        print(f"[step_memory] max_new_tokens={length} ...", flush=True)
        try:
            results.append(run_length(args.config, length, args.steps, args.set, args.work_dir))
        except RuntimeError as error:  # the run failed: its log tail is the record
            failed[length] = str(error)[-2000:]
            print(f"[step_memory] max_new_tokens={length} failed: {str(error)[:300]}", flush=True)
            save()
            continue
        print(f"[step_memory] max_new_tokens={length}: trainer {results[-1]['trainer_peak_rss_gib']:.2f} GiB, "
              f"engine {results[-1]['engine_peak_rss_gib']:.2f} GiB, {results[-1]['whole_s']:.0f} s", flush=True)
        save()
    print_report(results, wga_gib)
    print(f"[step_memory] wrote {args.out}")


if __name__ == "__main__":
    main()
