"""Held-out evaluation: greedy success rate of a policy on a task's problems."""

from __future__ import annotations

from collections.abc import Callable

import torch

from parityrl.decoding import decode_batch, greedy_picker
from parityrl.policy import compute_context
from parityrl.rewards import RewardItem, RewardResult, score_in_process
from parityrl.tasks import Task, task_prompt_ids

Scorer = Callable[[list[RewardItem]], list[RewardResult]]
"""Scores completions in order, e.g. `RewardPool.score_sync` or `score_in_process` bound to a reward."""


@torch.no_grad()
def greedy_completions(model, tokenizer, task: Task, problems, dtype: str = "float32", max_new_tokens: int | None = None) -> list[str]:
    """Greedy completion text of each problem (KV-cached batched decoding on the model's device, in the
    model dtype's compute precision); the model's train/eval mode is restored.

    `max_new_tokens`: the completion budget (the run's `sampling.max_new_tokens`); None allows the
    longest answer plus 2 (the SFT probe)."""
    was_training = model.training
    model.eval()
    prompts = [task_prompt_ids(tokenizer, task, p.prompt) for p in problems]
    max_new = max_new_tokens or max(len(tokenizer(p.answer, add_special_tokens=False)["input_ids"]) for p in problems) + 2
    device = next(model.parameters()).device
    with compute_context(dtype, device.type):
        tokens, _, _ = decode_batch(model, prompts, max_new, tokenizer.eos_token_id, greedy_picker)
    if was_training:
        model.train()
    return tokenizer.batch_decode(tokens, skip_special_tokens=True)


async def engine_greedy_completions(engine, tokenizer, task: Task, problems, max_new_tokens: int, request_id: str) -> list[str]:
    """Greedy completion text of each problem decoded by the rollout engine with its current weights
    (`RolloutEngine.greedy`): the held-out evaluation of a run. The trainer never decodes; the engine
    does it in the same batches as rollouts, at the engine's speed."""
    prompts = [task_prompt_ids(tokenizer, task, p.prompt) for p in problems]
    tokens = await engine.greedy(prompts, max_new_tokens, request_id)
    return tokenizer.batch_decode(tokens, skip_special_tokens=True)


def success_rate(completions: list[str], problems, score: Scorer | None, reward_kind: str = "exact") -> float:
    """Fraction of completions whose reward is >= 1. `score`: e.g. `RewardPool.score_sync` (user rewards,
    timeouts); None scores in this thread without a timeout (fine for the built-in rewards). A reward
    that fails counts as not solved."""
    items = [RewardItem(text, p.answer, p.prompt) for text, p in zip(completions, problems)]
    results = score(items) if score is not None else score_in_process(reward_kind, items)
    return sum(result.value >= 1.0 for result in results) / len(problems)


def greedy_success(model, tokenizer, task: Task, problems, score: Scorer | None = None, max_new_tokens: int | None = None) -> float:
    """Greedy success rate of `model` on `problems` (fp32 compute: the SFT probe)."""
    completions = greedy_completions(model, tokenizer, task, problems, "float32", max_new_tokens)
    return success_rate(completions, problems, score, task.reward_kind)
