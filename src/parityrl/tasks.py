"""Verifiable tasks: a prompt source with a held-out split, how prompts are templated, and which reward.

`addition` is the embedded task a 2.6M-parameter model learns by RL on 2 CPU cores in minutes.
`jsonl` / `hf_dataset` are the real-world path: prompts and answers from a file, rewards by exact
match, by math-verify equivalence for free-form math answers, or by a user function
(`parityrl.rewards`).
"""

from __future__ import annotations

import difflib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parityrl.config import TaskConfig
from parityrl.errors import InputError, decode_utf8
from parityrl.rewards import resolve_reward


@dataclass(frozen=True)
class Problem:
    prompt: str
    """Prompt text before the template (the template adds BOS / chat markup)."""
    answer: str
    """Reference answer the reward compares against."""
    where: str = field(default="", compare=False)
    """Where the problem came from ('data.jsonl:7', 'data/ row 7'), for error messages; '' for built-in tasks."""
    fields: dict[str, Any] | None = field(default=None, compare=False)
    """`task.kind: environment`: the whole record, what the environment's `reset` receives (None otherwise)."""

    def record(self) -> dict[str, Any]:
        """What an environment's `reset` receives: the record, or {"prompt", "answer"} for built-in problems."""
        return dict(self.fields) if self.fields is not None else {"prompt": self.prompt, "answer": self.answer}


@dataclass
class Task:
    name: str
    train: list[Problem]
    eval: list[Problem]
    """The held-out split of the task's problems (`task.eval_size`), never trained on."""
    reward_kind: str
    """`task.reward`: a built-in reward name or `package.module:function` (see `parityrl.rewards`)."""
    chat_template: str = "auto"
    """`task.chat_template`: `auto` or `none` (see `encode_prompt below`)."""
    system_prompt: str | None = None
    """`task.system_prompt`: system message put before every prompt, or None."""
    environment: str | None = None
    """`task.environment` (`package.module:Class`) for multi-turn episodes; None: one prompt, one completion."""
    eval_ood: list[Problem] = field(default_factory=list)
    """The `task.eval_path` problems (meant to be out of the training distribution); [] when it is unset."""

    def reward(self, completion: str, answer: str, prompt: str = "") -> float:
        """The reward of one completion, computed in this thread without a timeout (a reward that
        raises propagates). Rollouts and evaluation score through a `parityrl.reward_pool.RewardPool`."""
        return resolve_reward(self.reward_kind)(completion, answer, prompt)

    def sample_train(self, rng: random.Random, count: int) -> list[Problem]:
        return [self.train[rng.randrange(len(self.train))] for _ in range(count)]


def addition_problems(max_operand: int) -> list[Problem]:
    return [Problem(f"{a}+{b}=", str(a + b)) for a in range(max_operand) for b in range(max_operand)]


def _split(
    problems: list[Problem], eval_size: int, seed: int = 1234, source: str = "the task", grow: str = "use a larger task"
) -> tuple[list[Problem], list[Problem]]:
    """Deterministic held-out split; the split seed is fixed so every run shares the same eval set.
    `source` (where the problems came from) and `grow` (how to get more) go into the error for a too-small task."""
    if eval_size >= len(problems):
        raise InputError(_too_small_message(len(problems), eval_size, source, grow))
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    eval_index = set(order[:eval_size])
    train = [p for i, p in enumerate(problems) if i not in eval_index]
    held_out = [problems[i] for i in order[:eval_size]]
    return train, held_out


def _too_small_message(count: int, eval_size: int, source: str, grow: str) -> str:
    head = f"task.eval_size={eval_size} leaves no training prompts: {source} has {count} prompt{'s' * (count != 1)}"
    if count < 2:
        return f"{head}, and a run needs at least 2 (one to train on, one held out): {grow}."
    return f"{head} and the held-out split takes {eval_size}. Set task.eval_size below {count} (e.g. task.eval_size: {max(1, count // 5)}), or {grow}."


