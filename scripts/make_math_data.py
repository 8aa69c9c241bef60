r"""Write data/math_word_problems.jsonl: arithmetic word problems with a \boxed{} answer.

    python scripts/make_math_data.py [--out data/math_word_problems.jsonl] [--count 2000] [--seed 0]
    python scripts/make_math_data.py --ood   # data/math_word_problems_ood.jsonl, 150 problems, seed 1

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

`--ood` writes the out-of-distribution evaluation set (`task.eval_path` of configs/smollm2_math.yaml):
the same three operations in templates, phrasings, names, items and operand ranges that the training
file never uses (sums of two numbers in 21-60, differences from 40-99, products of 6-12 by 11-15;
training stays within 1-20, 5-30 and 2-5 by 2-10). The held-out split of the training file shares its
templates (and some of its problems have a training twin with the same numbers); this file cannot.
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


OOD_NAMES = [("Priya", "she"), ("Hugo", "he"), ("Nadia", "she"), ("Felix", "he"), ("Chloe", "she"), ("Mateo", "he"),
             ("Aisha", "she"), ("Sven", "he")]
OOD_ITEMS = ["buttons", "beads", "tokens", "bottles", "ribbons", "tiles", "nuts", "badges"]


def _ood_difference_operands(rng: random.Random) -> tuple[int, int]:
    a = rng.randint(40, 99)
    return a, rng.randint(11, a - 11)


OOD_OPERATIONS = (
    Operation(
        "add",
        lambda rng: (rng.randint(21, 60), rng.randint(21, 60)),
        lambda a, b: a + b,
        (
            "{name} counted {a} red {items} and {b} blue {items}. What is the total number of {items}?",
            "Last year a club had {a} members. This year {b} new members joined. How many members are there now?",
            "A farmer picks {a} pears before lunch and {b} after lunch. Find the number of pears picked.",
            "{name} walked {a} meters, rested, then walked {b} meters more. How far did {he} walk?",
            "What is the total if {name} puts {a} {items} next to a pile of {b} {items}?",
        ),
    ),
    Operation(
        "subtract",
        _ood_difference_operands,
        lambda a, b: a - b,
        (
            "{name} started with {a} {items}. After giving away {b}, what number of {items} remain?",
            "A train carries {a} people. At the station {b} people get off. How many people stay on the train?",
            "{name} wants to collect {a} {items} and has {b} so far. How many are still missing?",
            "A tank holds {a} liters of water. Then {b} liters leak out. How many liters are left in the tank?",
            "Out of {a} {items} in a bag, {b} are broken. How many {items} in the bag are not broken?",
        ),
    ),
    Operation(
        "multiply",
        lambda rng: (rng.randint(6, 12), rng.randint(11, 15)),
        lambda a, b: a * b,
        (
            "A classroom has {a} tables and each table seats {b} students. How many students can sit down?",
            "{name} packs {b} {items} into each of {a} crates. What is the total number of {items} packed?",
            "A garden has {a} rows with {b} plants per row. Find how many plants grow in the garden.",
            "Each ticket costs {b} dollars. How much do {a} tickets cost in dollars?",
            "{name} runs {b} laps every day for {a} days. How many laps does {he} run?",
        ),
    ),
)


@dataclass(frozen=True)
class Style:
    """What a file's problems are drawn from."""

    operations: tuple[Operation, ...]
    names: list[tuple[str, str]]
    items: list[str]


TRAINING_STYLE = Style(OPERATIONS, NAMES, ITEMS)
OOD_STYLE = Style(OOD_OPERATIONS, OOD_NAMES, OOD_ITEMS)


def boxed(number: int) -> str:
    r"""The answer text: the number in LaTeX's \boxed{}, e.g. 19 -> \boxed{19}."""
    return f"\\boxed{{{number}}}"


def problem(rng: random.Random, operation: Operation, style: Style = TRAINING_STYLE) -> dict[str, str]:
    name, he = rng.choice(style.names)
    a, b = operation.operands(rng)
    template = rng.choice(operation.templates)
    prompt = template.format(name=name, he=he, him="him" if he == "he" else "her", items=rng.choice(style.items), a=a, b=b)
    return {"prompt": prompt, "answer": boxed(operation.result(a, b))}


def make_problems(count: int, seed: int, style: Style = TRAINING_STYLE) -> list[dict[str, str]]:
    """`count` distinct problems, operations in turn (add, subtract, multiply, add, ...)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[dict[str, str]] = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > count * 100:
            raise SystemExit(f"only {len(problems)} distinct problems after {attempts} draws; ask for fewer")
        record = problem(rng, style.operations[len(problems) % len(style.operations)], style)
        if record["prompt"] in seen:
            continue
        if not MIN_PROMPT_CHARS <= len(record["prompt"]) <= MAX_PROMPT_CHARS:
            raise SystemExit(f"template gives a {len(record['prompt'])}-character prompt: {record['prompt']!r}")
        seen.add(record["prompt"])
        problems.append(record)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ood", action="store_true", help="the out-of-distribution evaluation set (other templates, names, ranges)")
    parser.add_argument("--out", type=Path, default=None, help="default data/math_word_problems.jsonl (--ood: ..._ood.jsonl)")
    parser.add_argument("--count", type=int, default=None, help="default 2000 (--ood: 150)")
    parser.add_argument("--seed", type=int, default=None, help="default 0 (--ood: 1)")
    args = parser.parse_args()
    out = args.out or REPO / "data" / ("math_word_problems_ood.jsonl" if args.ood else "math_word_problems.jsonl")
    count = args.count or (150 if args.ood else 2000)
    seed = args.seed if args.seed is not None else int(args.ood)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record) for record in make_problems(count, seed, OOD_STYLE if args.ood else TRAINING_STYLE)]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} problems to {out}")


if __name__ == "__main__":
    main()
