from __future__ import annotations

import pytest

from parityrl.config import ConfigError, RunConfig, describe_fields, load_config

pytestmark = pytest.mark.unit


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


def test_one_sided_fp32_head_is_refused_unless_forced():
    with pytest.raises(ConfigError, match="one side only"):
        load_config(None, ["engine.lm_head_fp32=false"])
    config = load_config(None, ["engine.lm_head_fp32=false", "engine.force_one_sided_head=true"])
    assert not config.engine.lm_head_fp32 and config.model.lm_head_fp32


def test_every_field_is_documented():
    undocumented = [key for key, _, doc in describe_fields(RunConfig) if not doc]
    assert undocumented == []


def test_readme_config_reference_is_current():
    from pathlib import Path

    from parityrl.config import reference_markdown

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert reference_markdown() in readme, "README config reference is stale: run python scripts/update_readme.py"
