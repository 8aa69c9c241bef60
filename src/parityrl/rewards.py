"""Rewards: the built-in ones and user functions (`reward_pool.RewardPool` scores them off the event loop).

A reward function has the signature `fn(completion: str, answer: str, prompt: str) -> float`:
`completion` is the decoded generated text (special tokens removed), `answer` the task's reference
answer, `prompt` the problem's prompt text before the chat template. `task.reward` names one:

- `exact`: 1.0 when the stripped completion equals the stripped answer, else 0.0;
- `math_verify`: 1.0 when the completion's final answer (`extract_answer`) is mathematically
  equivalent to the reference answer according to math-verify, else 0.0;
- `package.module:function`: any importable function with the signature above. It runs in the
  reward worker processes, so it must be importable there: an installed package, or a module on
  the trainer's `sys.path` (the workers get the trainer's `sys.path` through PYTHONPATH).

`reward_pool.RewardPool` runs them in worker processes, never in the trainer process (see there why).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, NamedTuple

from parityrl.errors import InputError, import_named

if TYPE_CHECKING:
    pass

RewardFn = Callable[[str, str, str], float]
"""`fn(completion, answer, prompt) -> reward`."""


class RewardItem(NamedTuple):
    """One completion to score."""

    completion: str
    """Decoded completion text."""
    answer: str
    """Reference answer of the problem."""
    prompt: str = ""
    """Prompt text before the template (for rewards that need it)."""


class RewardResult(NamedTuple):
    """The reward of one completion; a reward that failed scores 0.0 and says why in `error`."""

    value: float
    """The reward (0.0 when `error` is set)."""
    error: str | None = None
    """None when the reward function returned a number; else "ExceptionType: message",
    "timed out after X s" or "reward worker died (exit code N)"."""


# ---------------------------------------------------------------------------------------------
# Built-in rewards


def exact_reward(completion: str, answer: str, prompt: str = "") -> float:
    """1.0 if the stripped completion equals the stripped answer."""
    return float(completion.strip() == answer.strip())


_BOXED = re.compile(r"\\boxed\s*\{")
# Final-answer lines, tried in this order on each line from the last line up. The answer group is
# everything after the marker; `_clean_answer` drops trailing punctuation and markdown bold.
_FINAL_ANSWER_LINES = (
    re.compile(r"^\s*#{4}\s*(?P<answer>\S.*)$"),
    re.compile(r"\bfinal\s+answer\s*(?:is\b)?\s*[:=]?\s*(?P<answer>\S.*)$", re.IGNORECASE),
    re.compile(r"\bthe\s+answer\s+is\b\s*[:=]?\s*(?P<answer>\S.*)$", re.IGNORECASE),
    re.compile(r"\banswer\s*[:=]\s*(?P<answer>\S.*)$", re.IGNORECASE),
)


def _last_complete_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces close (nested braces counted), else None.
    A truncated trailing `\\boxed{12` is ignored: the model had not finished that answer."""
    found: str | None = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
                if depth == 0:
                    found = text[start:position]
                    break
    return found


def _clean_answer(text: str) -> str:
    text = text.strip().strip("*").strip()
    # "The answer is 42." -> "42"; a decimal point inside a number ("3.5") is not trailing
    return text.rstrip(".").strip()


def final_answer(completion: str) -> tuple[str, str]:
    """(answer text, how it was written) of a completion's final answer.

    In order: the content of the last complete `\\boxed{...}` (nested braces handled), form "boxed";
    else the answer on the last line that has a final-answer marker ("#### X", "Final answer: X",
    "The answer is X", "Answer: X", case-insensitive), form "marked"; else the last non-empty line,
    form "last_line" (no answer was marked: what the reward falls back on). Surrounding whitespace,
    markdown bold and a trailing period are removed. ("", "") for an empty completion.
    """
    boxed = _last_complete_boxed(completion)
    if boxed is not None:
        return boxed.strip(), "boxed"
    lines = [line for line in completion.splitlines() if line.strip()]
    for line in reversed(lines):
        for pattern in _FINAL_ANSWER_LINES:
            match = pattern.search(line)
            if match and _clean_answer(match.group("answer")):
                return _clean_answer(match.group("answer")), "marked"
    return (_clean_answer(lines[-1]), "last_line") if lines else ("", "")