EXAMPLE_LINE = '{"prompt": "12+34=", "answer": "46"}'
GZIP_MAGIC = b"\x1f\x8b"
JSON_TYPE_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def _decode_text(path: Path, setting: str = "task.path") -> str:
    """UTF-8 text of a data file; InputError (with the line) for a binary or otherwise undecodable file."""
    try:
        content = path.read_bytes()
    except OSError as error:
        raise InputError(f"{setting} {path} cannot be read: {error.strerror}.") from None
    if content.startswith(GZIP_MAGIC):
        raise InputError(f"{setting} {path} is gzip-compressed; decompress it (gunzip) and point {setting} at the .jsonl file.")
    if b"\0" in content:
        line = content[: content.index(b"\0")].count(b"\n") + 1
        raise InputError(
            f"{setting} {path} is a binary file (NUL byte at line {line}), not JSON Lines text; point {setting} at a "
            f".jsonl file with one object per line, e.g. {EXAMPLE_LINE}."
        )
    return decode_utf8(
        content,
        lambda byte, line: InputError(
            f"{path}:{line}: byte 0x{byte:02x} is not UTF-8; is {setting} a binary or compressed file? "
            "JSON Lines data must be UTF-8 text (decompress it, or re-save it as UTF-8)."
        ),
    )


def _read_jsonl(path: Path, setting: str = "task.path") -> list[tuple[str, dict[str, Any]]]:
    """(location 'file:line', object) for every non-blank line of a JSON Lines file."""
    text = _decode_text(path, setting)
    lines = text.splitlines()
    last_line = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    records: list[tuple[str, dict[str, Any]]] = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(_bad_json_message(path, line_no, line, error, is_last=line_no == last_line, ends_with_newline=text.endswith("\n"))) from None
        if not isinstance(value, dict):
            kind = JSON_TYPE_NAMES.get(type(value), type(value).__name__)
            raise InputError(
                f"{path}:{line_no}: line {line_no} is {kind} ({_preview(line)}), not a JSON object; every line must be "
                f"one object holding the task.prompt_field and task.answer_field keys, e.g. {EXAMPLE_LINE}."
            )
        records.append((f"{path}:{line_no}", value))
    if not records:
        raise InputError(f"{setting} {path} holds no records (the file is empty or only blank lines); write one JSON object per line, e.g. {EXAMPLE_LINE}.")
    return records


def _bad_json_message(path: Path, line_no: int, line: str, error: json.JSONDecodeError, is_last: bool, ends_with_newline: bool) -> str:
    head = f"{path}:{line_no}: line {line_no} is truncated or not valid JSON ({error.msg}: column {error.colno})"
    if is_last and not ends_with_newline:
        return (
            f"{head}. It is the last line and the file does not end with a newline: the file was probably cut off "
            "while being written; re-create it, or delete that line."
        )
    if line.strip() in ("[", "{"):
        return (
            f"{head}. This looks like one JSON document spread over many lines; task.kind=jsonl reads JSON Lines: "
            f"one complete object per line, e.g. {EXAMPLE_LINE}."
        )
    return f"{head}. Every line must be one complete JSON object, e.g. {EXAMPLE_LINE}."


def _preview(text: str, limit: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _read_hf_dataset(path: Path, setting: str = "task.path") -> list[tuple[str, dict[str, Any]]]:
    """(location 'dir row N', row) for every row of a `save_to_disk` directory (its train split for a DatasetDict)."""
    from datasets import load_from_disk  # lazy: `datasets` is slow to import and only this kind needs it

    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise InputError(
            f"{setting} {path} is not a dataset saved with save_to_disk ({error}); save it with "
            "Dataset.save_to_disk, or for a .jsonl file set task.kind: jsonl."
        ) from None
    if hasattr(dataset, "keys"):  # a DatasetDict: use its train split
        dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset.keys()))]
    records = [(f"{path} row {index}", dict(row)) for index, row in enumerate(dataset)]
    if not records:
        raise InputError(f"{setting} {path} holds no rows; the dataset saved there is empty.")
    return records


