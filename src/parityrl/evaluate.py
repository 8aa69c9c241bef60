"""Evaluation: greedy success rate of a policy on a task's held-out problems, and what each completion
shows (`evaluation_records`), so a gain in success can be told apart: arithmetic, or answering in the asked
format (`evaluation_metrics`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from parityrl.decoding import decode_batch, greedy_picker
from parityrl.policy import compute_context
from parityrl.rewards import RewardItem, RewardResult, extract_answer, final_answer, last_number, same_answer_text, score_in_process
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


EVAL_SPLITS = {"held_out": "", "ood": "ood_"}
"""Evaluation sets and their metric names' prefix after `eval/`: `task.eval` (the held-out split, `eval/success`) and
`task.eval_ood` (`task.eval_path`, `eval/ood_success`)."""

ANSWERED_FORMS = ("boxed", "marked")
"""`rewards.final_answer` forms that count as answering: a \\boxed{} or a final-answer line, not a bare last line."""


def evaluation_records(problems, completions: list[str], results: list[RewardResult], reward_kind: str) -> list[dict]:
    """One record per evaluated problem, as `RUN_DIR/eval_episodes/` keeps them (the caller adds its split): the
    prompt, reference answer, completion, reward (and the reward's error). With the `math_verify` reward also what the reward
    read: the parsed answer, how it was written (`rewards.final_answer`: boxed, marked, last_line) and whether
    the completion's last number is the answer whatever the format (`last_number_correct`)."""
    records = []
    for problem, completion, result in zip(problems, completions, results, strict=True):
        record = {"prompt": problem.prompt, "answer": problem.answer, "completion": completion, "reward": result.value}
        if result.error is not None:
            record["error"] = result.error
        if reward_kind == "math_verify":
            parsed, form = final_answer(completion)
            number = last_number(completion)
            reference = extract_answer(problem.answer) or problem.answer.strip()
            record |= {"parsed_answer": parsed, "answer_form": form, "last_number_correct": number is not None and same_answer_text(number, reference)}
        records.append(record)
    return records


def evaluation_metrics(records: list[dict], split_prefix: str) -> dict[str, float]:
    """`eval/{split_prefix}success` (reward >= 1); with the `math_verify` records also `..answered` (a boxed or
    marked final answer), `..correct_given_answered` (success among those; left out when none answered) and
    `..last_number_correct` (arithmetic, whatever the format)."""
    if not records:
        return {}
    prefix = f"eval/{split_prefix}"
    metrics = {f"{prefix}success": sum(r["reward"] >= 1.0 for r in records) / len(records)}
    if "answer_form" in records[0]:
        answered = [r for r in records if r["answer_form"] in ANSWERED_FORMS]
        metrics[f"{prefix}answered"] = len(answered) / len(records)
        if answered:
            metrics[f"{prefix}correct_given_answered"] = sum(r["reward"] >= 1.0 for r in answered) / len(answered)
        metrics[f"{prefix}last_number_correct"] = sum(r["last_number_correct"] for r in records) / len(records)
    return metrics


def greedy_success(model, tokenizer, task: Task, problems, score: Scorer | None = None, max_new_tokens: int | None = None) -> float:
    """Greedy success rate of `model` on `problems` (fp32 compute: the SFT probe)."""
    completions = greedy_completions(model, tokenizer, task, problems, "float32", max_new_tokens)
    return success_rate(completions, problems, score, task.reward_kind)
