"""Regenerate the configuration reference in README.md from the pydantic models."""

from pathlib import Path

from parityrl.config import reference_markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
head, rest = text.split(START, 1)
_, tail = rest.split(END, 1)
readme.write_text(f"{head}{START}\n{reference_markdown()}\n{END}{tail}")
print(f"updated {readme}")
