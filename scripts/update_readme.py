"""Regenerate the generated tables of README.md: the configuration reference (from the pydantic models)
and the metrics table (from parityrl.metric_registry). Each sits between its start and end markers."""

from collections.abc import Callable
from pathlib import Path

from parityrl.config import reference_markdown as config_reference
from parityrl.metric_registry import reference_markdown as metrics_reference

BLOCKS: dict[str, Callable[[], str]] = {"config-reference": config_reference, "metrics-reference": metrics_reference}


def replace_block(text: str, name: str, content: str) -> str:
    """`text` with what lies between `<!-- name:start -->` and `<!-- name:end -->` replaced by `content`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content}\n{end}{tail}"


if __name__ == "__main__":
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    for name, render in BLOCKS.items():
        text = replace_block(text, name, render())
    readme.write_text(text)
    print(f"updated {readme}")
