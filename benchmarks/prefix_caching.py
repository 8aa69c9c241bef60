"""Prefill work `engine.prefix_caching: versioned` saves against `off`, on a GRPO rollout workload.

    .venv/bin/python benchmarks/prefix_caching.py                        # SmolLM2 (its system prompt), bf16
    .venv/bin/python benchmarks/prefix_caching.py --config configs/demo.yaml --dtype float32

Each mode starts its own `VLLMEngine` (one at a time) on the config's model and runs `--steps` rollout
steps: `--prompts` task prompts x `sampling.n` samples (GRPO groups), then a weight update to the next
version (the same weights: the work is what is measured, and a versioned cache must start over at
each version all the same). Per mode: prompt tokens, prompt tokens served from vLLM's prefix cache
(`Sample.cached_prompt_tokens`), prompt tokens computed, generated tokens, and the wall time of each
step's rollouts. Ratios versioned/off come from the one invocation. Caching needs prompts of at least
one KV block: CPU's default block is 128 tokens, so `--block-size` (32) is passed to both modes.

What it does not measure: the multi-turn case (issue #28), where a turn re-prefills the whole history
and the gain is expected to be largest.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from _common import REPO, environment, write_results

from parityrl.assets import prepare_model
from parityrl.config import EngineConfig, load_config
from parityrl.engines.vllm import VLLMEngine
from parityrl.policy import export_state_dict, load_policy, load_tokenizer
from parityrl.tasks import load_task, task_prompt_ids


async def run_mode(mode: str, model_dir: Path, dtype: str, prompts: list[list[list[int]]], sampling, block_size: int) -> dict:
    engine = VLLMEngine(model_dir, dtype, EngineConfig(prefix_caching=mode, block_size=block_size), seed=0)
    await engine.start()
    weights = export_state_dict(load_policy(model_dir, "float32", lm_head_fp32=True))
    steps = []
    try:
        for step, step_prompts in enumerate(prompts):
            began = time.perf_counter()
            groups = await asyncio.gather(*(engine.generate(p, sampling, f"s{step}-g{i}") for i, p in enumerate(step_prompts)))
            elapsed = time.perf_counter() - began
            samples = [s for group in groups for s in group]
            prompt_tokens = sum(len(s.prompt_token_ids) for s in samples)
            cached = sum(s.cached_prompt_tokens or 0 for s in samples)
            generated = sum(len(s.completion_token_ids) for s in samples)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smollm2_math.yaml")
    parser.add_argument("--dtype", default=None, help="default: the config's model.dtype")
    parser.add_argument("--prompts", type=int, default=8, help="prompts (groups) per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    config = load_config(REPO / options.config, [f"sampling.max_new_tokens={options.max_new_tokens}", "sampling.ignore_eos=true"])
    dtype = options.dtype or config.model.dtype
    task = load_task(config.task)
    model_dir = prepare_model(config, task)
    tokenizer = load_tokenizer(model_dir)
    problems = task.train[: options.prompts * options.steps]
    prompts = [[task_prompt_ids(tokenizer, task, p.prompt) for p in problems[i * options.prompts : (i + 1) * options.prompts]]
               for i in range(options.steps)]  # fmt: skip
    results = {}
    for mode in ("off", "versioned"):
        print(f"prefix_caching={mode}: {options.steps} steps of {options.prompts} x {config.sampling.n} samples", flush=True)
        results[mode] = asyncio.run(run_mode(mode, model_dir, dtype, prompts, config.sampling, options.block_size))
    off, versioned = results["off"]["total"], results["versioned"]["total"]
    ratios = {
        "computed_prompt_tokens_versioned_over_off": versioned["computed_prompt_tokens"] / off["computed_prompt_tokens"],
        "rollout_s_versioned_over_off": versioned["rollout_s"] / off["rollout_s"],
        "rollout_tok_s_versioned_over_off": results["versioned"]["rollout_tok_s"] / results["off"]["rollout_tok_s"],
    }
    print(ratios)
    name = Path(options.config).stem
    out = options.out or REPO / "benchmarks" / "results" / f"prefix_caching_{name}.json"
    command = " ".join(["benchmarks/prefix_caching.py", "--config", options.config, "--prompts", str(options.prompts), "--steps",
                        str(options.steps), "--max-new-tokens", str(options.max_new_tokens), "--block-size", str(options.block_size)]
                       + (["--dtype", options.dtype] if options.dtype else []))  # fmt: skip
    write_results(out, {"command": command, "environment": environment(), "workload": {
        "config": options.config, "dtype": dtype, "prompts_per_step": options.prompts, "samples_per_prompt": config.sampling.n,
        "max_new_tokens": options.max_new_tokens, "steps": options.steps, "block_size": options.block_size,
        "mean_prompt_tokens": sum(len(p) for step in prompts for p in step) / sum(len(step) for step in prompts)},
        "modes": results, "ratios": ratios})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