def extract_answer(completion: str) -> str:
    """The final answer written in a completion, as text (`final_answer`'s answer)."""
    return final_answer(completion)[0]


_NUMBER = re.compile(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in `text` ("1,000" -> "1000"), or None: a format-free reading of an
    answer, to tell arithmetic from answering in the asked format."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns that its timeout is off; here the pool enforces the timeout instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@functools.cache
def _math_verify():
    """math-verify's (parse, verify), imported on first use (0.4 s, sympy) with its timeout warning muted."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    return math_verify.parse, math_verify.verify


def _parse_math(text: str) -> list:
    """math-verify's parse of an extracted answer. A bare answer is boxed first so LaTeX without
    delimiters ("\\frac{1}{2}", "\\sqrt{2}") parses; math-verify's own timeout is off (it needs the
    main thread's SIGALRM), the caller's process or pool bounds the time instead."""
    parse, _ = _math_verify()
    delimited = "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text
    parsed = parse(text if delimited else f"\\boxed{{{text}}}", parsing_timeout=None)
    return parsed or parse(text, parsing_timeout=None)


def _as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _normalised(text: str) -> str:
    text = _clean_answer(text).strip("$").strip()
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 1,000 -> 1000
    return " ".join(text.lower().split())


def same_answer_text(predicted: str, answer: str) -> bool:
    """Fallback comparison when math-verify parses nothing: equal as exact numbers ("0.5" vs "1/2",
    "1,000" vs "1000"), else equal as lower-cased, whitespace-normalised text."""
    predicted, answer = _normalised(predicted), _normalised(answer)
    predicted_number, answer_number = _as_number(predicted), _as_number(answer)
    if predicted_number is not None and answer_number is not None:
        return predicted_number == answer_number
    return predicted == answer


def math_verify_reward(completion: str, answer: str, prompt: str = "") -> float:
    """1.0 if the completion's final answer (`extract_answer`) equals the reference answer according
    to math-verify; when math-verify parses nothing on either side, `same_answer_text` decides. The
    reference answer goes through `extract_answer` too, so a GSM8K-style "...#### 72" answer works."""
    predicted_text = extract_answer(completion)
    answer_text = extract_answer(answer) or answer.strip()
    if not predicted_text:
        return 0.0
    gold, predicted = _parse_math(answer_text), _parse_math(predicted_text)
    if gold and predicted:
        _, verify = _math_verify()
        return float(verify(gold, predicted, timeout_seconds=None))
    return float(same_answer_text(predicted_text, answer_text))


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact": exact_reward, "math_verify": math_verify_reward}
"""Reward names `task.reward` accepts besides `package.module:function`."""

_USER_REWARD = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def is_reward_spec(spec: str) -> bool:
    """Whether `spec` is a built-in reward name or has the `package.module:function` form."""
    return spec in BUILTIN_REWARDS or bool(_USER_REWARD.match(spec))


def resolve_reward(spec: str) -> RewardFn:
    """The reward function `spec` names, imported in this process; InputError saying what to fix."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if not _USER_REWARD.match(spec):
        raise InputError(
            f"task.reward={spec!r} is not a reward: use 'exact', 'math_verify' or 'package.module:function' "
            "(a function fn(completion: str, answer: str, prompt: str) -> float)"
        )
    return import_named(spec, "task.reward", "function", callable)


def score_one(reward: RewardFn, item: RewardItem) -> RewardResult:
    """Call `reward` on one item; an exception or a non-finite/non-numeric value scores 0.0 with an error."""
    try:
        value = float(reward(item.completion, item.answer, item.prompt))
    except Exception as error:
        return RewardResult(0.0, f"{type(error).__name__}: {error}")
    if not math.isfinite(value):
        return RewardResult(0.0, f"ValueError: reward returned {value}")
    return RewardResult(value, None)


def score_in_process(spec: str, items: Sequence[RewardItem]) -> list[RewardResult]:
    """Score in the calling thread, without a timeout. Safe in any thread for the built-in rewards
    (math-verify's signal timeout is off); for untrusted or slow user rewards use a RewardPool."""
    reward = resolve_reward(spec)
    return [score_one(reward, item) for item in items]


# ---------------------------------------------------------------------------------------------
