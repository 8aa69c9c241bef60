from __future__ import annotations

import os
from pathlib import Path

import pytest

from parityrl.assets import prepare_model
from parityrl.config import load_config
from parityrl.tasks import load_task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The built tiny model after a short SFT warm-up (a non-trivial distribution), cached across runs
    under runs/test-assets (PARITYRL_TEST_ASSETS overrides) and shared by every test."""
    cache = os.environ.get("PARITYRL_TEST_ASSETS", str(REPO / "runs" / "test-assets"))
    config = load_config(None, ["assets.sft.steps=300", "assets.sft.target_success=null", f"assets.cache_dir={cache}"])
    return prepare_model(config, load_task(config.task))
