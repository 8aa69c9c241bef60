"""Regenerate the generated reference pages: docs/configuration.md (from the pydantic schema) and
docs/metrics.md (from parityrl.metric_registry). Each table sits between its start and end markers;
tests/test_config.py and tests/test_metric_registry.py fail when a page is stale."""

from collections.abc import Callable
from pathlib import Path

from parityrl.config import reference_markdown as config_reference
from parityrl.metric_registry import reference_markdown as metrics_reference

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCKS: dict[str, tuple[Path, Callable[[], str]]] = {
    "config-reference": (DOCS / "configuration.md", config_reference),
    "metrics-reference": (DOCS / "metrics.md", metrics_reference),
}


def replace_block(text: str, name: str, content: str, path: Path) -> str:
    """`text` with what lies between `<!-- name:start -->` and `<!-- name:end -->` replaced by `content`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content}\n{end}{tail}"


if __name__ == "__main__":
    for name, (path, render) in BLOCKS.items():
        path.write_text(replace_block(path.read_text(), name, render(), path))
        print(f"updated {path}")
