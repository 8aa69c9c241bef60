"""Loading a run configuration: YAML files, `--set` overrides, and errors that say where and how to
fix a bad value (file, line, key path, the closest valid key)."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from parityrl.config.schema import RunConfig
from parityrl.errors import UserError, decode_utf8


class ConfigError(UserError, ValueError):
    """A config that cannot be used, with a message that says where and how to fix it.
    Also a ValueError: that is what it was before the UserError hierarchy, and callers catch it."""


def _section_fields(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the config section reached by `loc` (the path up to the bad key)."""
    cls: Any = model_cls
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return list(cls.model_fields)


# pydantic error type -> comparison it enforces (the bound itself is in the error's ctx)
BOUND_ERRORS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
TYPE_ERRORS = {
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "model_type": "must be a section (keys indented below it), not a single value",
    "model_attributes_type": "must be a section (keys indented below it), not a single value",
    "dict_type": "must be a section (keys indented below it), not a single value",
    "missing": "is required",
}


def _number_text(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _problem_text(item: Any) -> str:
    """What one pydantic error asks for, in config terms: 'must be >= 1', 'must be one of ...'."""
    kind, ctx = item["type"], item.get("ctx") or {}
    if kind in BOUND_ERRORS:
        key, operator = BOUND_ERRORS[kind]
        return f"must be {operator} {_number_text(ctx[key])}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind in TYPE_ERRORS:
        return TYPE_ERRORS[kind]
    # our own validators raise ValueError/AssertionError: pydantic prefixes their text
    return item["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _origin_text(loc: tuple[Any, ...], key_lines: dict[tuple[str, ...], int], overridden: set[tuple[str, ...]]) -> str:
    """' (from --set)' or ' (line N)': where the offending key was written, when we know."""
    keys = tuple(str(part) for part in loc)
    if any(keys[: len(path)] == path for path in overridden):
        return " (from --set)"
    return f" (line {key_lines[keys]})" if keys in key_lines else ""


def format_validation_error(
    error: ValidationError,
    model_cls: type[BaseModel],
    source: str,
    key_lines: dict[tuple[str, ...], int] | None = None,
    overridden: set[tuple[str, ...]] | None = None,
) -> str:
    """A header naming the source, then one line per problem: 'train.steps: must be >= 1 (got -3) (line 4)'."""
    key_lines, overridden = key_lines or {}, overridden or set()
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        loc = tuple(item["loc"])
        path = ".".join(str(p) for p in loc)
        origin = _origin_text(loc, key_lines, overridden)
        if item["type"] == "extra_forbidden":
            candidates = _section_fields(model_cls, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), candidates, n=1, cutoff=0.5)
            hint = f" Did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            valid = ", ".join(candidates)
            lines.append(f"  unknown key '{path}'{origin}.{hint} Valid keys here: {valid}")
            continue
        value = item.get("input")
        # a section-level check (e.g. hidden_size vs num_heads) gets the whole section as input: not worth echoing
        got = "" if isinstance(value, dict | BaseModel) or item["type"] == "missing" else f" (got {value!r})"
        prefix = f"{path}: " if path else ""
        lines.append(f"  {prefix}{_problem_text(item)}{got}{origin}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading a config file

YAML_TOP_LEVEL_NAMES = {
    list: "a list (lines starting with '- ')",
    str: "a single string",
    int: "a single number",
    float: "a single number",
    bool: "a single true/false",
}


def read_config_text(path: Path) -> str:
    """The text of a YAML config file; ConfigError for a missing path, a directory or a binary file."""
    if path.is_dir():
        examples = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
        hint = f", e.g. {examples[0]}" if examples else ""
        raise ConfigError(f"config path {path} is a directory; pass a YAML file{hint}.")
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path} (relative paths start at the current directory, {Path.cwd()}); "
            "pass an existing YAML file, or omit the config argument to use the defaults."
        )
    try:
        content = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}.") from None
    if b"\0" in content:
        raise ConfigError(
            f"config file {path} is a binary file (it contains NUL bytes), not YAML text; "
            "pass a YAML config such as configs/demo.yaml."
        )
    return decode_utf8(
        content,
        lambda byte, line: ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{byte:02x} at line {line} cannot be "
            "decoded): is it a binary file? A config is YAML text saved as UTF-8, such as configs/demo.yaml."
        ),
    )


