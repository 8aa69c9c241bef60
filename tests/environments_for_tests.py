"""Environments the episode tests name as `environments_for_tests:<Class>`: a user's own, outside
parityrl, imported by the environment workers through the sys.path pytest gives the test process."""

from __future__ import annotations

import time


class Countdown:
    """Say the problem's number, then one less each turn, down to 0: reward 1 per right turn, done at 0
    (a stateful-looking game whose state follows from the problem and the messages)."""

    def __init__(self, start_field: str = "start"):
        self.start_field = start_field
        self.start = 0

    def reset(self, problem: dict) -> list[dict]:
        self.start = int(problem[self.start_field])
        return [{"role": "user", "content": f"count down from {self.start}: "}]

    def step(self, messages: list[dict]) -> tuple[list[dict], float, bool]:
        said = [m["content"].strip() for m in messages if m["role"] == "assistant"]
        expected = self.start - (len(said) - 1)
        right = said[-1] == str(expected)
        return [{"role": "user", "content": "next: "}], float(right), expected <= 0 or not right


class Raises:
    def reset(self, problem: dict) -> list[dict]:
        return [{"role": "user", "content": problem["prompt"]}]

    def step(self, messages: list[dict]) -> tuple[list[dict], float, bool]:
        raise ValueError("the game crashed")


class HangsOnFirstStep(Raises):
    def step(self, messages: list[dict]) -> tuple[list[dict], float, bool]:
        time.sleep(120)
        return [], 1.0, True


class ReturnsText(Raises):
    def step(self, messages: list[dict]):
        return "wrong, try again"


class NoStep:
    def reset(self, problem: dict) -> list[dict]:
        return []
