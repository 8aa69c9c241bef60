from __future__ import annotations

from pathlib import Path

import pytest

from parityrl.assets import prepare_model
from parityrl.config import load_config
from parityrl.tasks import load_task


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny built model with a short SFT warm-up (non-trivial distribution), shared by the session."""
    cache = tmp_path_factory.mktemp("assets")
    config = load_config(None, ["assets.sft.steps=200", f"assets.cache_dir={cache}"])
    return prepare_model(config, load_task(config.task))
