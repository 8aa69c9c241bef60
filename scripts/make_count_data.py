"""Write data/count.jsonl: "count from a to b" prompts whose answers are 55-95 characters long.

    python scripts/make_count_data.py [--out data/count.jsonl]

Every problem of the form {"prompt": "count 23 to 46:", "answer": "23 24 25 ... 46"} with 22 to 32
numbers between 0 and 99 (814 lines, in a fixed order; the file is committed and used by
configs/longgen.yaml). The answer is 55-95 tokens + EOS (each character is a token of the built
tokenizer; 79 on average), so
generation is long next to a trainer step and weight updates land while requests are in flight:
the setting where fix 3 (keep-mode updates) acts on the RL loop itself, not only in `parityrl check`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIN_NUMBERS, MAX_NUMBERS, LARGEST = 22, 32, 99


def problems() -> list[dict[str, str]]:
    rows = []
    for count in range(MIN_NUMBERS, MAX_NUMBERS + 1):
        for first in range(0, LARGEST - count + 2):
            last = first + count - 1
            rows.append({"prompt": f"count {first} to {last}:", "answer": " ".join(str(n) for n in range(first, last + 1))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "count.jsonl")
    args = parser.parse_args()
    rows = problems()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    lengths = [len(row["answer"]) for row in rows]
    print(f"wrote {len(rows)} problems to {args.out} (answers {min(lengths)}-{max(lengths)} characters)")


if __name__ == "__main__":
    main()
