"""Environments: what a multi-turn episode talks to (`task.kind: environment`).

An environment is any class with this shape, importable as `package.module:Class`:

    class MyEnv:
        def __init__(self, **environment_args): ...
        def reset(self, problem: dict) -> list[dict]:
            # the first chat messages, e.g. [{"role": "user", "content": "12+34="}]
        def step(self, messages: list[dict]) -> tuple[list[dict], float, bool]:
            # `messages`: the conversation so far, ending with the assistant message just sampled;
            # returns (messages to append, role `user` or `tool`; this turn's reward; episode over?)

The episode's reward is the sum of its turns' rewards. Environments run in worker processes with a
per-call timeout (`parityrl.reward_pool.WorkerPool`), never in the trainer. A worker is not tied to an
episode, so every call is *replayed* on a fresh instance: `reset(problem)`, then (for a turn)
`step(messages)`. An environment's state must therefore follow from the problem and the messages
(seed any randomness from the problem), which also makes episodes reproducible and resumable.

`call_environment` is what a worker runs; it checks what the environment returned, so a wrong type
costs that episode (reward 0, a counted error) rather than the run.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, NamedTuple, Protocol, runtime_checkable

from parityrl.errors import InputError, import_named

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
ENV_REPLY_ROLES = ("user", "tool")


@runtime_checkable
class Environment(Protocol):
    def reset(self, problem: dict) -> list[dict]: ...

    def step(self, messages: list[dict]) -> tuple[list[dict], float, bool]: ...


class EnvStep(NamedTuple):
    """What one environment turn returned, checked."""

    messages: list[dict]
    """Messages to append (role `user` or `tool`)."""
    reward: float
    done: bool


def is_environment_spec(spec: str) -> bool:
    return bool(_SPEC.match(spec))


def resolve_environment(spec: str, args: dict[str, Any] | None = None) -> type:
    """The class `spec` names, checked against the interface and `args`; InputError saying what to fix.
    Runs before any engine starts (and again in each worker)."""
    if not is_environment_spec(spec):
        raise InputError(f"task.environment={spec!r} is not an import path: write it as 'package.module:Class'.")
    class_name = spec.split(":")[1]
    cls = import_named(spec, "task.environment", "class", inspect.isclass)
    for method, params in (("reset", ["problem"]), ("step", ["messages"])):
        function = getattr(cls, method, None)
        if not callable(function):
            raise InputError(
                f"task.environment={spec!r}: class {class_name} has no method {method}(self, {', '.join(params)}); "
                "see docs/multi-turn.md for the interface."
            )
        try:
            inspect.signature(function).bind(None, *params)
        except TypeError:
            raise InputError(
                f"task.environment={spec!r}: {class_name}.{method}{inspect.signature(function)} does not take "
                f"({', '.join(params)}); it must be {method}(self, {', '.join(params)})."
            ) from None
    try:
        inspect.signature(cls).bind(**(args or {}))
    except TypeError as error:
        raise InputError(
            f"task.environment_args={args or {}} do not fit {class_name}{inspect.signature(cls)} ({error}); "
            "the keys of task.environment_args are passed to the constructor as keyword arguments."
        ) from None
    return cls


def check_messages(value: Any, what: str, roles: tuple[str, ...] = MESSAGE_ROLES) -> list[dict]:
    """`value` if it is a list of {"role", "content"} messages with allowed roles; else TypeError saying why."""
    if not isinstance(value, list):
        raise TypeError(f"{what} returned {type(value).__name__}, not a list of messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or message.get("role") not in roles:
            raise TypeError(f"{what} message {index} is {message!r}: each must be a dict with 'role' in {roles} and 'content' a string")
    return value


def call_environment(cls: type, args: dict[str, Any], problem: dict, messages: list[dict] | None) -> list[dict] | EnvStep:
    """`reset(problem)` on a fresh instance, then `step(messages)` when `messages` is given: the first
    messages, or the checked `EnvStep`. Raises what the environment raised, or TypeError for a wrong type."""
    env = cls(**args)
    first = check_messages(env.reset(dict(problem)), "reset()")
    if messages is None:
        if not first:
            raise TypeError("reset() returned no messages: the episode needs a first message to answer")
        return first
    result = env.step([dict(m) for m in messages])
    if not isinstance(result, tuple) or len(result) != 3:
        raise TypeError(f"step() returned {type(result).__name__}, not a tuple (messages, reward, done)")
    new_messages, reward, done = result
    check_messages(new_messages, "step()", ENV_REPLY_ROLES)
    if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
        raise TypeError(f"step() returned reward {reward!r}, not a finite number")
    if not isinstance(done, bool):
        raise TypeError(f"step() returned done={done!r}, not a bool")
    if not done and not new_messages:
        raise TypeError("step() returned done=False with no messages: the model would answer itself")
    return EnvStep(new_messages, float(reward), done)
