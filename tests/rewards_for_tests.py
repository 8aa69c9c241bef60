"""Reward functions the reward tests name as `rewards_for_tests:<function>`; the pool's worker
processes import this module through the sys.path pytest gives the test process (tests/ is on it)."""

from __future__ import annotations

import os
import time


def raises(completion: str, answer: str, prompt: str) -> float:
    raise ValueError(f"cannot score {completion!r}")


def hangs_on_hang(completion: str, answer: str, prompt: str) -> float:
    """Exact match, except that the completion "hang" blocks far past any test timeout."""
    if completion == "hang":
        time.sleep(120)
    return float(completion == answer)


def dies_on_die(completion: str, answer: str, prompt: str) -> float:
    """Exact match, except that the completion "die" kills the worker process outright."""
    if completion == "die":
        os._exit(3)
    return float(completion == answer)


def prompt_length(completion: str, answer: str, prompt: str) -> float:
    """A non-binary reward that depends on the prompt: checks the prompt reaches the worker."""
    return float(len(prompt))


def not_a_number(completion: str, answer: str, prompt: str) -> float:
    return "high"  # type: ignore[return-value]


NOT_CALLABLE = 1.0


_calls = 0


def fails_every_20th(completion: str, answer: str, prompt: str) -> float:
    """Exact match, but every 20th call in a worker raises: a 5% failure rate that never bunches up
    past the pipeline's 10%-per-step stop (random failures would, now and then)."""
    global _calls
    _calls += 1
    if _calls % 20 == 0:
        raise RuntimeError(f"flaky reward failed on call {_calls}")
    return float(completion.strip() == answer.strip())
