r"""Write data/math_word_problems.jsonl: arithmetic word problems with a \boxed{} answer.

    python scripts/make_math_data.py [--out data/math_word_problems.jsonl] [--count 2000] [--seed 0]

Deterministic (seeded, offline): the same arguments always give the same file, which is committed
and used by configs/math.yaml. One JSON object per line, {"prompt": ..., "answer": ...}: the
prompt is a one-sentence story (40-120 characters, printable ASCII, so the built character
tokenizer covers it) and the answer the number in LaTeX's \boxed{}, e.g.

    {"prompt": "Tom has 12 apples and buys 7 more. How many apples does he have?", "answer": "\\boxed{19}"}

(JSON escapes the backslash; the answer text is \boxed{19}.) The tiny model's SFT warm-up learns
to write the answer text, so its completion is \boxed{N} and the math_verify reward takes the
last \boxed{} of the completion, as it would from a real model's reasoning.

A third each of addition, subtraction and multiplication, over small numbers a 2.6M-parameter
model can learn to get sometimes right.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIN_PROMPT_CHARS, MAX_PROMPT_CHARS = 40, 120

NAMES = [("Tom", "he"), ("Anna", "she"), ("Ravi", "he"), ("Mia", "she"), ("Leo", "he"), ("Sara", "she"),
         ("Omar", "he"), ("Lily", "she"), ("Ben", "he"), ("Zoe", "she"), ("Kenji", "he"), ("Ines", "she")]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "cards", "shells", "coins", "stamps"]


@dataclass(frozen=True)
class Operation:
    name: str
    operands: Callable[[random.Random], tuple[int, int]]
    """Draws (a, b) for one problem."""
    result: Callable[[int, int], int]
    templates: tuple[str, ...]
    """str.format templates over name, he (pronoun), items, a, b."""


def _sum_operands(rng: random.Random) -> tuple[int, int]:
    return rng.randint(1, 20), rng.randint(1, 20)


def _difference_operands(rng: random.Random) -> tuple[int, int]:
    a = rng.randint(5, 30)
    return a, rng.randint(1, a - 1)


def _product_operands(rng: random.Random) -> tuple[int, int]:
    return rng.randint(2, 5), rng.randint(2, 10)


OPERATIONS = (
    Operation(
        "add",
        _sum_operands,
        lambda a, b: a + b,
        (
            "{name} has {a} {items} and buys {b} more. How many {items} does {he} have?",
            "{name} found {a} {items} in the morning and {b} in the afternoon. How many {items} in all?",
            "A box holds {a} {items}. {name} puts in {b} more. How many {items} are in the box now?",
            "There are {a} {items} on a table and {b} on a shelf. How many {items} are there altogether?",
            "{name} read {a} pages on Monday and {b} pages on Tuesday. How many pages did {he} read?",
            "{name} has {a} {items}. A friend gives {him} {b} more. How many {items} does {he} have now?",
        ),
    ),
    Operation(
        "subtract",
        _difference_operands,
        lambda a, b: a - b,
        (
            "{name} had {a} {items} and gave {b} to a friend. How many {items} are left?",
            "A shop had {a} {items}. It sold {b} of them. How many {items} does the shop have now?",
            "{name} has {a} {items} and loses {b}. How many {items} does {he} have left?",
            "There were {a} birds on a tree. {b} flew away. How many birds are still on the tree?",
            "{name} needs {a} {items} and already has {b}. How many more {items} does {he} need?",
            "A jar holds {a} {items}. {name} takes out {b}. How many {items} stay in the jar?",
        ),
    ),
    Operation(
        "multiply",
        _product_operands,
        lambda a, b: a * b,
        (
            "{name} buys {a} bags with {b} {items} in each bag. How many {items} does {he} buy?",
            "There are {a} rows of chairs with {b} chairs in each row. How many chairs are there?",
            "Each box holds {b} {items}. How many {items} are in {a} boxes?",
            "{name} saves {b} dollars a week for {a} weeks. How many dollars does {he} save?",
            "{a} friends each bring {b} {items} to a party. How many {items} do they bring in all?",
            "A book has {a} chapters of {b} pages each. How many pages does the book have?",
        ),
    ),
)


def boxed(number: int) -> str:
    r"""The answer text: the number in LaTeX's \boxed{}, e.g. 19 -> \boxed{19}."""
    return f"\\boxed{{{number}}}"


def problem(rng: random.Random, operation: Operation) -> dict[str, str]:
    name, he = rng.choice(NAMES)
    a, b = operation.operands(rng)
    template = rng.choice(operation.templates)
    prompt = template.format(name=name, he=he, him="him" if he == "he" else "her", items=rng.choice(ITEMS), a=a, b=b)
    return {"prompt": prompt, "answer": boxed(operation.result(a, b))}


def make_problems(count: int, seed: int) -> list[dict[str, str]]:
    """`count` distinct problems, operations in turn (add, subtract, multiply, add, ...)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[dict[str, str]] = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > count * 100:
            raise SystemExit(f"only {len(problems)} distinct problems after {attempts} draws; ask for fewer")
        record = problem(rng, OPERATIONS[len(problems) % len(OPERATIONS)])
        if record["prompt"] in seen:
            continue
        if not MIN_PROMPT_CHARS <= len(record["prompt"]) <= MAX_PROMPT_CHARS:
            raise SystemExit(f"template gives a {len(record['prompt'])}-character prompt: {record['prompt']!r}")
        seen.add(record["prompt"])
        problems.append(record)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "math_word_problems.jsonl")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record) for record in make_problems(args.count, args.seed)]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} problems to {args.out}")


if __name__ == "__main__":
    main()
