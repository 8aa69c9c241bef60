"""The import graph runs one way (README "Layout"): engines and train sit on scoring and policy,
parity on scoring and engines, and nothing below the pipeline imports it or the layers above."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "parityrl"
# module (path prefix inside the package) -> parityrl modules it must never import
FORBIDDEN = {
    "scoring.py": ("parityrl.train", "parityrl.engines", "parityrl.parity", "parityrl.pipeline", "parityrl.rollouts"),
    "policy.py": ("parityrl.scoring", "parityrl.train", "parityrl.engines", "parityrl.parity", "parityrl.pipeline"),
    "engines/": ("parityrl.train", "parityrl.parity", "parityrl.pipeline", "parityrl.rollouts"),
    "train/": ("parityrl.engines", "parityrl.parity", "parityrl.pipeline", "parityrl.rollouts"),
    "parity/": ("parityrl.train", "parityrl.pipeline", "parityrl.rollouts"),
}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_imports_point_down_only():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        for prefix, forbidden in FORBIDDEN.items():
            if relative.startswith(prefix):
                violations += [f"{relative} imports {m}" for m in imported_modules(path) if m.startswith(forbidden)]
    assert violations == []