def _load_records(config: TaskConfig, setting: str = "task.path") -> list[tuple[str, dict[str, Any]]]:
    """(location, record) pairs of a jsonl / hf_dataset task read from the `setting` path (`task.path` or
    `task.eval_path`); InputError naming the file and line for bad data."""
    wanted = "a .jsonl file" if config.kind in ("jsonl", "environment") else "a directory written by Dataset.save_to_disk"
    location = config.path if setting == "task.path" else config.eval_path
    if location is None:
        raise InputError(f"task.kind={config.kind} needs {setting}: set {setting} to {wanted} holding the prompts and answers.")
    path = Path(location)
    if not path.exists():
        raise InputError(
            f"{setting} {path} does not exist (relative paths start at the current directory, {Path.cwd()}); "
            f"set {setting} to {wanted} holding the prompts and answers."
        )
    if config.kind in ("jsonl", "environment"):
        if path.is_dir():
            inside = sorted(path.glob("*.jsonl"))
            example = f" (e.g. {inside[0]})" if inside else ""
            raise InputError(
                f"{setting} {path} is a directory, but task.kind=jsonl reads one .jsonl file; point {setting} at the "
                f"file{example}, or for a directory written by save_to_disk set task.kind: hf_dataset."
            )
        return _read_jsonl(path, setting)
    if not path.is_dir():
        raise InputError(
            f"{setting} {path} is a file, but task.kind=hf_dataset reads a directory written by Dataset.save_to_disk; "
            "for a .jsonl file set task.kind: jsonl."
        )
    return _read_hf_dataset(path, setting)


def _field_text(where: str, record: dict[str, Any], key: str, setting: str) -> str:
    """The record's `key` as text; InputError naming the line, the key and the task.*_field setting."""
    if key not in record:
        keys = ", ".join(repr(k) for k in record) or "none"
        close = difflib.get_close_matches(key, [str(k) for k in record], n=1, cutoff=0.5)
        hint = f" (did you mean {setting}: {close[0]}?)" if close else ""
        raise InputError(
            f"{where}: the record has no '{key}' key (its keys: {keys}); {setting} is '{key}'. Add the key, or set "
            f"{setting} to the key that holds it{hint}."
        )
    value = record[key]
    if isinstance(value, dict | list):
        raise InputError(
            f"{where}: '{key}' is a JSON {'object' if isinstance(value, dict) else 'array'}, not text; {setting} must "
            "name a key holding a string (chat-format message lists are not supported: put the text in one string)."
        )
    if value is None or not str(value).strip():
        emptiness = "null" if value is None else "empty"
        raise InputError(f"{where}: '{key}' is {emptiness}; every record needs a non-empty {setting} value. Fill it in or remove the record.")
    return str(value)


def _file_problems(config: TaskConfig, setting: str = "task.path") -> list[Problem]:
    """The problems of the file or dataset directory at `setting` (`task.path` or `task.eval_path`)."""
    if config.kind == "environment":
        # every field reaches the environment's reset; prompt and answer (when the record has them) are
        # what the SFT warm-up and the logs use
        return [
            Problem(str(record.get(config.prompt_field, "")), str(record.get(config.answer_field, "")), where=where, fields=record)
            for where, record in _load_records(config, setting)
        ]
    return [
        Problem(
            _field_text(where, record, config.prompt_field, "task.prompt_field"),
            _field_text(where, record, config.answer_field, "task.answer_field"),
            where=where,
        )
        for where, record in _load_records(config, setting)
    ]


def _with_prefix(config: TaskConfig, problems: list[Problem]) -> list[Problem]:
    if not config.prompt_prefix:
        return problems
    return [Problem(config.prompt_prefix + p.prompt, p.answer, p.where, p.fields) for p in problems]


def load_task(config: TaskConfig) -> Task:
    """The configured task split into train / held-out, plus the `task.eval_path` set; InputError (file,
    line, fix) for unusable data."""
    if config.kind == "addition" or (config.kind == "environment" and config.path is None):
        problems = addition_problems(config.max_operand)
        source, grow = f"the addition task with task.max_operand={config.max_operand}", "raise task.max_operand"
    else:
        problems = _file_problems(config)
        source, grow = f"task.path {config.path}", "add problems to the file"
    train, held_out = _split(_with_prefix(config, problems), config.eval_size, source=source, grow=grow)
    return Task(
        name=config.kind,
        train=train,
        eval=held_out,
        eval_ood=_with_prefix(config, _file_problems(config, "task.eval_path")) if config.eval_path is not None else [],
        reward_kind=config.reward,
        chat_template=config.chat_template,
        system_prompt=config.system_prompt,
        environment=config.environment,
    )


