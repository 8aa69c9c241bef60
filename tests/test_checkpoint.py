"""Checkpoints that a crash, a full disk or a damaged copy cannot turn into a lost or corrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from parityrl.errors import UserError
from parityrl.train.checkpoint import MANIFEST, RunState, checkpoint_dirs, latest_checkpoint, load_run_state, save_checkpoint


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    return LlamaForCausalLM(config)


def save(run_dir: Path, model, step: int) -> Path:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return save_checkpoint(run_dir, model, optimizer, None, RunState(step=step, version=step, sampler_state=None))


def test_resume_skips_a_truncated_or_incomplete_checkpoint_and_names_it(tmp_path):
    model = tiny_llama()
    save(tmp_path, model, 1)
    newest = save(tmp_path, model, 2)
    assert json.loads((newest / MANIFEST).read_text())["model.safetensors"] == (newest / "model.safetensors").stat().st_size
    assert latest_checkpoint(tmp_path) == newest

    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    reports: list[str] = []
    chosen = latest_checkpoint(tmp_path, report=reports.append)
    assert chosen is not None and chosen.name == "step_000001"
    assert load_run_state(chosen).step == 1
    assert len(reports) == 1 and "step_000002" in reports[0] and "model.safetensors" in reports[0] and "truncated" in reports[0]

    (newest / "config.json").unlink()  # a missing file is named too
    latest_checkpoint(tmp_path, report=reports.append)
    assert "config.json is missing" in reports[-1]


def test_resume_with_every_checkpoint_damaged_says_so_instead_of_starting_over(tmp_path):
    model = tiny_llama()
    for step in (1, 2):
        weights = save(tmp_path, model, step) / "model.safetensors"
        weights.write_bytes(b"\0" * 16)
    with pytest.raises(UserError) as raised:
        latest_checkpoint(tmp_path)
    message = raised.value.message
    assert "step_000001" in message and "step_000002" in message and "--overwrite" in message


# Run in a child: RLIMIT_FSIZE makes any write past 100 kB fail (EFBIG), as a full disk would, without
# a mount. The model file (~1 MB) fails; the first checkpoint is written before the limit is set.
_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_checkpoint import save, tiny_llama
from parityrl.errors import UserError
run_dir = Path({run_dir!r})
model = tiny_llama()
save(run_dir, model, 1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    save(run_dir, model, 2)
except UserError as error:
    print(error.message)
    sys.exit(error.exit_code)
"""


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_intact_and_says_how_to_continue(tmp_path):
    script = textwrap.dedent(_FULL_DISK.format(tests=str(Path(__file__).parent), run_dir=str(tmp_path)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    message = done.stdout.strip()
    # the optimizer's shards (torch.save inside torch.distributed.checkpoint) hit the limit first
    assert "step 2" in message and "write was cut short" in message and "step_000001, is intact" in message
    assert f"parityrl train --resume {tmp_path}" in message and "Traceback" not in done.stderr
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000001"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # the half-written one is gone
    assert latest_checkpoint(tmp_path).name == "step_000001"


def test_weights_larger_than_one_file_are_written_as_an_hf_sharded_directory(tmp_path, monkeypatch):
    """The weights are gathered and written a file at a time (`WEIGHT_FILE_BYTES` each, HF's index
    beside them): the directory still loads with from_pretrained, to the same weights, and passes
    the resume-time integrity check; under the limit it is one model.safetensors as before."""
    from transformers import AutoModelForCausalLM

    import parityrl.train.checkpoint as checkpoint

    model = tiny_llama()
    single = save(tmp_path / "single", model, 1)
    assert sorted(p.name for p in single.glob("*.safetensors")) == ["model.safetensors"]
    monkeypatch.setattr(checkpoint, "WEIGHT_FILE_BYTES", 100_000)  # the embedding alone is 131 kB
    sharded = save(tmp_path / "sharded", model, 1)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in model.state_dict().values())
    assert latest_checkpoint(tmp_path / "sharded") == sharded
    for directory in (single, sharded):
        loaded = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True)
        assert loaded.dtype == torch.float32
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), (directory.name, name)
