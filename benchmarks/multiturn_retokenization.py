"""What re-tokenizing a multi-turn conversation costs: the `naive_multiturn` row against parityrl's path.

    .venv/bin/python benchmarks/multiturn_retokenization.py                      # SmolLM2 + calculator, bf16
    .venv/bin/python benchmarks/multiturn_retokenization.py --config configs/multiturn_demo.yaml

One vLLM engine plays `--problems` x `sampling.n` episodes of the config's environment. The trainer
then scores every sampled token at the same weights, in two ways:
- **parityrl** (token in, token out): the episode's own ids, `Sample.sampled_mask` on the sampled tokens.
- **naive_multiturn**, as a first attempt would do it:
  1. render the finished conversation with the chat template and tokenize it again;
  2. find each assistant turn's span by rendering the conversation up to it;
  3. lay the engine's logprobs of that turn onto the span's tokens in order.
  Where the model sampled a split its tokenizer would not produce, the span holds other tokens than
  the engine sampled (often fewer), and the logprobs land on the wrong tokens.

Per path the benchmark reports: k3 per token (`parity/kl`), the share of tokens with |ratio - 1| > 0.2
(PPO-clip's trust region, the clip rate at the same weights), and max |Δ|. It also reports the share of
episodes whose ids differ, `episode/retokenization_drift_frac`. Both paths score the same episodes in
one invocation. Written to benchmarks/results/multiturn_retokenization_<config>.json.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import torch
from _common import REPO, environment, write_results

from parityrl.assets import prepare_model
from parityrl.batch import Sample, pack_samples
from parityrl.config import load_config
from parityrl.engines import make_engine
from parityrl.episodes import ChatCodec, Episode, EpisodeLimits, play_group
from parityrl.policy import load_policy, load_tokenizer
from parityrl.preflight import model_context, read_hf_config
from parityrl.reward_pool import EnvironmentPool
from parityrl.scoring import Mismatch, score
from parityrl.tasks import load_task

CLIP_EPS = 0.2


def naive_sample(codec: ChatCodec, episode: Episode) -> Sample:
    """The episode as a re-tokenizing trainer sees it: the conversation rendered and tokenized again,
    each assistant span given that turn's engine logprobs in order (`Episode.first_sample` holds turn 1;
    later turns' logprobs are read off the episode's sampled runs)."""
    messages = episode.messages
    ids = codec.encode(codec.render(messages, generation_prompt=False))
    prompt = episode.prompt_ids
    turn_logprobs, run = [], []
    for logprob, sampled in zip(episode.logprobs_old, episode.sampled):
        if sampled:
            run.append(logprob)
        elif run:
            turn_logprobs.append(run)
            run = []
    if run:
        turn_logprobs.append(run)
    mask = [False] * len(ids)
    old = [0.0] * len(ids)
    turn = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(codec.encode(codec.render(messages[:index], generation_prompt=True)))
        end = len(codec.encode(codec.render(messages[: index + 1], generation_prompt=False)))
        logprobs = turn_logprobs[turn]
        for offset, logprob in enumerate(logprobs[: end - start]):
            mask[start + offset], old[start + offset] = True, logprob
        turn += 1
    completion = slice(len(prompt), len(ids))
    return Sample(prompt, ids[completion], old[completion], [0] * (len(ids) - len(prompt)), sampled_mask=mask[completion])


def measure(model, samples: list[Sample], sampling, dtype: str) -> dict:
    packed = pack_samples(samples, 0)
    with torch.no_grad():
        new = score(model, packed, sampling, dtype).logprobs
    select = packed.completion_mask & torch.isfinite(new)
    ratio = (new - packed.logprobs_old).exp()
    summary = Mismatch.of(new, packed.logprobs_old, packed.completion_mask).summary("parity")
    return {
        "parity/kl": summary["parity/kl"],
        "parity/abs_diff_max": summary["parity/abs_diff_max"],
        "clip_rate_at_same_weights": float(((ratio - 1).abs() > CLIP_EPS)[select].float().mean()),
        "tokens": summary["parity/tokens"],
    }


async def play(config, model_dir: Path, tokenizer, problems) -> tuple[list[Episode], dict]:
    codec = ChatCodec(tokenizer, config.task.system_prompt)
    context = model_context(read_hf_config(model_dir)) or 1 << 40
    limits = EpisodeLimits(config.task.max_turns, min(config.task.max_episode_tokens or context, context))
    engine = make_engine(config, model_dir)
    await engine.start()
    try:
        with EnvironmentPool.from_config(config.task) as envs:
            groups = await asyncio.gather(*(play_group(engine.generate, envs, codec, p, config.sampling, limits, f"b{i}") for i, p in enumerate(problems)))
        settings = engine.settings()
    finally:
        await engine.close()
    return [e for g in groups for e in g], settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "smollm2_calculator.yaml"))
    parser.add_argument("--problems", type=int, default=16, help="held-out problems, each played sampling.n times")
    args = parser.parse_args()
    config = load_config(args.config, [])
    task = load_task(config.task)
    model_dir = prepare_model(config, task)
    tokenizer = load_tokenizer(model_dir)
    codec = ChatCodec(tokenizer, config.task.system_prompt)
    episodes, settings = asyncio.run(play(config, model_dir, tokenizer, task.eval[: args.problems]))
    ours = [e.to_sample() for e in episodes]
    naive = [naive_sample(codec, e) for e in episodes]
    drifted = [i for i, e in enumerate(episodes) if codec.retokenization_differs(e.running_ids, e.messages)]
    model = load_policy(model_dir, "float32", config.model.lm_head_fp32).eval()
    sampling, dtype = config.trainer_sampling(), config.model.dtype
    result = {
        "config": str(Path(args.config).relative_to(REPO)) if Path(args.config).is_absolute() else args.config,
        "episodes": len(episodes),
        "turns_per_episode": sum(e.turns for e in episodes) / len(episodes),
        "retokenization_drift_frac": len(drifted) / len(episodes),
        "parityrl": measure(model, ours, sampling, dtype),
        "naive_multiturn": measure(model, naive, sampling, dtype),
        "engine": {key: settings.get(key) for key in ("vllm_version", "dtype", "logprobs_mode", "head_dtype")},
        "environment": environment(),
    }
    if drifted:
        result["drifted_episodes"] = {
            "parityrl": measure(model, [ours[i] for i in drifted], sampling, dtype),
            "naive_multiturn": measure(model, [naive[i] for i in drifted], sampling, dtype),
        }
    result["naive_over_parityrl_kl"] = result["naive_multiturn"]["parity/kl"] / max(result["parityrl"]["parity/kl"], 1e-30)
    name = Path(args.config).stem
    write_results(REPO / "benchmarks" / "results" / f"multiturn_retokenization_{name}.json", result)
    print({k: v for k, v in result.items() if k != "environment"})


if __name__ == "__main__":
    main()
