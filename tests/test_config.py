from __future__ import annotations

import pytest

from parityrl.config import ConfigError, RunConfig, describe_fields, load_config


def test_misspelled_key_names_path_and_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "train.lrr" in message and "Did you mean 'train.lr'" in message and str(path) in message


def test_override_typo_and_bad_value_are_reported():
    with pytest.raises(ConfigError, match="Did you mean 'sampling.temperature'"):
        load_config(None, ["sampling.temprature=0.7"])
    with pytest.raises(ConfigError, match="sampling.top_p"):
        load_config(None, ["sampling.top_p=1.5"])


def test_overrides_parse_yaml_scalars():
    config = load_config(None, ["train.lr=3e-5", "engine.kind=reference", "model.path=null"])
    assert config.train.lr == 3e-5 and config.engine.kind == "reference" and config.model.path is None


def test_prefix_caching_on_and_off_mean_the_words_although_yaml_reads_them_as_booleans(tmp_path):
    # `check --attribute`'s fix-2 row sets engine.prefix_caching=on: it failed validation as True
    assert load_config(None, ["engine.prefix_caching=on"]).engine.prefix_caching == "on"
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  prefix_caching: off\n")
    assert load_config(path, []).engine.prefix_caching == "off"


def test_one_sided_fp32_head_is_refused_unless_forced():
    with pytest.raises(ConfigError, match="one side only"):
        load_config(None, ["engine.lm_head_fp32=false"])
    config = load_config(None, ["engine.lm_head_fp32=false", "engine.force_one_sided_head=true"])
    assert not config.engine.lm_head_fp32 and config.model.lm_head_fp32


def test_a_head_the_engine_cannot_run_in_fp32_is_refused_when_it_starts():
    """A release without fp32 heads (V0 0.8.5, 0.18.1) reports the model dtype in force: `train` stops there
    rather than train against a one-sided head."""
    from parityrl.errors import UserError
    from parityrl.pipeline import refuse_unmatched_head

    bf16 = load_config(None, ["model.dtype=bfloat16"])
    with pytest.raises(UserError, match=r"runs the lm_head in bfloat16 \(0.8.5 cannot.*engine.lm_head_fp32=false and model.lm_head_fp32=false"):
        refuse_unmatched_head(bf16, {"head_dtype": "bfloat16", "vllm_version": "0.8.5"})
    refuse_unmatched_head(bf16, {"head_dtype": "float32"})  # as asked
    refuse_unmatched_head(bf16, {"engine": "reference"})  # the torch engine reports no head_dtype: its head is the trainer's code
    both_bf16 = load_config(None, ["model.dtype=bfloat16", "model.lm_head_fp32=false", "engine.lm_head_fp32=false"])
    refuse_unmatched_head(both_bf16, {"head_dtype": "bfloat16"})
    forced = load_config(None, ["model.dtype=bfloat16", "engine.force_one_sided_head=true"])
    refuse_unmatched_head(forced, {"head_dtype": "bfloat16"})  # an ablation asks for it
    refuse_unmatched_head(load_config(None, []), {"head_dtype": "float32"})  # fp32 model: fp32 either way


def test_every_field_is_documented():
    undocumented = [key for key, _, doc in describe_fields(RunConfig) if not doc]
    assert undocumented == []


def test_readme_config_reference_is_current():
    from pathlib import Path

    from parityrl.config import reference_markdown

    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert reference_markdown() in page, "docs/configuration.md is stale: run python scripts/update_references.py"


def test_trainer_sampling_carries_min_p_and_penalties_and_their_overrides():
    config = load_config(
        None,
        ["sampling.min_p=0.05", "sampling.repetition_penalty=1.3", "sampling.presence_penalty=0.4", "sampling.frequency_penalty=0.2"],
    )
    trainer = config.trainer_sampling()
    assert (trainer.min_p, trainer.repetition_penalty, trainer.presence_penalty, trainer.frequency_penalty) == (0.05, 1.3, 0.4, 0.2)
    # an override replaces the engine's value, even with the "off" value (0 is not None)
    config = load_config(None, ["sampling.min_p=0.05", "train.logprob_min_p=0", "train.logprob_frequency_penalty=-0.5"])
    assert config.trainer_sampling().min_p == 0.0 and config.trainer_sampling().frequency_penalty == -0.5
    assert config.sampling.min_p == 0.05 and config.sampling.frequency_penalty == 0.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.min_p=1.5", "sampling.min_p: must be <= 1"),
        ("sampling.min_p=-0.1", "sampling.min_p: must be >= 0"),
        ("sampling.repetition_penalty=0", "sampling.repetition_penalty: must be > 0"),
        ("sampling.repetition_penalty=.inf", "sampling.repetition_penalty"),
        ("sampling.presence_penalty=2.5", "sampling.presence_penalty: must be <= 2"),
        ("sampling.frequency_penalty=-3", "sampling.frequency_penalty: must be >= -2"),
        ("train.logprob_repetition_penalty=-1", "train.logprob_repetition_penalty: must be > 0"),
    ],
)
def test_sampling_transform_bounds_match_vllm(override, message):
    # vLLM's SamplingParams._verify_args refuses the same values when the request is made
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
