"""`parityrl ablate` reads its runs from configs/ablation.yaml: the matrix it builds and the errors it gives."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from parityrl.config import ConfigError, load_config
from parityrl.parity.ablate import ABLATION_SPEC, ablation_matrix, check_runs, interpreter_for, load_ablation_spec

MINIMAL = """\
reference: {engine.kind: reference}
naive: {engine.kind: vllm, engine.logprobs_mode: raw_logprobs}
fixes:
  fix1-only: {engine.logprobs_mode: processed_logprobs}
fixed: {engine.kind: vllm}
every_run:
presets:
  tiny: {train.steps: 2, task.prompt_prefix: "Sum: "}
"""


def test_shipped_spec_is_found_from_the_package_and_builds_the_matrix():
    assert ABLATION_SPEC.is_file() and ABLATION_SPEC.parent.name == "configs"
    spec = load_ablation_spec()
    assert list(spec.configurations) == [
        "reference", "naive-v1", "fix1-only", "fix2-only", "fix3-only", "fix4-only", "fixed-v1",
        "fixed-v1-no1", "fixed-v1-no2", "fixed-v1-no3", "fixed-v1-no4", "reference-v0", "naive-v1-0.18.1",
    ]
    assert set(spec.presets) >= {"demo", "smoke", "showcase", "longgen"}
    assert spec.on_request == {"reference-v0", "naive-v1-0.18.1"}  # run only when named: other virtualenvs
    runs = ablation_matrix(spec, "demo", seeds=2)
    assert len(runs) == 2 * 11 and {r.seed for r in runs} == {0, 1}
    check_runs(spec, None, runs)  # every configuration loads as a valid RunConfig
    check_runs(spec, ABLATION_SPEC.parent / "showcase.yaml", ablation_matrix(spec, "showcase", seeds=1))
    check_runs(spec, ABLATION_SPEC.parent / "longgen.yaml", ablation_matrix(spec, "longgen", seeds=1))


def test_each_configuration_switches_what_it_says():
    spec = load_ablation_spec()
    configs = {run.name: load_config(None, run.overrides) for run in ablation_matrix(spec, "demo", seeds=1)}
    naive, fixed = configs["naive-v1"].engine, configs["fixed-v1"].engine
    assert configs["reference"].engine.kind == "reference"
    assert (naive.logprobs_mode, naive.prefix_caching, naive.update_mode, naive.lm_head_fp32) == ("raw_logprobs", "on", "abort", False)
    assert (fixed.logprobs_mode, fixed.prefix_caching, fixed.update_mode, fixed.lm_head_fp32) == ("processed_logprobs", "versioned", "keep", True)
    assert configs["fix1-only"].engine.logprobs_mode == "processed_logprobs" and configs["fix1-only"].engine.update_mode == "abort"
    assert configs["fix3-only"].engine.update_mode == "keep" and configs["fix3-only"].engine.logprobs_mode == "raw_logprobs"
    assert configs["fix4-only"].model.lm_head_fp32 and configs["fix4-only"].engine.lm_head_fp32
    # leave one out: fixed-v1 with exactly that fix at its naive value
    for n, (field, value) in enumerate(
        [("logprobs_mode", "raw_logprobs"), ("prefix_caching", "on"), ("update_mode", "abort"), ("lm_head_fp32", False)], start=1
    ):
        off = configs[f"fixed-v1-no{n}"].engine
        assert getattr(off, field) == value
        others = {"logprobs_mode": "processed_logprobs", "prefix_caching": "versioned", "update_mode": "keep", "lm_head_fp32": True}
        assert all(getattr(off, name) == kept for name, kept in others.items() if name != field)
    demo = configs["fixed-v1"]
    assert (demo.model.dtype, demo.sampling.temperature, demo.task.prompt_prefix, demo.train.objective) == ("bfloat16", 0.7, "Add two numbers: ", "grpo")


def test_own_spec_order_of_settings_and_only(tmp_path: Path):
    path = tmp_path / "ablation.yaml"
    path.write_text(MINIMAL)
    spec = load_ablation_spec(path)
    runs = ablation_matrix(spec, "tiny", seeds=1, only=["fix1-only"])
    assert [r.name for r in runs] == ["fix1-only"]
    # preset, then naive, then the fix (the later logprobs_mode wins), then the seed
    assert runs[0].overrides == [
        "train.steps=2", 'task.prompt_prefix="Sum: "', "engine.kind=vllm", "engine.logprobs_mode=raw_logprobs",
        "engine.logprobs_mode=processed_logprobs", "seed=0",
    ]
    config = load_config(None, runs[0].overrides)
    assert config.engine.logprobs_mode == "processed_logprobs" and config.task.prompt_prefix == "Sum: "
    with pytest.raises(ConfigError, match="unknown preset 'demo'.*defines tiny"):
        ablation_matrix(spec, "demo", seeds=1)
    with pytest.raises(ConfigError, match="unknown configuration.*fix9-only"):
        ablation_matrix(spec, "tiny", seeds=1, only=["fix9-only"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL.replace("fixed:", "fixd:"), r"missing: fixed; unknown: fixd"),
        (MINIMAL.replace("{engine.kind: vllm}", "[engine.kind=vllm]"), r"fixed: expected a mapping"),
        (MINIMAL.replace("fix1-only: {engine.logprobs_mode: processed_logprobs}", "naive-v1: {engine.kind: vllm}"), r"naive-v1 is the name of another"),
        (MINIMAL.replace("train.steps: 2", "train: {steps: 2}"), r"presets.tiny: 'train' must be a dotted config key"),
        (MINIMAL.replace("reference: {", "reference: {{"), r"not valid YAML"),
    ],
)
def test_malformed_spec_is_reported_with_file_and_section(tmp_path: Path, text: str, message: str):
    path = tmp_path / "ablation.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_ablation_spec(path)
    assert str(path) in str(error.value)


def test_missing_spec_and_bad_setting_are_clear_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="ablation definitions not found.*--spec FILE"):
        load_ablation_spec(tmp_path / "nope.yaml")
    path = tmp_path / "ablation.yaml"
    path.write_text(MINIMAL.replace("train.steps: 2", "train.stepz: 2"))
    spec = load_ablation_spec(path)
    with pytest.raises(ConfigError, match=r"(?s)configuration reference: .*train\.stepz.*Did you mean .train\.steps."):
        check_runs(spec, None, ablation_matrix(spec, "tiny", seeds=1))


def test_release_configurations_run_only_when_named_in_their_release_virtualenv(tmp_path: Path):
    path = tmp_path / "ablation.yaml"
    path.write_text(MINIMAL + "releases:\n  naive-v0:\n    base: naive-v1\n    engine.vllm_release: \"0.0.1\"\n    engine.update_mode: keep\n")
    spec = load_ablation_spec(path)
    assert "naive-v0" not in [r.name for r in ablation_matrix(spec, "tiny", seeds=1)]
    [run] = ablation_matrix(spec, "tiny", seeds=1, only=["naive-v0"])
    config = load_config(None, run.overrides)  # the base's settings, then its own
    assert (config.engine.logprobs_mode, config.engine.update_mode, config.engine.vllm_release) == ("raw_logprobs", "keep", "0.0.1")
    with pytest.raises(ConfigError, match=r"no .venv-vllm-0.0.1 beside .*setup.sh --vllm 0.0.1"):
        interpreter_for(run)
    [plain] = ablation_matrix(spec, "tiny", seeds=1, only=["naive-v1"])
    assert interpreter_for(plain) == Path(sys.executable)
    for bad, message in [("base: nope", r"base:. must name one of"), ("base: fixed-v1", r"set .engine.vllm_release")]:
        path.write_text(MINIMAL + f"releases:\n  x:\n    {bad}\n    engine.kind: vllm\n")
        with pytest.raises(ConfigError, match=message):
            load_ablation_spec(path)
