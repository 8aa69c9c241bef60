"""Resumable checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is RUN_DIR/checkpoints/step_NNNNNN/: the policy as an HF model directory (loadable by
any HF tool and by `model.path`), the tokenizer, the AdamW state in `optimizer/` (torch.distributed
.checkpoint: each trainer rank writes its own shards, keyed by parameter name, so a run resumes on
another number of ranks, sharded or not), and `run_state.pt` with the step, the policy version, the
RNG states, the prompt sampler's state and the prompt groups that were drawn but not yet trained on
(regenerated first after a resume, so no group is lost or trained twice). With several ranks every
rank calls `save_checkpoint` (the optimizer shards and the gathered weights are collectives); rank 0
writes the rest.

Writes are atomic: everything goes to a `.tmp` directory, is fsynced, then renamed into place; a
crash mid-write leaves the previous checkpoints intact, and a write that fails (full disk, file-size
limit) removes its `.tmp` and stops the run with one paragraph. The newest `KEEP` checkpoints are kept.
`MANIFEST` lists every file's size, so `--resume` can tell a damaged checkpoint (a truncated or
missing file, e.g. copied or restored by hand) from an intact one and fall back to the previous one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from parityrl.errors import UserError
from parityrl.tasks import Problem

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "run_state.pt"
OPTIMIZER_DIR = "optimizer"
MANIFEST = "manifest.json"
KEEP = 2
_NAME = re.compile(r"^step_(\d{6,})$")


@dataclass
class RunState:
    """The loop's own state at the end of `step` (the trainer's model and optimizer are saved beside it)."""

    step: int
    """Last completed optimiser step."""
    version: int
    """Policy version after that step (what the engines serve)."""
    sampler_state: Any
    """`random.Random.getstate()` of the prompt sampler."""
    pending_prompts: list[Problem] = field(default_factory=list)
    """Groups drawn from the sampler but not trained on yet (generating, or waiting for the trainer)."""
    counters: dict[str, float] = field(default_factory=dict)
    """Run totals carried across resumes (rollout tokens, RL seconds, engine restarts, ...)."""
    eval_success: float | None = None
    """Last held-out success measured."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    """The last evaluation's `eval/*` metrics (held-out split and `task.eval_path` set)."""


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a `.tmp` left by a crash is not one)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint directory, or None if it is intact: every file its manifest
    lists is there with its size, and the weights' safetensors headers read back. (A checkpoint from
    before manifests is checked for the state file and readable weights only.)"""
    checkpoint = Path(checkpoint)
    manifest_path = checkpoint / MANIFEST
    if manifest_path.is_file():
        try:
            sizes = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as error:
            return f"{MANIFEST} is unreadable ({error})"
        for name, size in sizes.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} is {path.stat().st_size} bytes, {size} when written (truncated or replaced)"
    elif not (checkpoint / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        return "it has no model weights (*.safetensors)"
    from safetensors import safe_open

    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own error types for a damaged header
            return f"{path.name} cannot be read ({error})"
    return None


def latest_checkpoint(run_dir: Path, report=None) -> Path | None:
    """The newest intact checkpoint of a run. Damaged ones are skipped, each named through
    `report(line)`; if every checkpoint is damaged, a `UserError` says so (resuming from step 0
    silently would throw the run away)."""
    damaged: list[str] = []
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            if damaged and report is not None:
                report(f"damaged checkpoint skipped ({'; '.join(damaged)}): resuming from {checkpoint.name}, the newest intact one")
            return checkpoint
        damaged.append(f"{checkpoint.name}: {problem}")
    if damaged:
        raise UserError(
            f"no intact checkpoint to resume {run_dir} from ({'; '.join(damaged)}). Restore the files from a copy, "
            f"or start the run again without --resume (with --overwrite to replace it)."
        )
    return None


def save_checkpoint(
    run_dir: Path, model, optimizer: torch.optim.Optimizer, tokenizer, state: RunState, optimizer_module: torch.nn.Module | None = None
) -> Path:
    """Write checkpoint `step_{state.step}` atomically and prune all but the newest KEEP. A failed
    write (full disk, read-only or size-limited file system) removes its `.tmp` and raises a
    `UserError` that names the intact previous checkpoint. `optimizer_module`: the module the
    optimizer's state is keyed by (its parameter names); default `model`. Under torch.distributed
    every rank calls this; rank 0 returns once the checkpoint is in place."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step_{state.step:06d}"
    tmp = root / (final.name + ".tmp")
    writer = _rank() == 0
    try:
        if writer:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        _write_checkpoint(tmp, model, optimizer, optimizer_module or model, tokenizer, state, writer)
    except BaseException as error:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        if not _is_write_failure(error):
            raise
        previous = checkpoint_dirs(run_dir)
        raise UserError(
            f"could not write the checkpoint of step {state.step} to {tmp}: {_first_line(error)}. "
            + (f"The previous checkpoint, {previous[-1].name}, is intact. " if previous else "There is no earlier checkpoint. ")
            + f"Free space in {root} (or make it writable), then continue with `parityrl train --resume {run_dir}`.",
            exit_code=1,
        ) from None
    if not writer:
        return final
    if final.exists():  # the same step saved again (e.g. a stop right after a periodic checkpoint)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(run_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process():
    """torch.distributed.checkpoint warns at every single-process save and load that it assumes one
    process: the intended case for a local run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _single_process_flag(function) -> dict:
    """`no_dist` where this torch has it (torch 2.6, vLLM 0.8.5's, has not: there it assumes one process itself
    when torch.distributed is not initialised)."""
    import inspect

    return {"no_dist": not _distributed()} if "no_dist" in inspect.signature(function).parameters else {}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if _distributed():
        dist.barrier()


# how torch.save (RuntimeError) and safetensors (SafetensorError) report a failed write
_CUT_SHORT = r"PytorchStreamWriter|inline_container|unexpected pos"
"""torch.save's zip writer reporting a refused write as a position mismatch, without the OS error."""
_WRITE_FAILURE = re.compile(rf"os error|I/O error|No space|File too large|{_CUT_SHORT}", re.IGNORECASE)


