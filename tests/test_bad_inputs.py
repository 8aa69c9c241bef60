"""Bad inputs: the real `parityrl` CLI, run as a subprocess on each case of tests/bad_inputs/, must exit
non-zero within seconds with one paragraph naming the file / key / line, and no traceback unless --debug.

The cases fail at config load, task load or the model-directory check, all of which run before lint,
asset building, SFT or an engine start; none of them may import torch or vLLM, so each takes about as
long as starting Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from parityrl.config import TaskConfig, load_config
from parityrl.errors import InputError, UserError
from parityrl.preflight import check_model_dir
from parityrl.tasks import check_prompt_lengths, load_task

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path("tests/bad_inputs")  # relative: the CLI runs in the repository root, like a user would
DATA = CORPUS / "data"
TIME_LIMIT_S = 10.0
KILL_AFTER_S = 20.0
"""A case that gets past the checks would go on to SFT and an engine for minutes: stop it early."""


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]
    """Arguments after `parityrl`."""
    expected: list[str]
    """Substrings the error must contain: the file, key or line, and the fix."""


def train(config: str | None, *overrides: str) -> list[str]:
    args = ["train"] + ([str(CORPUS / config)] if config else [])
    for override in overrides:
        args += ["--set", override]
    return args


def jsonl_task(data_file: str, *overrides: str) -> list[str]:
    return train("jsonl_task.yaml", f"task.path={DATA / data_file}", *overrides)


CASES = [
    # the config file itself
    Case("yaml_syntax", train("yaml_syntax.yaml"), ["yaml_syntax.yaml:4:", "not valid YAML", "'   lr: 0.1'", "indentation"]),
    Case("tab_indent", train("tab_indent.yaml"), ["tab_indent.yaml:3:", "spaces, never tabs"]),
    Case("binary_config", train("binary.yaml"), ["binary.yaml is a binary file", "configs/demo.yaml"]),
    Case("empty_config", train("empty.yaml"), ["empty.yaml is empty", "omit the config argument to use the defaults"]),
    Case("comments_only_config", train("comments_only.yaml"), ["comments_only.yaml is empty", "only blank lines or comments"]),
    Case("top_level_list", train("top_level_list.yaml"), ["top_level_list.yaml", "top level must be a mapping", "a list"]),
    Case("config_is_a_directory", ["train", str(CORPUS)], [f"config path {CORPUS} is a directory", "pass a YAML file"]),
    Case("config_not_found", train("no_such_config.yaml"), ["config file not found", "no_such_config.yaml"]),
    Case("unknown_key", train("unknown_key.yaml"), ["unknown_key.yaml", "unknown key 'train.lrr' (line 3)", "Did you mean 'train.lr'"]),
    Case("section_is_a_number", train("section_scalar.yaml"), ["train: must be a section", "(got 5) (line 2)"]),
    Case("steps_not_a_number", train("steps_not_a_number.yaml"), ["train.steps: must be a whole number (got 'many') (line 3)"]),
    Case("heads_do_not_divide", train("heads_do_not_divide.yaml"), ["hidden_size=250 is not divisible by num_heads=4", "e.g. 248"]),
    # out-of-range numbers, in a file (with the line) and from --set
    Case("sampling_n_zero", train("sampling_n_zero.yaml"), ["sampling_n_zero.yaml", "sampling.n: must be >= 2 (got 0) (line 3)"]),
    Case("train_steps_negative", train("train_steps_negative.yaml"), ["train.steps: must be >= 1 (got -3) (line 3)"]),
    Case("max_lag_negative", train("max_lag_negative.yaml"), ["pipeline.max_lag: must be >= 0 (got -2) (line 3)"]),
    Case("max_new_tokens_zero", train("max_new_tokens_zero.yaml"), ["sampling.max_new_tokens: must be >= 1 (got 0) (line 3)"]),
    # found by a run with engine.block_size=16: vLLM refused it in its worker, after 4 engine starts
    Case("block_size_16_on_cpu", train("block_size_16.yaml"), ["engine.block_size=16", "multiple of 32", "set engine.block_size to 32"]),
    Case("eval_every_zero", train("eval_every_zero.yaml"), ["train.eval_every: must be >= 1 (got 0) (line 3)"]),
    Case("lr_zero", train("lr_zero.yaml"), ["train.lr: must be > 0 (got 0) (line 3)"]),
    Case("top_p_above_one", train("top_p_above_one.yaml"), ["sampling.top_p: must be <= 1 (got 1.5) (line 3)"]),
    Case("temperature_zero", train("temperature_zero.yaml"), ["sampling.temperature: must be > 0 (got 0) (line 3)"]),
    Case(
        "eval_every_zero_from_set",
        train(None, "train.eval_every=0"),
        ["defaults with --set overrides", "train.eval_every: must be >= 1 (got 0) (from --set)"],
    ),
    Case("top_k_zero_from_set", train(None, "sampling.top_k=0"), ["sampling.top_k: must be -1 (top-k off) or >= 1 (got 0) (from --set)"]),
    Case("set_value_not_yaml", train(None, "task.prompt_prefix=[unclosed"), ["--set task.prompt_prefix=[unclosed", "not valid YAML", "quote it"]),
    # task data
    Case(
        "missing_task_file",
        train("missing_task_file.yaml"),
        ["task.path tests/bad_inputs/data/no_such_file.jsonl does not exist", "set task.path to a .jsonl file"],
    ),
    Case("task_path_is_a_directory", jsonl_task(""), ["is a directory, but task.kind=jsonl reads one .jsonl file", "task.kind: hf_dataset"]),
    Case("hf_dataset_path_is_a_file", jsonl_task("ok.jsonl", "task.kind=hf_dataset"), ["ok.jsonl is a file, but task.kind=hf_dataset", "set task.kind: jsonl"]),
    Case("jsonl_path_not_set", train(None, "task.kind=jsonl"), ["task.kind=jsonl needs task.path"]),
    Case("non_object_line", jsonl_task("non_object_line.jsonl"), ["non_object_line.jsonl:2: line 2 is an array", "not a JSON object"]),
    Case("line_lacks_answer", jsonl_task("missing_answer.jsonl"), ["missing_answer.jsonl:3:", "no 'answer' key", "'solution'", "task.answer_field"]),
    Case("line_lacks_prompt_field", jsonl_task("ok.jsonl", "task.prompt_field=question"), ["ok.jsonl:1:", "no 'question' key", "task.prompt_field"]),
    Case("empty_prompt", jsonl_task("empty_prompt.jsonl"), ["empty_prompt.jsonl:2:", "'prompt' is empty", "task.prompt_field"]),
    Case("empty_jsonl", jsonl_task("empty.jsonl"), ["empty.jsonl holds no records", "one JSON object per line"]),
    Case("truncated_jsonl", jsonl_task("truncated.jsonl"), ["truncated.jsonl:3: line 3 is truncated or not valid JSON", "cut off"]),
    Case("invalid_json_line", jsonl_task("not_json.jsonl"), ["not_json.jsonl:2: line 2 is truncated or not valid JSON", "column"]),
    Case("json_document_not_lines", jsonl_task("json_document.jsonl"), ["json_document.jsonl:1:", "one complete object per line"]),
    Case("gzip_jsonl", jsonl_task("compressed.jsonl"), ["compressed.jsonl is gzip-compressed", "decompress it"]),
    Case("binary_jsonl", jsonl_task("binary.jsonl"), ["binary.jsonl is a binary file (NUL byte at line 2)"]),
    Case("latin1_jsonl", jsonl_task("latin1.jsonl"), ["latin1.jsonl:2: byte 0xe9 is not UTF-8", "re-save it as UTF-8"]),
    Case(
        "dataset_smaller_than_eval_size",
        jsonl_task("ok.jsonl", "task.eval_size=5"),
        ["ok.jsonl has 5 prompts", "task.eval_size below 5", "task.eval_size: 1"],
    ),
    Case(
        "addition_smaller_than_eval_size",
        train(None, "task.max_operand=10"),
        ["task.max_operand=10 has 100 prompts", "task.eval_size: 20", "raise task.max_operand"],
    ),
    # model directory
    Case("missing_model_dir", train("missing_model_dir.yaml"), ["model.path tests/bad_inputs/no_such_model does not exist", "remove model.path"]),
    Case("model_path_is_a_file", train(None, f"model.path={DATA / 'ok.jsonl'}"), ["ok.jsonl is a file, not a directory"]),
    Case("model_dir_without_config", train(None, f"model.path={DATA}"), ["has no config.json", "save_pretrained"]),
    # the other commands that load a config
    Case("check_bad_config", ["check", str(CORPUS / "sampling_n_zero.yaml")], ["sampling.n: must be >= 2 (got 0) (line 3)"]),
    Case("check_bad_task", ["check", *jsonl_task("truncated.jsonl")[1:]], ["truncated.jsonl:3: line 3 is truncated"]),
    Case("lint_yaml_syntax", ["lint", str(CORPUS / "yaml_syntax.yaml")], ["yaml_syntax.yaml:4:", "not valid YAML"]),
    Case("lint_binary", ["lint", str(CORPUS / "binary.yaml")], ["binary.yaml is a binary file"]),
]


def run_cli(args: list[str], cwd: Path = REPO) -> tuple[int, str, float]:
    """Run `python -m parityrl.cli ARGS`; (exit code, stdout + stderr, seconds)."""
    env = {key: value for key, value in os.environ.items() if key != "PARITYRL_DEBUG"}
    start = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "parityrl.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=KILL_AFTER_S
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"parityrl {' '.join(args)} was still running after {KILL_AFTER_S:.0f} s: the bad input was not caught ({expired.stdout!r})")
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def assert_clear_failure(code: int, output: str, seconds: float, expected: list[str]) -> None:
    assert code != 0, output
    assert seconds < TIME_LIMIT_S, f"took {seconds:.1f} s: something slow (torch, SFT, an engine) ran first"
    assert "Traceback" not in output, output
    for text in expected:
        assert text in output, f"{text!r} not in:\n{output}"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_is_one_paragraph(case: Case, tmp_path: Path) -> None:
    code, output, seconds = run_cli([*case.args, *(["--run-dir", str(tmp_path / "run")] if case.args[0] == "train" else [])])
    assert_clear_failure(code, output, seconds, case.expected)
    assert code == 2, output  # bad input, not a crash (exit 1)
    assert not (tmp_path / "run").exists(), "the run directory was created before the input was checked"


def corpus_files() -> set[str]:
    return {str(path.relative_to(REPO)) for path in (REPO / CORPUS).rglob("*") if path.is_file()}


def test_every_corpus_file_has_a_case() -> None:
    used = {arg.split("=", 1)[-1] for case in CASES for arg in case.args}
    unused = {name for name in corpus_files() if name not in used} - {str(CORPUS / "jsonl_task.yaml")}
    assert not unused, f"corpus files no case runs: {sorted(unused)}"


def write_model_dir(path: Path, *, weights: bool, tokenizer: bool, context: int = 256) -> Path:
    """A directory with the files `check_model_dir` looks for (contents are placeholders: nothing loads them)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": context}))
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 2048)
    if tokenizer:
        (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.mark.parametrize(
    ("weights", "tokenizer", "expected"),
    [
        (False, True, ["has config.json but no weights", "*.safetensors or pytorch_model*.bin"]),
        (True, False, ["has no tokenizer files", "tokenizer.save_pretrained"]),
    ],
    ids=["no_weights", "no_tokenizer"],
)
def test_incomplete_model_dir(tmp_path: Path, weights: bool, tokenizer: bool, expected: list[str]) -> None:
    model_dir = write_model_dir(tmp_path / "model", weights=weights, tokenizer=tokenizer)
    code, output, seconds = run_cli(["train", "--set", f"model.path={model_dir}", "--run-dir", str(tmp_path / "run")])
    assert_clear_failure(code, output, seconds, [f"model.path {model_dir}", *expected])


def test_max_new_tokens_beyond_the_model_context(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "model", weights=True, tokenizer=True, context=64)
    code, output, seconds = run_cli(["train", "--set", f"model.path={model_dir}", "--set", "sampling.max_new_tokens=64", "--run-dir", str(tmp_path / "run")])
    assert_clear_failure(code, output, seconds, ["sampling.max_new_tokens=64", "max_position_embeddings=64"])


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    code, output, _ = run_cli(["--debug", "train", str(CORPUS / "train_steps_negative.yaml"), "--run-dir", str(tmp_path / "run")])
    assert code != 0
    assert "Traceback" in output and "ConfigError" in output and "train.steps: must be >= 1" in output


def test_unexpected_error_is_one_paragraph_with_a_debug_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import parityrl.preflight
    from parityrl.cli import app

    def crash(config):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(parityrl.preflight, "preflight", crash)
    result = CliRunner().invoke(app, ["train", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "parityrl train failed: RuntimeError: disk on fire. Re-run with --debug" in result.output
    assert "Traceback" not in result.output
    debug = CliRunner().invoke(app, ["--debug", "train", "--run-dir", str(tmp_path / "run")])
    assert isinstance(debug.exception, RuntimeError)  # propagated, not reported


@pytest.mark.parametrize(
    ("args", "expected_code", "expected"),
    [
        (["lint", "tests/lint_corpus/raw_logprobs.yaml"], 1, "1 error(s)"),
        (["lint", "configs/demo.yaml"], 0, "no parity pitfalls found"),
        (["plot", "tests/bad_inputs"], 2, "no metrics.jsonl in tests/bad_inputs"),
    ],
    ids=["lint_errors", "lint_clean", "plot_not_a_run"],
)
def test_commands_keep_their_own_exit_codes(args: list[str], expected_code: int, expected: str) -> None:
    """A command's own typer.Exit is not an unexpected error: no 'failed' report, its exit code kept."""
    code, output, _ = run_cli(args)
    assert code == expected_code and expected in output and "failed" not in output, output


# --------------------------------------------------------------------------- in-process checks


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("engine.gpu_memory_utilization=0", "engine.gpu_memory_utilization: must be > 0"),
        ("engine.gpu_memory_utilization=1.2", "engine.gpu_memory_utilization: must be <= 1"),
        ("engine.kv_cache_space_gib=0", "engine.kv_cache_space_gib: must be > 0"),
        ("engine.omp_threads=0", "engine.omp_threads: must be >= 1"),
        ("engine.max_num_seqs=0", "engine.max_num_seqs: must be >= 1"),
        ("engine.block_size=0", "engine.block_size: must be >= 1"),
        ("train.micro_batch_size=0", "train.micro_batch_size: must be >= 1"),
        ("train.prompts_per_step=0", "train.prompts_per_step: must be >= 1"),
        ("train.threads=0", "train.threads: must be >= 1 or auto"),
        ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0"),
        ("train.clip_low=0", "train.clip_low: must be > 0"),
        ("train.clip_high=-0.2", "train.clip_high: must be > 0"),
        ("train.is_cap=1", "train.is_cap: must be > 1"),
        ("train.checkpoint_every=-1", "train.checkpoint_every: must be >= 0"),
        ("train.logprob_temperature=0", "train.logprob_temperature: must be > 0"),
        ("train.logprob_top_k=0", "train.logprob_top_k: must be -1 (top-k off) or >= 1"),
        ("train.logprob_top_p=0", "train.logprob_top_p: must be > 0"),
        ("sampling.top_k=-2", "sampling.top_k: must be >= -1"),
        ("task.eval_size=0", "task.eval_size: must be >= 1"),
        ("task.max_operand=1", "task.max_operand: must be >= 2"),
        ("assets.sft.steps=-1", "assets.sft.steps: must be >= 0"),
        ("assets.sft.batch_size=0", "assets.sft.batch_size: must be >= 1"),
        ("assets.sft.lr=0", "assets.sft.lr: must be > 0"),
        ("assets.sft.warmup_steps=0", "assets.sft.warmup_steps: must be >= 1"),
        ("assets.sft.target_success=1.5", "assets.sft.target_success: must be <= 1"),
        ("model.num_layers=0", "model.num_layers: must be >= 1"),
        ("model.intermediate_size=0", "model.intermediate_size: must be >= 1"),
        ("pipeline.parity_probe_prompts=-1", "pipeline.parity_probe_prompts: must be >= 0"),
        ("pipeline.max_inflight_groups=0", "pipeline.max_inflight_groups: must be >= 1"),
    ],
)
def test_out_of_range_value_names_key_and_bound(override: str, expected: str) -> None:
    with pytest.raises(UserError) as error:
        load_config(None, [override])
    assert f"{expected} (got {override.split('=')[1]})" in str(error.value)


@pytest.mark.parametrize(
    "override",
    [
        "sampling.n=2", "pipeline.max_lag=0", "pipeline.max_lag=null", "sampling.top_k=1", "sampling.top_k=-1",
        "sampling.top_p=1", "train.checkpoint_every=0", "assets.sft.steps=0", "assets.sft.target_success=0",
        "assets.sft.target_success=1", "assets.sft.target_success=null", "train.grad_clip=-1", "train.clip_low=null",
        "pipeline.parity_probe_prompts=0", "pipeline.max_inflight_groups=1", "engine.gpu_memory_utilization=1",
        "task.max_operand=2",
    ],
)
def test_boundary_values_are_accepted(override: str) -> None:
    """The edge of each range is allowed and lands in the config as written (not clamped or defaulted)."""
    key, raw = override.split("=", 1)
    value = load_config(None, [override]).model_dump()
    for part in key.split("."):
        value = value[part]
    assert value == (None if raw == "null" else type(value)(raw)), (override, value)


def test_built_model_sizes_ignored_with_model_path() -> None:
    """hidden_size must divide by num_heads only for the built tiny model; a model.path brings its own sizes."""
    assert load_config(None, ["model.path=some/dir", "model.hidden_size=250"]).model.hidden_size == 250


def test_every_problem_is_listed_once_per_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: -3\n  eval_every: 0\nsampling:\n  n: 1\n")
    with pytest.raises(UserError) as error:
        load_config(path, ["train.lr=0"])
    lines = str(error.value).splitlines()
    assert lines[0] == f"invalid config ({path} with --set overrides):"
    assert sorted(lines[1:]) == sorted([
        "  sampling.n: must be >= 2 (got 1) (line 5)",
        "  train.steps: must be >= 1 (got -3) (line 2)",
        "  train.lr: must be > 0 (got 0) (from --set)",
        "  train.eval_every: must be >= 1 (got 0) (line 3)",
    ])


def test_task_errors_are_input_errors_and_value_errors() -> None:
    with pytest.raises(InputError) as error:
        load_task(TaskConfig(kind="jsonl", path=str(REPO / DATA / "non_object_line.jsonl")))
    assert isinstance(error.value, ValueError) and error.value.exit_code == 2


def test_addition_task_is_unchanged() -> None:
    task = load_task(TaskConfig())
    assert len(task.train) == 100 * 100 - 256 and len(task.eval) == 256
    assert all(problem.where == "" for problem in task.eval)
    assert task.eval == load_task(TaskConfig()).eval  # the fixed split seed: every run holds out the same prompts


def test_jsonl_problems_remember_their_line() -> None:
    path = REPO / DATA / "ok.jsonl"
    task = load_task(TaskConfig(kind="jsonl", path=str(path), eval_size=2))
    by_prompt = {problem.prompt: problem.where for problem in task.train + task.eval}
    assert by_prompt["1+4="] == f"{path}:4"


def test_prompt_length_check_names_the_longest_prompt() -> None:
    task = load_task(TaskConfig(kind="jsonl", path=str(REPO / DATA / "ok.jsonl"), eval_size=2, prompt_prefix="Add: "))

    def encode(tokenizer, prompt: str) -> list[int]:
        return [0] + [ord(c) for c in prompt]  # BOS + one token per character, like the tiny model's tokenizer

    assert check_prompt_lengths(task, None, encode, max_model_len=32, max_new_tokens=8) == 10
    with pytest.raises(InputError) as error:
        check_prompt_lengths(task, None, encode, max_model_len=16, max_new_tokens=8)
    message = str(error.value)
    assert "5 prompt(s) do not fit the model's context of 16 tokens" in message
    assert "is 10 tokens" in message and "needs 18 positions" in message and "'Add: 1+" in message
    assert "ok.jsonl:" in message and "Lower sampling.max_new_tokens to 6 or less" in message
    with pytest.raises(InputError, match="The prompt alone does not fit"):
        check_prompt_lengths(task, None, encode, max_model_len=8, max_new_tokens=4)


def test_lfs_pointer_instead_of_weights(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "model", weights=False, tokenizer=True)
    (model_dir / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 10\n")
    with pytest.raises(InputError, match="Git LFS pointer"):
        check_model_dir(model_dir)


def test_model_dir_one_level_too_high(tmp_path: Path) -> None:
    write_model_dir(tmp_path / "models" / "qwen", weights=True, tokenizer=True)
    with pytest.raises(InputError) as error:
        check_model_dir(tmp_path / "models")
    assert f"{tmp_path / 'models' / 'qwen'} has one: set model.path to that directory" in str(error.value)
