"""Held-out evaluation: greedy success rate of a policy on a task's problems."""

from __future__ import annotations

from collections.abc import Callable

import torch

from parityrl.assets import task_prompt_ids
from parityrl.policy import compute_context
from parityrl.rewards import RewardItem, RewardResult, score_in_process
from parityrl.tasks import Task

Scorer = Callable[[list[RewardItem]], list[RewardResult]]
"""Scores completions in order, e.g. `RewardPool.score_sync` or `score_in_process` bound to a reward."""


@torch.no_grad()
def greedy_success(model, tokenizer, task: Task, problems, score: Scorer | None = None, max_new_tokens: int | None = None) -> float:
    """Fraction of `problems` whose greedy completion scores a reward >= 1 (KV-cached batched decoding).

    `score` computes the rewards; None scores in this thread without a timeout (`score_in_process`,
    fine for the built-in rewards in any thread). Pass `RewardPool.score_sync` for user rewards or a
    timeout. A reward that fails counts as not solved. `max_new_tokens`: the completion budget (the
    run's `sampling.max_new_tokens`); None allows the longest answer plus 2 (the SFT probe)."""
    from parityrl.engines.reference import decode_batch, greedy_picker

    model.eval()
    prompts = [task_prompt_ids(tokenizer, task, p.prompt) for p in problems]
    max_new = max_new_tokens or max(len(tokenizer(p.answer, add_special_tokens=False)["input_ids"]) for p in problems) + 2
    tokens, _, _ = decode_batch(model, prompts, max_new, tokenizer.eos_token_id, greedy_picker)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    items = [RewardItem(text, p.answer, p.prompt) for text, p in zip(texts, problems)]
    results = score(items) if score is not None else score_in_process(task.reward_kind, items)
    return sum(result.value >= 1.0 for result in results) / len(problems)


def evaluate(model, tokenizer, task: Task, score: Scorer, dtype: str = "float32", max_new_tokens: int | None = None) -> float:
    """Greedy success rate on the held-out split, in the model dtype's compute precision; restores train mode."""
    was_training = model.training
    with compute_context(dtype):
        success = greedy_success(model, tokenizer, task, task.eval, score=score, max_new_tokens=max_new_tokens)
    if was_training:
        model.train()
    return success