def _is_write_failure(error: BaseException) -> bool:
    error = _underlying(error)
    return isinstance(error, OSError) or bool(_WRITE_FAILURE.search(str(error)))


def _underlying(error: BaseException) -> BaseException:
    """The first rank's own error inside torch.distributed.checkpoint's `CheckpointException` (which
    gathers each rank's (exception, traceback)); other errors as they are."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return error


def _first_line(error: BaseException) -> str:
    error = _underlying(error)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if re.search(_CUT_SHORT, line, re.IGNORECASE):
        return "a write was cut short (the file system is full, read-only, or limits the file size)"
    return line


def _write_checkpoint(directory: Path, model, optimizer: torch.optim.Optimizer, optimizer_module, tokenizer, state: RunState, writer: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    optimizer_state = {"optimizer": get_optimizer_state_dict(optimizer_module, optimizer)}
    with _quiet_single_process():
        dcp.save(optimizer_state, checkpoint_id=str(directory / OPTIMIZER_DIR), **_single_process_flag(dcp.save))
    _write_weights(directory, model, writer)
    if not writer:
        return
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    payload = {
        "run_state": asdict(state) | {"pending_prompts": [asdict(p) for p in state.pending_prompts]},
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }
    torch.save(payload, directory / STATE_FILE)
    sizes = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps(sizes, indent=1))
    _fsync_tree(directory)


WEIGHT_FILE_BYTES = 2 * 2**30
"""At most about this much of a checkpoint's weights per safetensors file (HF's sharded layout, as
`save_pretrained(max_shard_size=...)` writes it; one `model.safetensors` when they fit)."""


def _write_weights(directory: Path, model, writer: bool) -> None:
    """The model's weights (fp32 master weights) as an HF directory: config.json and safetensors files
    with an index when there are several. Gathered one decoder layer at a time (`export_chunks`; a
    collective when sharded, so every rank calls this) and written a file at a time, so the writer
    never holds more than one file's worth: a whole copy was rank 0's memory ceiling under FSDP."""
    from safetensors.torch import save_file

    from parityrl.policy import export_chunks

    files: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    failed: BaseException | None = None
    total_bytes = 0

    def write() -> None:
        nonlocal failed, total_bytes
        total_bytes += sum(tensor.nbytes for tensor in pending.values())
        if failed is None:
            try:
                save_file(pending, str(directory / f"part-{len(files):05d}.safetensors"), metadata={"format": "pt"})
            except BaseException as error:  # kept until every gather is done: the other ranks are in them
                failed = error
        files.append(list(pending))
        pending.clear()

    for chunk in export_chunks(model, keep=writer):
        pending |= chunk
        if sum(tensor.nbytes for tensor in pending.values()) >= WEIGHT_FILE_BYTES:
            write()
    if not writer:
        return
    if pending or not files:
        write()
    if failed is not None:
        raise failed
    names = ["model.safetensors"] if len(files) == 1 else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for index, name in enumerate(names):
        os.replace(directory / f"part-{index:05d}.safetensors", directory / name)
    if len(files) > 1:
        weight_map = {tensor: name for name, tensors in zip(names, files) for tensor in tensors}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    # what save_pretrained records: the dtype the weights were saved in (fp32 master weights)
    model.config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model.config.save_pretrained(str(directory))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(directory))


def load_run_state(checkpoint: Path, optimizer: torch.optim.Optimizer | None = None, optimizer_module: torch.nn.Module | None = None) -> RunState:
    """Read `run_state.pt`; restore the optimizer (if given; `optimizer_module` as in `save_checkpoint`)
    and the global torch/python RNG states. Under torch.distributed every rank that holds an optimizer
    calls this (each reads the shards it needs, whatever the number of ranks that wrote them)."""
    checkpoint = Path(checkpoint)
    payload = torch.load(checkpoint / STATE_FILE, weights_only=False)
    if optimizer is not None:
        if (checkpoint / OPTIMIZER_DIR).is_dir():
            _load_optimizer(checkpoint / OPTIMIZER_DIR, optimizer, optimizer_module)
        else:  # a checkpoint from before the sharded layout: one process's torch state dict
            optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["torch_rng"])
    random.setstate(payload["python_rng"])
    raw = dict(payload["run_state"])
    raw["pending_prompts"] = [Problem(**p) for p in raw.get("pending_prompts", [])]
    return RunState(**raw)


def _load_optimizer(directory: Path, optimizer: torch.optim.Optimizer, module: torch.nn.Module | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if module is None:
        raise ValueError("a checkpoint's optimizer state is keyed by parameter name: pass the module it belongs to")
    # this rank's layout of the state (allocated if the optimizer has not stepped yet), filled from the files
    state = {"optimizer": get_optimizer_state_dict(module, optimizer)}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(directory), **_single_process_flag(dcp.load))
    set_optimizer_state_dict(module, optimizer, state["optimizer"])
