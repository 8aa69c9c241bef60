"""Verifiable tasks: a prompt source with a held-out split, how prompts are templated, and which reward.

`addition` is the embedded task a 2.6M-parameter model learns by RL on 2 CPU cores in minutes.
`jsonl` / `hf_dataset` are the real-world path: prompts and answers from a file, rewards by exact
match, by math-verify equivalence for free-form math answers, or by a user function
(`parityrl.rewards`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from parityrl.config import TaskConfig
from parityrl.rewards import resolve_reward


@dataclass(frozen=True)
class Problem:
    prompt: str
    """Prompt text before the template (the template adds BOS / chat markup)."""
    answer: str
    """Reference answer the reward compares against."""


@dataclass
class Task:
    name: str
    train: list[Problem]
    eval: list[Problem]
    reward_kind: str
    """`task.reward`: a built-in reward name or `package.module:function` (see `parityrl.rewards`)."""
    chat_template: str = "auto"
    """`task.chat_template`: `auto` or `none` (see `parityrl.assets.encode_prompt`)."""
    system_prompt: str | None = None
    """`task.system_prompt`: system message put before every prompt, or None."""

    def reward(self, completion: str, answer: str, prompt: str = "") -> float:
        """The reward of one completion, computed in this thread without a timeout (a reward that
        raises propagates). Rollouts and evaluation score through a `parityrl.rewards.RewardPool`."""
        return resolve_reward(self.reward_kind)(completion, answer, prompt)

    def sample_train(self, rng: random.Random, count: int) -> list[Problem]:
        return [self.train[rng.randrange(len(self.train))] for _ in range(count)]


def addition_problems(max_operand: int) -> list[Problem]:
    return [Problem(f"{a}+{b}=", str(a + b)) for a in range(max_operand) for b in range(max_operand)]


def _split(problems: list[Problem], eval_size: int, seed: int = 1234) -> tuple[list[Problem], list[Problem]]:
    """Deterministic held-out split; the split seed is fixed so every run shares the same eval set."""
    if eval_size >= len(problems):
        raise ValueError(f"task.eval_size={eval_size} leaves no training prompts (only {len(problems)} in total)")
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    eval_index = set(order[:eval_size])
    train = [p for i, p in enumerate(problems) if i not in eval_index]
    held_out = [problems[i] for i in order[:eval_size]]
    return train, held_out


def _load_records(config: TaskConfig) -> list[dict]:
    if config.path is None:
        raise ValueError(f"task.kind={config.kind} needs task.path (a .jsonl file or a saved dataset directory)")
    path = Path(config.path)
    if not path.exists():
        raise FileNotFoundError(f"task.path does not exist: {path}")
    if config.kind == "jsonl":
        records = []
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({error.msg})") from None
        return records
    from datasets import load_from_disk

    dataset = load_from_disk(str(path))
    if hasattr(dataset, "keys"):  # a DatasetDict: use its train split
        dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset.keys()))]
    return list(dataset)


def load_task(config: TaskConfig) -> Task:
    if config.kind == "addition":
        problems = addition_problems(config.max_operand)
    else:
        records = _load_records(config)
        problems = []
        for index, record in enumerate(records):
            missing = [f for f in (config.prompt_field, config.answer_field) if f not in record]
            if missing:
                raise ValueError(
                    f"{config.path}: record {index} lacks {missing}; set task.prompt_field / task.answer_field"
                )
            problems.append(Problem(str(record[config.prompt_field]), str(record[config.answer_field])))
    if config.prompt_prefix:
        problems = [Problem(config.prompt_prefix + p.prompt, p.answer) for p in problems]
    train, held_out = _split(problems, config.eval_size)
    return Task(
        name=config.kind,
        train=train,
        eval=held_out,
        reward_kind=config.reward,
        chat_template=config.chat_template,
        system_prompt=config.system_prompt,
    )
