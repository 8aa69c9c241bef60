"""The shipped math example: data/math_word_problems.jsonl is what scripts/make_math_data.py makes,
fits the tiny model, and configs/math.yaml scores it with math-verify."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

from parityrl.config import load_config
from parityrl.rewards import RewardItem, score_in_process
from parityrl.tasks import load_task

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "math_word_problems.jsonl"
TINY_MODEL_POSITIONS = 256  # max_position_embeddings of the built model
BOXED_NUMBER = re.compile(r"\\boxed\{(\d+)\}")  # the whole answer text: \boxed{19}


def _generator():
    spec = importlib.util.spec_from_file_location("make_math_data", REPO / "scripts" / "make_math_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _records() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines()]


def test_committed_file_is_what_the_generator_makes():
    lines = [json.dumps(record) for record in _generator().make_problems(2000, 0)]
    assert DATA.read_text() == "\n".join(lines) + "\n"


def test_problems_are_distinct_printable_and_their_answers_are_right():
    records = _records()
    assert len({r["prompt"] for r in records}) == len(records) == 2000
    operations = {"add": 0, "subtract": 0, "multiply": 0}
    for record in records:
        prompt, answer = record["prompt"], record["answer"]
        assert 40 <= len(prompt) <= 120 and all(32 <= ord(c) < 127 for c in prompt), prompt
        boxed = BOXED_NUMBER.fullmatch(answer)
        assert boxed, (prompt, answer)  # the number alone in \boxed{}, nothing around it
        a, b = (int(n) for n in re.findall(r"\d+", prompt))
        candidates = {"add": a + b, "subtract": a - b, "multiply": a * b}
        matching = [name for name, value in candidates.items() if str(value) == boxed.group(1)]
        assert matching, (prompt, answer)
        operations[matching[0]] += 1
    assert all(count > 500 for count in operations.values()), operations


def test_math_config_loads_the_file_and_fits_the_tiny_model():
    config = load_config(REPO / "configs" / "math.yaml")
    assert (config.task.kind, config.task.reward) == ("jsonl", "math_verify")
    task = load_task(config.task.model_copy(update={"path": str(REPO / config.task.path)}))
    assert len(task.train) + len(task.eval) == 2000
    longest_prompt = max(len(p.prompt) for p in task.train + task.eval)
    # character tokenizer: one token per character, plus BOS; leave room for the completion
    assert 1 + longest_prompt + config.sampling.max_new_tokens <= TINY_MODEL_POSITIONS // 2
    longest_answer = max(len(p.answer) for p in task.train + task.eval)
    assert longest_answer + 1 <= config.sampling.max_new_tokens  # the SFT target and EOS fit the budget
    # the SFT target itself scores 1: the reward extracts the completion's \boxed{} and math-verify
    # parses the boxed gold; a bare right number scores 1 too, a wrong number (boxed or bare) 0
    numbers = [int(BOXED_NUMBER.fullmatch(p.answer).group(1)) for p in task.eval]
    answers = [RewardItem(p.answer, p.answer, p.prompt) for p in task.eval]
    assert all(result.value == 1.0 for result in score_in_process("math_verify", answers))
    bare = [RewardItem(str(n), p.answer, p.prompt) for n, p in zip(numbers[:32], task.eval)]
    assert all(result.value == 1.0 for result in score_in_process("math_verify", bare))
    wrong = [RewardItem(f"\\boxed{{{n + 1}}}", p.answer, p.prompt) for n, p in zip(numbers[:32], task.eval)]
    wrong += [RewardItem(str(n + 1), p.answer, p.prompt) for n, p in zip(numbers[:32], task.eval)]
    assert all(result.value == 0.0 for result in score_in_process("math_verify", wrong))


OOD_DATA = REPO / "data" / "math_word_problems_ood.jsonl"


def _skeleton(prompt: str, style) -> str:
    """A prompt with its numbers, names and items blanked: what its template leaves."""
    text = re.sub(r"\d+", "N", prompt)
    for name, _ in style.names:
        text = text.replace(name, "NAME")
    for item in style.items:
        text = text.replace(item, "ITEM")
    return re.sub(r"\b(he|she|him|her)\b", "PRONOUN", text)


def test_ood_file_shares_no_template_name_or_operand_range_with_training():
    generator = _generator()
    lines = [json.dumps(record) for record in generator.make_problems(150, 1, generator.OOD_STYLE)]
    assert OOD_DATA.read_text() == "\n".join(lines) + "\n"
    ood = [json.loads(line) for line in lines]
    training = {_skeleton(r["prompt"], generator.TRAINING_STYLE) for r in _records()}
    assert not {_skeleton(r["prompt"], generator.OOD_STYLE) for r in ood} & training
    training_text = DATA.read_text()
    assert not any(name in training_text for name, _ in generator.OOD_NAMES)
    largest_training_answer = max(int(BOXED_NUMBER.fullmatch(r["answer"]).group(1)) for r in _records())
    assert sum(int(BOXED_NUMBER.fullmatch(r["answer"]).group(1)) > largest_training_answer for r in ood) >= 50
    for record in ood:
        a, b = (int(n) for n in re.findall(r"\d+", record["prompt"]))
        answer = int(BOXED_NUMBER.fullmatch(record["answer"]).group(1))
        # training's largest operand: 20 in sums, 30 in differences, 10 in products
        largest_in_training = {a + b: 20, abs(a - b): 30, a * b: 10}.get(answer)
        assert largest_in_training is not None, record
        assert max(a, b) > largest_in_training and 40 <= len(record["prompt"]) <= 120, record


def test_smollm2_config_evaluates_on_the_ood_file():
    config = load_config(REPO / "configs" / "smollm2_math.yaml")
    task = load_task(config.task.model_copy(update={"path": str(REPO / config.task.path), "eval_path": str(REPO / config.task.eval_path)}))
    assert len(task.eval_ood) == 150 and len(task.eval) == config.task.eval_size
    assert not {p.prompt for p in task.eval_ood} & {p.prompt for p in task.train}
