"""Lint corpus: every YAML in tests/lint_corpus/ declares its expected finding codes and exit code in its
first line (`# expect: code-a, code-b ; exit N`; `(none)` for a clean config; parentheses are comments)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from parityrl.config import load_config
from parityrl.parity.lint import Finding, lint_config, lint_file, render_findings

CORPUS = Path(__file__).parent / "lint_corpus"
REPO = Path(__file__).parent.parent
HEADER = re.compile(r"^# expect: (?P<codes>.*?) ; exit (?P<exit>\d)")


def expectation(path: Path) -> tuple[set[str], int]:
    match = HEADER.match(path.read_text().splitlines()[0])
    assert match, f"{path.name}: first line must be '# expect: codes ; exit N'"
    codes = re.sub(r"\(.*?\)", "", match["codes"])
    return {c.strip() for c in codes.split(",") if c.strip()}, int(match["exit"])


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.yaml")), ids=lambda p: p.stem)
def test_corpus(path: Path) -> None:
    expected_codes, expected_exit = expectation(path)
    findings, code = lint_file(path)
    assert {f.code for f in findings} == expected_codes, [f.to_dict() for f in findings]
    assert code == expected_exit
    for finding in findings:
        assert finding.severity in ("error", "warning") and finding.key and finding.problem and finding.fix


def test_corpus_covers_every_pitfall() -> None:
    covered = set().union(*(expectation(p)[0] for p in CORPUS.glob("*.yaml")))
    assert covered >= {
        "dtype-auto", "raw-logprobs", "trainer-sampling-mismatch",
        "async-scheduling-default", "prefix-caching-stale-kv", "prefix-caching-off", "update-abort", "one-sided-fp32-head",
        "bf16-head", "is-correction-unchecked", "unbounded-lag", "config-invalid",
    }


@pytest.mark.parametrize("name", ["demo.yaml", "reference.yaml"])
def test_shipped_configs_are_clean(name: str) -> None:
    assert lint_file(REPO / "configs" / name) == ([], 0)


def test_defaults_are_clean() -> None:
    assert lint_config(load_config(None), model_vocab_size=128) == []


def test_severities() -> None:
    def severity(overrides: list[str], code: str) -> str:
        (finding,) = [f for f in lint_config(load_config(None, overrides)) if f.code == code]
        return finding.severity

    assert severity(["engine.logprobs_mode=raw_logprobs", "sampling.top_k=20"], "raw-logprobs") == "error"
    assert severity(["engine.logprobs_mode=raw_logprobs"], "raw-logprobs") == "warning"
    assert severity(["pipeline.max_lag=null"], "unbounded-lag") == "error"
    assert severity(["pipeline.max_lag=null", "pipeline.mode=sync"], "unbounded-lag") == "warning"


def test_fix_names_the_setting() -> None:
    (finding,) = lint_config(load_config(None, ["engine.logprobs_mode=raw_logprobs", "sampling.temperature=0.7"]))
    assert finding.fix == "set engine.logprobs_mode: processed_logprobs"


def test_dtype_auto_still_lints_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dtype: auto\nengine:\n  update_mode: abort\n")
    findings, code = lint_file(path)
    assert [f.code for f in findings] == ["dtype-auto", "update-abort"] and code == 1


def test_bf16_head_large_vocab_from_model_path(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": 151936}))
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  path: {model_dir}\n  dtype: bfloat16\n  lm_head_fp32: false\nengine:\n  lm_head_fp32: false\n")
    findings, code = lint_file(path)
    assert [(f.code, f.severity) for f in findings] == [("bf16-head", "error")] and code == 1
    # explicit vocabulary wins over the file
    findings, code = lint_file(path, model_vocab_size=100)
    assert [(f.code, f.severity) for f in findings] == [("bf16-head", "warning")] and code == 0


def test_parity_checked_silences_is_correction() -> None:
    config = load_config(None, ["train.is_correction=mis"])
    assert [f.code for f in lint_config(config)] == ["is-correction-unchecked"]
    assert lint_config(config, parity_checked=True) == []


def test_trainer_sampling_mismatch_one_finding_per_key() -> None:
    config = load_config(None, ["train.logprob_top_k=5", "train.logprob_top_p=0.5"])
    keys = sorted(f.key for f in lint_config(config) if f.code == "trainer-sampling-mismatch")
    assert keys == ["train.logprob_top_k", "train.logprob_top_p"]


def test_overrides_and_missing_file(tmp_path: Path) -> None:
    findings, code = lint_file(REPO / "configs" / "demo.yaml", overrides=["engine.update_mode=abort"])
    assert [f.code for f in findings] == ["update-abort"] and code == 0
    findings, code = lint_file(tmp_path / "missing.yaml")
    assert [f.code for f in findings] == ["config-invalid"] and code == 2


def test_render(tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    render_findings([Finding("update-abort", "warning", "engine.update_mode", "p", "set engine.update_mode: keep")], console)
    render_findings([], console)
    text = console.export_text()
    assert "update-abort" in text and "set engine.update_mode: keep" in text and "no parity pitfalls" in text


def test_trainer_sampling_mismatch_covers_min_p_and_penalties() -> None:
    overrides = ["train.logprob_min_p=0.1", "train.logprob_repetition_penalty=1.2", "train.logprob_presence_penalty=0.3",
                 "train.logprob_frequency_penalty=0.3"]
    keys = sorted(f.key for f in lint_config(load_config(None, overrides)) if f.code == "trainer-sampling-mismatch")
    assert keys == ["train.logprob_frequency_penalty", "train.logprob_min_p", "train.logprob_presence_penalty",
                    "train.logprob_repetition_penalty"]
    # an override equal to the engine's value is no mismatch
    same = load_config(None, ["sampling.min_p=0.1", "train.logprob_min_p=0.1", "sampling.presence_penalty=0.5"])
    assert lint_config(same) == []


@pytest.mark.parametrize("transform", ["sampling.min_p=0.05", "sampling.repetition_penalty=1.1", "sampling.presence_penalty=0.2",
                                       "sampling.frequency_penalty=0.2"])
def test_raw_logprobs_is_an_error_with_min_p_or_a_penalty(transform: str) -> None:
    (finding,) = lint_config(load_config(None, ["engine.logprobs_mode=raw_logprobs", transform]))
    assert finding.code == "raw-logprobs" and finding.severity == "error"
    assert transform.removeprefix("sampling.") in finding.problem
