"""`AdditionFeedback`: the multi-turn demo environment (`configs/multiturn_demo.yaml`).

The model answers `a+b=`; a wrong answer gets a hint (`higher` or `lower`, as in a guessing game) and
the question again, up to `task.max_turns` answers. Reward 1 for the right answer at any turn, 0
otherwise, so held-out success is "solved within the turn limit". The hint makes later turns
learnable: the tiny model can move its answer in the direction it is told.
"""

from __future__ import annotations


class AdditionFeedback:
    def __init__(self, hint: bool = True):
        self.hint = hint
        self.question = ""
        self.answer = ""

    def reset(self, problem: dict) -> list[dict]:
        self.question, self.answer = str(problem["prompt"]), str(problem["answer"]).strip()
        return [{"role": "user", "content": self.question}]

    def step(self, messages: list[dict]) -> tuple[list[dict], float, bool]:
        said = messages[-1]["content"].strip()
        if said == self.answer:
            return [], 1.0, True
        feedback = "wrong"
        if self.hint and said.lstrip("-").isdigit():
            feedback = "higher" if int(said) < int(self.answer) else "lower"
        return [{"role": "user", "content": f"{feedback}\n{self.question}"}], 0.0, False
