"""Prefill work and step time `engine.prefix_caching: versioned` saves against `off`.

    .venv/bin/python benchmarks/prefix_caching.py                        # SmolLM2 (its system prompt), bf16
    .venv/bin/python benchmarks/prefix_caching.py --config configs/demo.yaml --train-steps 20
    .venv/bin/python benchmarks/prefix_caching.py --config configs/multiturn_demo.yaml --train-steps 20

Rollouts: each mode starts its own `VLLMEngine` (one at a time) on the config's model and runs
`--steps` rollout steps: `--prompts` task problems x `sampling.n` samples (GRPO groups; with an
environment, `sampling.n` whole episodes per problem, every turn a request), then a weight update to
the next version (the same weights: the work is what is measured, and a versioned cache must start
over at each version all the same). Per mode: prompt tokens (every turn's), prompt tokens served from
vLLM's prefix cache (`Sample.cached_prompt_tokens`), prompt tokens computed, generated tokens, and
the wall time of each step's rollouts (after one untimed warm-up step). Caching needs prompts of at least one KV block: CPU's default
block is 128 tokens, so `--block-size` (32) is passed to both modes.

`--train-steps N` also runs `parityrl train` for N steps in each mode (the config as it is, with the
same block size, no evaluation) and reports the mean `train/step_s` after the first step and the RL
wall time per step, from the runs' own metrics: what a user's run gains, trainer included.

Ratios versioned/off come from the one invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, environment, write_results

from parityrl.assets import prepare_model
from parityrl.config import EngineConfig, load_config
from parityrl.engines.vllm import VLLMEngine
from parityrl.parity.check import Episodes, _episode_setup, play_all
from parityrl.policy import export_state_dict, load_policy, load_tokenizer
from parityrl.tasks import load_task, task_prompt_ids


async def run_mode(mode: str, model_dir: Path, dtype: str, problems: list[list], encode, sampling, block_size: int,
                   episodes: Episodes | None) -> dict:
    engine = VLLMEngine(model_dir, dtype, EngineConfig(prefix_caching=mode, block_size=block_size), seed=0)
    await engine.start()
    weights = export_state_dict(load_policy(model_dir, "float32", lm_head_fp32=True))
    steps = []

    async def play(step_problems: list, tag: str) -> list:
        if episodes is not None:
            return await play_all(engine, episodes, step_problems, sampling, tag)
        groups = await asyncio.gather(*(engine.generate(encode(p), sampling, f"{tag}-g{i}") for i, p in enumerate(step_problems)))
        return [s for group in groups for s in group]

    try:
        # one untimed step first: the engine's first batches pay one-off costs (the first mode paid them
        # in both sub-second demo workloads and looked 1.5x slower)
        await play(problems[0], "warm-up")
        await engine.update_weights(weights, engine.version + 1)
        for step, step_problems in enumerate(problems):
            began = time.perf_counter()
            samples = await play(step_problems, f"s{step}")
            elapsed = time.perf_counter() - began
            # every turn's prompt for an episode (`Sample.turn_prompt_tokens`), the prompt otherwise
            prompt_tokens = sum(s.turn_prompt_tokens or len(s.prompt_token_ids) for s in samples)
            cached = sum(s.cached_prompt_tokens or 0 for s in samples)
            generated = sum(sum(s.sampled_mask) if s.sampled_mask is not None else len(s.completion_token_ids) for s in samples)
            steps.append({"rollout_s": elapsed, "prompt_tokens": prompt_tokens, "cached_prompt_tokens": cached,
                          "computed_prompt_tokens": prompt_tokens - cached, "generated_tokens": generated})
            print(f"  {mode} step {step}: {elapsed:.1f} s, prompt tokens {prompt_tokens} ({cached} from cache), generated {generated}", flush=True)
            await engine.update_weights(weights, engine.version + 1)
        settings = engine.settings()
    finally:
        await engine.close()
    total = {key: sum(s[key] for s in steps) for key in steps[0]}
    return {"steps": steps, "total": total, "rollout_tok_s": total["generated_tokens"] / total["rollout_s"],
            "prefix_cache_hit_frac": total["cached_prompt_tokens"] / max(total["prompt_tokens"], 1),
            "settings": {key: settings.get(key) for key in ("prefix_caching", "cache_salt", "enable_prefix_caching", "block_size", "dtype")}}


def train_mode(mode: str, config_path: str, steps: int, block_size: int, extra: list[str]) -> dict:
    """`parityrl train` for `steps` steps with `mode`: mean `train/step_s` after the first step, RL seconds
    per step, and the mean `perf/prefix_cache_hit_frac`, from the run's own files."""
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        run_dir = Path(tmp) / "run"
        overrides = [f"engine.prefix_caching={mode}", f"engine.block_size={block_size}", f"train.steps={steps}", "train.eval_every=100000",
                     "train.checkpoint_every=0", *extra]  # fmt: skip
        command = [sys.executable, "-m", "parityrl.cli", "train", str(REPO / config_path), "--run-dir", str(run_dir), "--no-plot"]
        command += [arg for override in overrides for arg in ("--set", override)]
        print(f"  {mode}: {' '.join(command[2:])}", flush=True)
        subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, timeout=3600)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        records = [r for r in records if r.get("step", 0) > 0 and r.get("train/step_s") is not None]
        summary = json.loads((run_dir / "summary.json").read_text())
    later = records[1:] or records
    hits = [r["perf/prefix_cache_hit_frac"] for r in records if r.get("perf/prefix_cache_hit_frac") is not None]
    return {"steps": len(records), "step_s_mean_after_first": sum(r["train/step_s"] for r in later) / len(later),
            "rl_s_per_step": summary["rl_seconds"] / max(summary["steps"], 1), "rl_seconds": summary["rl_seconds"],
            "prefix_cache_hit_frac_mean": sum(hits) / len(hits) if hits else None}