def _yaml_syntax_message(error: yaml.MarkedYAMLError, text: str, source: str) -> str:
    mark = error.problem_mark or error.context_mark
    problem = error.problem or error.context or "syntax error"
    if mark is None:
        return f"{source}: not valid YAML: {problem}."
    line_no = mark.line + 1
    lines = text.splitlines()
    shown = lines[mark.line].rstrip() if mark.line < len(lines) else "(end of file)"
    context = ""
    if error.context and error.context_mark is not None and error.problem:
        context = f", {error.context} at line {error.context_mark.line + 1}"
    if "'\\t'" in problem:
        fix = "YAML indents with spaces, never tabs: replace the tabs on that line with spaces."
    else:
        fix = "Check that line's indentation and that each key is followed by ': ' (quote values that contain ': ' or '#')."
    return f"{source}:{line_no}:{mark.column + 1}: not valid YAML: {problem}{context}. Line {line_no} reads {shown!r}. {fix}"


def parse_config_text(text: str, source: str) -> dict[str, Any]:
    """The YAML mapping of a config file's text; ConfigError for a syntax error, an empty file, a non-mapping."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        raise ConfigError(_yaml_syntax_message(error, text, source)) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}.") from None
    if loaded is None:
        raise ConfigError(
            f"config file {source} is empty (no settings, only blank lines or comments); omit the config argument "
            "to use the defaults, or write the settings to change, e.g. 'train:' with '  steps: 60' below it."
        )
    if not isinstance(loaded, dict):
        holds = YAML_TOP_LEVEL_NAMES.get(type(loaded), type(loaded).__name__)
        raise ConfigError(
            f"config file {source}: the top level must be a mapping of sections (e.g. 'train:' with '  steps: 60' "
            f"below it), but the file holds {holds}. See configs/demo.yaml for the layout."
        )
    return loaded


def read_config_mapping(path: Path) -> dict[str, Any]:
    """A config file's raw YAML mapping (not validated), with the same errors as `load_config`."""
    return parse_config_text(read_config_text(path), str(path))


def yaml_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of every key of a YAML document, by key path: ('train', 'steps') -> 4."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node | None, prefix: tuple[str, ...]) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                path = (*prefix, str(key_node.value))
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)

    walk(root, ())
    return lines


# --------------------------------------------------------------------------- overrides and loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"--set {dotted}: empty key name; write key.path=value, e.g. --set train.steps=60")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['train.lr=1e-4', ...] into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error)
            raise ConfigError(f"--set {item}: the value is not valid YAML ({problem}); quote it, e.g. --set \"{key}='{raw}'\"") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _leaf_paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Key paths of a nested override dict: {'train': {'lr': 1}} -> {('train', 'lr')}."""
    paths: set[tuple[str, ...]] = set()
    for key, value in tree.items():
        path = (*prefix, str(key))
        paths |= _leaf_paths(value, path) if isinstance(value, dict) and value else {path}
    return paths


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (None = all defaults) and apply `key.path=value` overrides.

    Every problem is a ConfigError whose message names the file, and the key and line where known."""
    data: dict[str, Any] = {}
    text, source = "", "defaults"
    if path is not None:
        path = Path(path)
        text = read_config_text(path)
        data, source = parse_config_text(text, str(path)), str(path)
    override_tree = parse_overrides(overrides) if overrides else {}
    if override_tree:
        data = deep_merge(data, override_tree)
        source += " with --set overrides"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        message = format_validation_error(error, RunConfig, source, yaml_key_lines(text), _leaf_paths(override_tree))
        raise ConfigError(message) from None


def config_hash(payload: Any) -> str:
    """Stable short hash of a JSON-able payload (used to key cached assets)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
