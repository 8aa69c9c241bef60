"""Errors a user can fix: the message is the whole report they see.

The CLI prints a `UserError`'s message as one paragraph and exits with its `exit_code`, without a
traceback (unless `--debug`). Raise one only when the message names what is wrong (file, key, line)
and how to fix it; anything else is a bug and should stay an ordinary exception.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A problem with what the user gave us (config, data, model); `str(error)` is the paragraph shown."""

    exit_code: int = 2
    """Process exit status the CLI uses for this error (2: bad input, as for a usage error)."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InputError(UserError, ValueError):
    """Task data or a model directory that cannot be used. Also a ValueError, which is what these
    problems raised before, so callers that catch ValueError keep working."""


def decode_utf8(content: bytes, error: Callable[[int, int], UserError]) -> str:
    """`content` as UTF-8 text (a leading BOM dropped). Else raises `error(byte, line)`, built from the first
    byte that cannot be decoded and its 1-based line, so each file kind words its own fix."""
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as failure:
        raise error(content[failure.start], content[: failure.start].count(b"\n") + 1) from None


def import_named(spec: str, setting: str, kind: str, is_kind: Callable[[object], bool]) -> Any:
    """The object a `package.module:name` setting names (a user's reward function or environment class),
    imported in this process; InputError naming the setting and what to fix. `kind`: what the name must
    be ("function", "class"), checked by `is_kind`. Worker processes import it too."""
    import importlib

    module_name, name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise InputError(
            f"{setting}={spec!r}: cannot import module '{module_name}' ({type(error).__name__}: {error}). "
            "Install it or put its directory on PYTHONPATH; the worker processes import it too."
        ) from None
    found = getattr(module, name, None)
    if not is_kind(found):
        raise InputError(f"{setting}={spec!r}: module '{module_name}' ({getattr(module, '__file__', '?')}) has no {kind} '{name}'.")
    return found