def episodic_tag(config) -> str:
    """`addition_feedback` for `...addition:AdditionFeedback`: names a config turned into episodes by --set."""
    import re

    return re.sub(r"(?<!^)(?=[A-Z])", "_", config.task.environment.rsplit(":", 1)[-1]).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smollm2_math.yaml")
    parser.add_argument("--dtype", default=None, help="default: the config's model.dtype")
    parser.add_argument("--prompts", type=int, default=8, help="problems (groups) per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 64 with ignore_eos; episodes: the config's")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=0, help="also run `parityrl train` for this many steps per mode")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as `parityrl train --set` (repeatable; the training runs get it too)")
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    config = load_config(REPO / options.config, options.overrides)
    episodic = config.task.kind == "environment"
    if not episodic:  # fixed lengths: the same work in both modes
        config = load_config(REPO / options.config, [*options.overrides, f"sampling.max_new_tokens={options.max_new_tokens or 64}",
                                                     "sampling.ignore_eos=true"])  # fmt: skip
    elif options.max_new_tokens:
        config = load_config(REPO / options.config, [*options.overrides, f"sampling.max_new_tokens={options.max_new_tokens}"])
    dtype = options.dtype or config.model.dtype
    task = load_task(config.task)
    model_dir = prepare_model(config, task)
    tokenizer = load_tokenizer(model_dir)
    problems = task.train[: options.prompts * options.steps]
    per_step = [problems[i * options.prompts : (i + 1) * options.prompts] for i in range(options.steps)]
    results = {}
    for mode in ("off", "versioned"):
        print(f"prefix_caching={mode}: {options.steps} steps of {options.prompts} x {config.sampling.n} {'episodes' if episodic else 'samples'}", flush=True)
        episodes = _episode_setup(config, model_dir, tokenizer) if episodic else None
        try:
            results[mode] = asyncio.run(run_mode(mode, model_dir, dtype, per_step, lambda p: task_prompt_ids(tokenizer, task, p.prompt),
                                                 config.sampling, options.block_size, episodes))  # fmt: skip
        finally:
            if episodes is not None:
                episodes[0].close()
    off, versioned = results["off"]["total"], results["versioned"]["total"]
    ratios = {
        "computed_prompt_tokens_versioned_over_off": versioned["computed_prompt_tokens"] / off["computed_prompt_tokens"],
        "rollout_s_versioned_over_off": versioned["rollout_s"] / off["rollout_s"],
        "rollout_tok_s_versioned_over_off": results["versioned"]["rollout_tok_s"] / results["off"]["rollout_tok_s"],
        # sub-second steps (the tiny model's) vary by 2x from one step to the next: the median step too
        "rollout_s_median_versioned_over_off": statistics.median(s["rollout_s"] for s in results["versioned"]["steps"])
        / statistics.median(s["rollout_s"] for s in results["off"]["steps"]),
    }
    training = {}
    if options.train_steps:
        extra = [*options.overrides, *([f"model.dtype={options.dtype}"] if options.dtype else [])]
        for mode in ("off", "versioned"):
            print(f"parityrl train, prefix_caching={mode}: {options.train_steps} steps", flush=True)
            training[mode] = train_mode(mode, options.config, options.train_steps, options.block_size, extra)
        ratios["step_s_versioned_over_off"] = training["versioned"]["step_s_mean_after_first"] / training["off"]["step_s_mean_after_first"]
        ratios["rl_s_per_step_versioned_over_off"] = training["versioned"]["rl_s_per_step"] / training["off"]["rl_s_per_step"]
    print(ratios)
    name = Path(options.config).stem
    out = options.out or REPO / "benchmarks" / "results" / f"prefix_caching_{name}{'_' + episodic_tag(config) if options.overrides and episodic else ''}.json"
    command = " ".join(["benchmarks/prefix_caching.py", "--config", options.config, "--prompts", str(options.prompts), "--steps",
                        str(options.steps), "--block-size", str(options.block_size)]
                       + (["--max-new-tokens", str(options.max_new_tokens)] if options.max_new_tokens else [])
                       + (["--train-steps", str(options.train_steps)] if options.train_steps else [])
                       + (["--dtype", options.dtype] if options.dtype else [])
                       + [f"--set {override}" for override in options.overrides])  # fmt: skip
    all_prompts = [s for s in results["off"]["steps"]]
    write_results(out, {"command": command, "environment": environment(), "workload": {
        "config": options.config, "dtype": dtype, "prompts_per_step": options.prompts, "samples_per_prompt": config.sampling.n,
        "episodes": episodic, "max_new_tokens": config.sampling.max_new_tokens, "ignore_eos": config.sampling.ignore_eos,
        "steps": options.steps, "block_size": options.block_size,
        "mean_prompt_tokens_per_sample": sum(s["prompt_tokens"] for s in all_prompts) / (sum(len(p) for p in per_step) * config.sampling.n)},
        "modes": results, "training": training, "ratios": ratios})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
