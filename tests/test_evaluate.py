"""Held-out evaluation decodes through the rollout engine (greedy, current weights), not in the trainer.

The engine's greedy decoding must give the held-out success of the trainer-side HF decoding it
replaced, on the same model and problems, and must see a weight update."""

from __future__ import annotations

import asyncio

import torch

from parityrl.config import load_config
from parityrl.engines import make_engine
from parityrl.evaluate import engine_greedy_completions, greedy_completions, success_rate
from parityrl.policy import export_state_dict, load_policy, load_tokenizer
from parityrl.rewards import RewardItem
from parityrl.tasks import load_task


def test_vllm_greedy_success_equals_the_trainer_side_decoding(vllm_slot, tiny_model_dir):
    """On the shared vLLM engine (its weights are restored for the next test by the slot)."""
    assert_greedy_success_equals_the_trainer_side_decoding(tiny_model_dir, vllm_slot.get(), vllm_slot.run)


def test_reference_greedy_success_equals_the_trainer_side_decoding(tiny_model_dir):
    config = load_config(None, ["engine.kind=reference"])
    engine = make_engine(config, tiny_model_dir)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    try:
        assert_greedy_success_equals_the_trainer_side_decoding(tiny_model_dir, engine, loop.run_until_complete)
    finally:
        loop.run_until_complete(engine.close())
        loop.close()


def assert_greedy_success_equals_the_trainer_side_decoding(tiny_model_dir, engine, run) -> None:
    """128 held-out addition problems on the warmed-up tiny model (fp32): the same success as HF-style
    decoding in the trainer, the same text for >= 97% of problems (a logit tie at the argmax may
    break the other way in another kernel); after an update to a model whose weights are zeroed, the
    engine decodes under the new weights (every completion changes)."""
    config = load_config(None, ["task.eval_size=128"])
    task = load_task(config.task)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir, "float32", True)
    expected = greedy_completions(model, tokenizer, task, task.eval, "float32", config.sampling.max_new_tokens)

    async def decode() -> tuple[list[str], list[str]]:
        before = await engine_greedy_completions(engine, tokenizer, task, task.eval, config.sampling.max_new_tokens, "eval-0")
        zeroed = {name: torch.zeros_like(t) if "mlp" in name else t for name, t in export_state_dict(model).items()}
        await engine.update_weights(zeroed, engine.version + 1)
        after = await engine_greedy_completions(engine, tokenizer, task, task.eval, config.sampling.max_new_tokens, "eval-1")
        return before, after

    got, after_update = run(decode())
    success_engine = success_rate(got, task.eval, None, task.reward_kind)
    success_trainer = success_rate(expected, task.eval, None, task.reward_kind)
    assert 0.05 < success_trainer < 0.95  # a model that is sometimes right: the comparison means something
    assert success_engine == success_trainer
    assert sum(a == b for a, b in zip(got, expected)) >= 0.97 * len(expected)
    assert sum(a != b for a, b in zip(after_update, got)) >= 0.5 * len(got)


def test_evaluation_metrics_tell_format_from_arithmetic():
    """Four completions of `2+3`: boxed and right, an answer line but wrong, the right number on a bare last
    line, nothing. Answering means a boxed or marked answer; the bare right number is success for the reward
    (it falls back on the last line) but not an answer; its last number is right whatever the format."""
    from parityrl.evaluate import evaluation_metrics, evaluation_records
    from parityrl.rewards import score_in_process
    from parityrl.tasks import Problem

    problems = [Problem("What is 2+3?", "\\boxed{5}")] * 4
    completions = ["2+3 is \\boxed{5}.", "Adding them.\nAnswer: 6", "2 and 3 make\n5", ""]
    results = score_in_process("math_verify", [RewardItem(c, p.answer, p.prompt) for c, p in zip(completions, problems)])
    records = evaluation_records(problems, completions, results, "math_verify")
    assert [r["answer_form"] for r in records] == ["boxed", "marked", "last_line", ""]
    assert [r["parsed_answer"] for r in records] == ["5", "6", "5", ""]
    assert evaluation_metrics(records, "ood_") == {
        "eval/ood_success": 0.5, "eval/ood_answered": 0.5, "eval/ood_correct_given_answered": 0.5, "eval/ood_last_number_correct": 0.5,
    }  # fmt: skip
    exact = evaluation_records(problems, completions, results, "exact")
    assert evaluation_metrics(exact, "") == {"eval/success": 0.5}  # no answer reading for other rewards
