"""`Calculator`: a tool-use environment (`configs/smollm2_calculator.yaml`).

The system prompt documents one call format: a turn that contains `<calc>EXPRESSION</calc>` is a
tool call, and the environment answers it with a `tool` message holding the value (or `error: ...`
when the expression does not parse). A turn without a call is the final answer, scored with
math-verify against the problem's answer (`rewards.math_verify_reward`); the episode ends there.
Expressions are evaluated by `evaluate_arithmetic`, a parser of numbers, + - * / // % ** and
parentheses over Python's `ast` (never `eval`), with bounded exponents and lengths.

Tool-call success (`episode/tool_call_success`) counts `tool` messages that do not start with `error`.
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

from parityrl.rewards import math_verify_reward

SYSTEM_PROMPT = (
    "You can use a calculator. To compute something, write <calc>EXPRESSION</calc> (numbers, + - * / and "
    "parentheses) and stop; the result comes back in the next message. When you know the answer, write it "
    "as \\boxed{ANSWER}."
)
CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**30

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate_arithmetic(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; ValueError saying what is not allowed."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression.strip()!r}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and (right.denominator != 1 or abs(right) > MAX_EXPONENT):
            raise ValueError(f"exponent {right} is not an integer up to {MAX_EXPONENT}")
        if isinstance(node.op, ast.Div | ast.FloorDiv | ast.Mod) and right == 0:
            raise ValueError("division by zero")
        result = _BINARY[type(node.op)](left, right)
        if abs(result) > MAX_MAGNITUDE:
            raise ValueError("result too large")
        return Fraction(result)
    raise ValueError(f"{type(node).__name__} is not arithmetic")


def format_value(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6g}"


class Calculator:
    def __init__(self, system_prompt: str = SYSTEM_PROMPT):
        self.system_prompt = system_prompt
        self.answer = ""

    def reset(self, problem: dict) -> list[dict]:
        self.answer = str(problem["answer"])
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": str(problem["prompt"])}]

    def step(self, messages: list[dict]) -> tuple[list[dict], float, bool]:
        said = messages[-1]["content"]
        call = CALL.search(said)
        if call is None:
            return [], math_verify_reward(said, self.answer), True
        try:
            result = format_value(evaluate_arithmetic(call.group(1)))
        except (ValueError, ZeroDivisionError, OverflowError) as error:
            result = f"error: {error}"
        return [{"role": "tool", "content": result}], 0.0, False