def check_prompt_lengths(
    task: Task,
    tokenizer: Any,
    encode: Callable[[Any, str], list[int]],
    max_model_len: int,
    max_new_tokens: int,
) -> int:
    """Raise InputError when a prompt plus `max_new_tokens` does not fit the model's context; else return
    the longest prompt's token count. `encode(tokenizer, prompt)` must be the encoding the run uses
    (template, BOS), since that is what takes up the context. Every distinct prompt is encoded once
    (~30 us each for the tiny model's tokenizer)."""
    lengths: dict[str, int] = {}
    longest: tuple[int, str, int, Problem] | None = None  # (tokens, split, index, problem)
    too_long = 0
    for split, problems in (("train", task.train), ("eval", task.eval), ("task.eval_path", task.eval_ood)):
        for index, problem in enumerate(problems):
            if problem.prompt not in lengths:
                lengths[problem.prompt] = len(encode(tokenizer, problem.prompt))
            tokens = lengths[problem.prompt]
            too_long += tokens + max_new_tokens > max_model_len
            if longest is None or tokens > longest[0]:
                longest = (tokens, split, index, problem)
    if longest is None or longest[0] + max_new_tokens <= max_model_len:
        return longest[0] if longest else 0
    tokens, split, index, problem = longest
    where = f", {problem.where}" if problem.where else ""
    head = (
        f"{too_long} prompt(s) do not fit the model's context of {max_model_len} tokens: the longest ({split} prompt "
        f"#{index}{where}: {_preview(problem.prompt)}) is {tokens} tokens with the template, and with "
        f"sampling.max_new_tokens={max_new_tokens} a sample needs {tokens + max_new_tokens} positions."
    )
    limit = max_model_len - max_new_tokens
    if limit <= 0:
        fix = f" sampling.max_new_tokens alone fills the context: set it well below {max_model_len}."
    elif tokens < max_model_len:
        fix = f" Lower sampling.max_new_tokens to {max_model_len - tokens} or less, or remove prompts longer than {limit} tokens from the task."
    else:
        fix = f" The prompt alone does not fit: remove prompts longer than {limit} tokens from the task (or shorten task.prompt_prefix)."
    raise InputError(head + fix)


# -- prompts as the model sees them ----------------------------------------------------------------

def encode_prompt(tokenizer, prompt: str, *, chat_template: str = "auto", system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt as the model sees it; SFT, RL, evaluation and checks all use this.

    `chat_template="auto"` with a tokenizer that has a chat template: the prompt as a user message,
    after a system message when `system_prompt` is set, with the generation prompt. Otherwise
    (`"none"`, or no template): the plain text, `system_prompt + "\\n" + prompt` when there is a
    system prompt, tokenized with the tokenizer's special tokens; the tokenizer's BOS goes in front
    when it defines one and did not add it itself (most plain tokenizers add none, and models
    expect it at position 0). Pass a Task's settings: `chat_template=task.chat_template,
    system_prompt=task.system_prompt`.
    """
    if chat_template not in ("auto", "none"):
        raise ValueError(f"chat_template must be 'auto' or 'none', got {chat_template!r}")
    if chat_template == "auto" and tokenizer.chat_template:
        return _apply_chat_template(tokenizer, prompt, system_prompt)
    text = f"{system_prompt}\n{prompt}" if system_prompt is not None else prompt
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
    return ids


def _apply_chat_template(tokenizer, prompt: str, system_prompt: str | None) -> list[int]:
    from jinja2 import TemplateError

    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))
    except TemplateError as error:  # e.g. templates that refuse a system role
        raise InputError(
            f"the tokenizer's chat template rejected the prompt ({error}); "
            + ("set task.system_prompt to null or " if system_prompt is not None else "")
            + "set task.chat_template to none"
        ) from None


def task_prompt_ids(tokenizer, task: Task, prompt: str) -> list[int]:
    """`encode_prompt` with the task's chat template and system prompt settings."""
    return encode_prompt(tokenizer, prompt, chat_template=task.chat_template, system_prompt=task.system_prompt)
