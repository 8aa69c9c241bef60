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


def test_init_from_grows_the_base_model_and_keys_the_cache_on_the_base_asset(tmp_path):
    """A large-vocabulary asset starts from a small one: the base rows are kept bit for bit, the new rows
    are drawn like a fresh model's (not at zero, not at the used rows' mean), and editing the base
    config builds a new asset rather than reusing one grown from the old base."""
    from safetensors.torch import load_file

    from parityrl.assets import asset_key, prepare_model
    from parityrl.errors import InputError

    small = "model:\n  hidden_size: 32\n  intermediate_size: 64\n  num_layers: 1\n  num_heads: 2\n"
    base = tmp_path / "base.yaml"
    base.write_text(small + "assets:\n  sft:\n    steps: 2\n    batch_size: 4\n    target_success: null\n")
    grown_overrides = [
        f"assets.cache_dir={tmp_path / 'cache'}", f"assets.init_from={base}", "model.hidden_size=32",
        "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2", "model.vocab_size=1024",
        "assets.sft.steps=0",
    ]
    config = load_config(None, grown_overrides)
    grown_dir = prepare_model(config, load_task(config.task))
    base_dir = next(p for p in (tmp_path / "cache").iterdir() if p != grown_dir)
    grown, original = load_file(str(grown_dir / "model.safetensors")), load_file(str(base_dir / "model.safetensors"))
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert grown[name].shape == (1024, 32)
        assert torch.equal(grown[name][:128], original[name])
        assert 0.015 < grown[name][128:].std().item() < 0.025  # initializer_range 0.02
        assert grown[name][128:].mean(0).abs().max().item() < 0.01
    assert torch.equal(grown["model.norm.weight"], original["model.norm.weight"])

    key = asset_key(config)
    base.write_text(base.read_text().replace("steps: 2", "steps: 3"))
    assert asset_key(config) != key
    with pytest.raises(InputError, match="another shape"):
        asset_key(load_config(None, grown_overrides + ["model.hidden_size=64"]))


def test_the_built_tokenizer_keeps_spaces_and_newlines_next_to_a_qwen2_config(tmp_path):
    """transformers 5's AutoTokenizer swaps a Qwen2 directory's generic tokenizer for Qwen2's byte-level
    one, which silently dropped every space and newline of every prompt and answer ("23 24" -> "2324")."""
    from parityrl.policy import load_tokenizer
    from parityrl.tasks import encode_prompt

    config = load_config(None, ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2"])
    build_model(config, build_tokenizer(tmp_path), tmp_path)
    assert '"model_type": "qwen2"' in (tmp_path / "config.json").read_text()  # the setting that triggered the swap
    tokenizer = load_tokenizer(tmp_path)
    text = "count 23 to 25:\n23 24 25"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert tokenizer.decode(encode_prompt(tokenizer, "a b", system_prompt="sys"), skip_special_tokens=True) == "sys\na b"


def test_progress_goes_to_stderr_so_stdout_holds_only_results(capsys):
    """`parityrl check --json > out.json` had the SFT warm-up's final progress line in front of the JSON."""
    with progress_bar() as progress:
        bar = progress.add_task("SFT warm-up", total=2, info="")
        progress.update(bar, completed=2, info="loss 0.1")
    captured = capsys.readouterr()
    assert captured.out == "" and "SFT warm-up" in captured.err


def test_shared_logit_lifts_every_logit_alike_and_leaves_the_policy(tmp_path):
    """`assets.shared_logit` moves where the logits sit (what bf16 rounds them at) and nothing else: the
    log-softmax of the model with it equals the one without, and the logits sit higher by about the value."""
    import json

    from parityrl.assets import asset_key, prepare_model, sft_batch
    from parityrl.policy import load_policy, load_tokenizer, sequence_logits

    small = [f"assets.cache_dir={tmp_path}", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
             "model.num_heads=2", "model.vocab_size=1024", "assets.sft.steps=2", "assets.sft.batch_size=4", "assets.sft.target_success=null"]
    plain_config, shifted_config = load_config(None, small), load_config(None, small + ["assets.shared_logit=20"])
    assert asset_key(plain_config) != asset_key(shifted_config)
    plain_dir, shifted_dir = (prepare_model(c, load_task(c.task)) for c in (plain_config, shifted_config))
    task = load_task(plain_config.task)
    tokenizer = load_tokenizer(plain_dir)
    ids, mask, _ = sft_batch(tokenizer, task.train[:16], tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.no_grad():
        plain, shifted = (sequence_logits(load_policy(d, "float32", True), ids, mask) for d in (plain_dir, shifted_dir))
    torch.testing.assert_close(shifted.log_softmax(-1), plain.log_softmax(-1), rtol=0, atol=2e-4)
    lift = (shifted - plain).mean(-1)  # [problems, positions]: one value per position, the same for every row
    assert ((shifted - plain) - lift[..., None]).abs().max() < 2e-4
    assert 15 < lift[mask.bool()].mean() < 25  # 20 on average over the positions of training problems
    summary = json.loads((shifted_dir / "parityrl_assets.json").read_text())["shared_logit"]
    assert summary["mean"] == 20 and summary["median_top_logit_after"] > summary["median_top_logit_before"] + 10
