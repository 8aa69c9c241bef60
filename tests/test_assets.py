"""Offline assets: the SFT warm-up must give the same model on any machine and under any load."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from parityrl.assets import build_model, build_tokenizer, sft_warmup
from parityrl.config import load_config
from parityrl.progress import progress_bar
from parityrl.tasks import load_task

pytestmark = pytest.mark.unit


def _sft_weights(tmp_path, name: str, caller_threads: int) -> dict[str, torch.Tensor]:
    config = load_config(None, ["assets.sft.steps=6", "assets.sft.batch_size=16", "assets.sft.target_success=null"])
    out = tmp_path / name
    out.mkdir()
    build_model(config, build_tokenizer(out), out)
    before = torch.get_num_threads()
    torch.set_num_threads(caller_threads)
    try:
        sft_warmup(config, load_task(config.task), out)
        assert torch.get_num_threads() == caller_threads  # the caller's thread pool is restored
    finally:
        torch.set_num_threads(before)
    return load_file(str(out / "model.safetensors"))


def test_sft_is_bit_identical_whatever_the_callers_thread_count(tmp_path):
    """Thread count changes float reduction order; a few SFT steps already show it if SFT used it."""
    one, two = _sft_weights(tmp_path, "one", 1), _sft_weights(tmp_path, "two", 2)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name


def test_progress_prints_plain_lines_when_not_a_terminal():
    output = io.StringIO()
    progress = progress_bar(console=Console(file=output, force_terminal=False))
    progress.every_s = 0.0
    with progress:
        bar = progress.add_task("SFT warm-up", total=4, info="")
        for step in range(4):
            progress.update(bar, completed=step + 1, info=f"loss {step}")
    lines = [line for line in output.getvalue().splitlines() if "SFT warm-up 3/4 loss 2" in line]
    assert len(lines) == 1


def test_asset_key_follows_the_task_data_not_only_its_path(tmp_path):
    from parityrl.assets import asset_key
    from parityrl.config import load_config

    data = tmp_path / "task.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    config = load_config(None, ["task.kind=jsonl", f"task.path={data}"])
    before = asset_key(config)
    data.write_text('{"prompt": "1+1=", "answer": "3"}\n')  # same path, edited data: the warm-up is stale
    assert asset_key(config) != before
    assert asset_key(load_config(None, [])) == asset_key(load_config(None, []))  # the embedded task: stable
