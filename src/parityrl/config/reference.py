"""The configuration reference (docs/configuration.md), generated from the schema (a test keeps it in sync)."""

from __future__ import annotations

from pydantic import BaseModel

from parityrl.config.schema import RunConfig


def describe_fields(model_cls: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, docstring) for every leaf field: docs/configuration.md's table."""
    rows: list[tuple[str, str, str]] = []
    instance = model_cls()
    for name, field in model_cls.model_fields.items():
        annotation = field.annotation
        key = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.append((key, "(section)", field.description or ""))
            rows.extend(describe_fields(annotation, prefix=f"{key}."))
        else:
            rows.append((key, repr(getattr(instance, name)), " ".join((field.description or "").split())))
    return rows


def reference_markdown() -> str:
    """The table of docs/configuration.md, generated from the models (a test keeps it in sync)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in describe_fields(RunConfig):
        if default == "(section)":
            lines.append(f"| **`{key}`** | | {doc} |")
        else:
            lines.append(f"| `{key}` | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)
