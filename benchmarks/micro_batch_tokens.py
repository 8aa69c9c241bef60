"""The trainer's peak memory and step time against `train.micro_batch_tokens`, without an engine.

    .venv/bin/python benchmarks/micro_batch_tokens.py                          # SmolLM2: 512, 384, 320, 256
    .venv/bin/python benchmarks/micro_batch_tokens.py --values 512 --steps 2   # smoke run

For each value a fresh process builds the config's trainer (`train.Trainer`: fp32 master weights, the
config's dtype and head, fused AdamW) and takes `--steps` optimiser steps on synthetic batches shaped
like the config's: `prompts_per_step` groups of `sampling.n` samples, a `--prompt-tokens` prompt per
group, completions of `max_new_tokens / 3` to `max_new_tokens` random tokens (the same batches for
every value: one seed). Measured per step: the process's peak RSS (`VmHWM`, reset before the step via
`/proc/self/clear_refs`), forward and backward seconds and the micro-batch count. The first step
creates AdamW's state, so the last step is the figure to compare.

Everything but the activations (weights, gradients, AdamW state: 16 bytes per parameter) is the
same for every value; the engine, the loop and vLLM's front end (~0.7 GB more in `parityrl train`'s
trainer process) are left out, so the peaks are below a real run's by that much. Results go to
benchmarks/results/micro_batch_tokens.json with the environment.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import REPO, child_env, environment, write_results

DEFAULT_CONFIG = REPO / "configs" / "smollm2_math.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "micro_batch_tokens.json"


def synthetic_batch(rng: random.Random, groups: int, per_group: int, prompt_tokens: int, max_new: int, vocab: int, version: int) -> list:
    from parityrl.batch import Sample

    samples = []
    for _ in range(groups):
        prompt = [rng.randrange(1, vocab) for _ in range(prompt_tokens)]
        for _ in range(per_group):
            length = rng.randint(max(1, max_new // 3), max_new)
            samples.append(Sample(prompt, [rng.randrange(1, vocab) for _ in range(length)], [-1.0] * length, [version] * length, "stop"))
    return samples


def child(config_path: Path, tokens: int, steps: int, prompt_tokens: int, overrides: list[str]) -> None:
    """One value in this process: prints one JSON line per step."""
    import torch

    from parityrl.assets import prepare_model
    from parityrl.config import load_config
    from parityrl.memory import one_malloc_arena, process_rss_gb
    from parityrl.tasks import load_task
    from parityrl.train.trainer import Trainer

    one_malloc_arena()  # as `parityrl train` does
    config = load_config(config_path, [*overrides, f"train.micro_batch_tokens={tokens}"])
    model_dir = prepare_model(config, load_task(config.task))
    trainer = Trainer(config, model_dir, pad_id=0)
    vocab = trainer.model.config.vocab_size
    rng = random.Random(0)
    for step in range(steps):
        samples = synthetic_batch(rng, config.train.prompts_per_step, config.sampling.n, prompt_tokens, config.sampling.max_new_tokens, vocab, trainer.version)
        advantages = torch.randn(len(samples), generator=torch.Generator().manual_seed(step))
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: this step's peak alone
        began = time.perf_counter()
        metrics = trainer.step(samples, advantages)
        wall = time.perf_counter() - began
        rss_gb, peak_gb = process_rss_gb()
        print(json.dumps({
            "step": step, "peak_gb": round(peak_gb, 3), "rss_after_gb": round(rss_gb, 3),
            "forward_s": round(metrics["perf/forward_s"], 2), "backward_s": round(metrics["perf/backward_s"], 2),
            "micro_batches": int(metrics["train/micro_batches"]), "step_s": round(wall, 2),
            "tokens": sum(len(s.prompt_token_ids) + len(s.completion_token_ids) for s in samples),
        }), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="parityrl config (default: configs/smollm2_math.yaml)")
    parser.add_argument("--values", default="512,384,320,256", help="comma-separated train.micro_batch_tokens values")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per value (the first creates AdamW's state)")
    parser.add_argument("--prompt-tokens", type=int, default=70, help="prompt length of every group (SmolLM2's chat prompts: 60-75)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every value (repeatable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.config, args.child, args.steps, args.prompt_tokens, args.set)
        return

    results: list[dict[str, Any]] = []
    env = environment()
    for tokens in (int(x) for x in args.values.split(",") if x.strip()):
        command = [sys.executable, __file__, "--config", str(args.config), "--steps", str(args.steps), "--prompt-tokens", str(args.prompt_tokens),
                   "--child", str(tokens), *(f"--set={override}" for override in args.set)]
        print(f"[micro_batch_tokens] {tokens} ...", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, env=child_env())
        if done.returncode != 0:
            raise SystemExit(f"micro_batch_tokens={tokens} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        steps = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        results.append({"micro_batch_tokens": tokens, "steps": steps})
        last = steps[-1]
        print(f"[micro_batch_tokens] {tokens}: peak {last['peak_gb']:.2f} GB, step {last['step_s']:.1f} s, {last['micro_batches']} micro-batches", flush=True)
    write_results(args.out, {
        "benchmark": "micro_batch_tokens",
        "command": " ".join(["benchmarks/micro_batch_tokens.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": env,
        "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
        "values": results,
    })
    print(f"[micro_batch_tokens] wrote {args.out}")


if __name__ == "__main__":
    main()
