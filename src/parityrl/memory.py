"""How much memory the trainer will need, estimated before anything slow starts.

A run whose trainer cannot fit must stop before the engine starts, with one paragraph that names the
setting to lower, never by the kernel's OOM killer twenty minutes in (a 135M model with a 49k
vocabulary and the old per-batch logits did exactly that). The estimate is a sum of parts a reader
can check against the code:

- weights, gradients and AdamW's two moments: fp32 master weights, 16 bytes per parameter;
- the copy `Trainer.state_dict_for_engines` makes for every publication and the shared-memory buffer
  the engine loads it from, in the engine's dtype (2 + 2 bytes per parameter in bf16, 4 + 4 in fp32);
- activations of one micro-batch (`train.micro_batch_tokens`): with activation checkpointing each
  decoder layer keeps its input (H floats per token) and one layer at a time is recomputed in full
  during backward; without it every layer keeps everything. The eager attention keeps its
  [heads, L, L] probabilities per packed row;
- the chunked head (`scoring.SCORE_CHUNK_ELEMENTS` entries, a handful of fp32 copies) and, with a bf16
  model and the fp32 head, the head weight rounded to bf16 that it keeps in fp32 (`policy.Fp32LMHead`);
- the process itself: torch, transformers and vLLM's front end (`RUNTIME_BYTES`, measured);
- the allocator: activations are scaled by `ALLOCATOR_FACTOR`, measured on a real run.

Calibrated on SmolLM2-135M runs on a 2-core CPU (the constants below say what was measured).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any

from parityrl.config import RunConfig
from parityrl.errors import InputError

GIB = 1 << 30
RUNTIME_BYTES = int(0.5 * GIB)
"""RSS of the trainer process besides tensors: torch, transformers, vLLM's AsyncLLM front end (a
SmolLM2 run's trainer held 0.77 GB with its 0.54 GB of fp32 weights loaded, before the first step)."""
ALLOCATOR_FACTOR = 2.4
"""Measured peak over the activation estimate: a SmolLM2 run (512-token micro-batches, heap trimmed after
each, up to 256 new tokens, bf16 publications) peaked at 5.7 GiB, 2.4x what the activation formula
gives once the other parts are taken off. The formula counts the tensors kept for backward; the
transient copies of a backward pass and what the allocator holds within a micro-batch come on top."""
HEAD_CHUNK_COPIES = 10
"""fp32 [positions, V] tensors alive at once while one chunk of the head is scored and back-propagated
(logits, penalised, scaled, sorted values and indices, masked, log-softmax, their gradients)."""
FLOAT_BYTES = 4


@dataclass(frozen=True)
class ModelShapeForMemory:
    """What the estimate needs of an HF causal-LM config."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool

    @classmethod
    def of(cls, hf_config: dict) -> ModelShapeForMemory:
        text = hf_config.get("text_config", hf_config)
        heads = int(text["num_attention_heads"])
        return cls(
            vocab=int(text["vocab_size"]),
            hidden=int(text["hidden_size"]),
            layers=int(text["num_hidden_layers"]),
            intermediate=int(text["intermediate_size"]),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            tied=bool(hf_config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        )

    @property
    def parameters(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * layer + self.hidden

    @property
    def layer_floats_per_token(self) -> int:
        """Floats one decoder layer keeps per token for backward (norms, q/k/v and their rotary copies,
        attention output, residuals, the MLP's gate, up, activation and product)."""
        kv = self.kv_heads * (self.hidden // self.heads)
        return 10 * self.hidden + 4 * self.intermediate + 3 * kv


@dataclass(frozen=True)
class TrainerMemory:
    """Estimated peak RSS of the trainer process, by part (bytes)."""

    runtime: int
    weights_grads_optimizer: int
    publication_copy: int
    activations: int
    head_chunks: int

    @property
    def total(self) -> int:
        return self.runtime + self.weights_grads_optimizer + self.publication_copy + self.activations + self.head_chunks

    def describe(self) -> str:
        parts = {
            "runtime": self.runtime,
            "weights+grads+AdamW": self.weights_grads_optimizer,
            "publication copy": self.publication_copy,
            "activations": self.activations,
            "head chunks": self.head_chunks,
        }
        return ", ".join(f"{name} {value / GIB:.1f} GiB" for name, value in parts.items())


def estimate_trainer_memory(config: RunConfig, hf_config: dict, longest_prompt: int) -> TrainerMemory:
    """Peak trainer memory of `config` on the model of `hf_config`, with prompts of up to `longest_prompt` tokens:
    of the trainer process, or with `pipeline.backend: ray` of rank 0 (it also makes the publication copy)."""
    from parityrl.batch import ModelShape, completions_per_row
    from parityrl.scoring import SCORE_CHUNK_ELEMENTS

    shape = ModelShapeForMemory.of(hf_config)
    train, sampling = config.train, config.sampling
    sequence = longest_prompt + sampling.max_new_tokens
    tokens = max(train.micro_batch_tokens, sequence)  # a longer sequence is a micro-batch of its own
    # a packed row holds a prompt and the completions sharing it (as many as `pack_samples` puts there for
    # full-length completions); rows of length L in `tokens` tokens keep at most tokens x L attention
    # probabilities per head (eager attention: the probabilities and their softmax input)
    sharing = completions_per_row(longest_prompt, sampling.max_new_tokens, sampling.n, ModelShape(shape.hidden, shape.intermediate))
    row = min(tokens, longest_prompt + sharing * sampling.max_new_tokens)
    attention = 2 * shape.heads * tokens * row * FLOAT_BYTES
    full_layer = tokens * shape.layer_floats_per_token * FLOAT_BYTES + attention
    # with checkpointing: every layer's input, plus one layer recomputed in full and its gradients in backward
    inputs_kept = shape.layers * tokens * shape.hidden * FLOAT_BYTES
    activations = inputs_kept + 2 * full_layer if uses_activation_checkpointing(config, hf_config) else shape.layers * full_layer
    parameters = shape.parameters
    # FSDP2 (`train.fsdp`) keeps 1/world_size of the fp32 weights, gradients and AdamW state on each rank; a
    # layer's full weights exist only while it computes (one layer's worth, inside the activations' margin)
    shards = config.train.world_size if config.train.fsdp else 1
    return TrainerMemory(
        runtime=RUNTIME_BYTES,
        weights_grads_optimizer=16 * parameters // shards,
        # the copy a publication makes, and the shared-memory buffer the engine loads it from (mapped here
        # too), both in the engine's dtype (`policy.export_state_dict`)
        publication_copy=2 * (2 if config.model.dtype == "bfloat16" else FLOAT_BYTES) * parameters,
        activations=int(ALLOCATOR_FACTOR * activations),
        head_chunks=HEAD_CHUNK_COPIES * SCORE_CHUNK_ELEMENTS * FLOAT_BYTES
        + (shape.vocab * shape.hidden * FLOAT_BYTES if config.model.dtype == "bfloat16" and config.model.lm_head_fp32 else 0),
    )


AUTO_CHECKPOINTING_ABOVE = 8 * GIB
"""`train.activation_checkpointing: auto` turns it on when a micro-batch's activations would exceed this."""


def uses_activation_checkpointing(config: RunConfig, hf_config: dict) -> bool:
    """`train.activation_checkpointing`, with `auto` resolved against the model (`AUTO_CHECKPOINTING_ABOVE`)."""
    setting = config.train.activation_checkpointing
    if setting != "auto":
        return bool(setting)
    without = config.model_copy(update={"train": config.train.model_copy(update={"activation_checkpointing": False})})
    return estimate_trainer_memory(without, hf_config, longest_prompt=0).activations > AUTO_CHECKPOINTING_ABOVE


def check_trainer_fits(estimate: TrainerMemory, available: int, config: RunConfig) -> None:
    """InputError (one paragraph: what, how much, which setting to lower) when the trainer cannot fit in `available` bytes."""
    if estimate.total <= available:
        return
    train = config.train
    if estimate.activations > estimate.weights_grads_optimizer:
        advice = f"lower train.micro_batch_tokens (now {train.micro_batch_tokens}; activations grow with it)"
        if train.activation_checkpointing is False:
            advice = "set train.activation_checkpointing: true, or " + advice
    else:
        advice = "the model's weights, gradients and AdamW state alone do not fit: use a smaller model, or more trainer ranks (pipeline.backend: ray)"
    raise InputError(
        f"the trainer would need about {estimate.total / GIB:.1f} GiB ({estimate.describe()}), and this machine has "
        f"{available / GIB:.1f} GiB available besides the engine; {advice}, or sampling.max_new_tokens "
        f"(now {config.sampling.max_new_tokens}). Nothing was started."
    )


def engine_memory(config: RunConfig, hf_config: dict) -> int:
    """What a local vLLM engine on CPU takes beside the trainer: its weights (a second copy of the
    linear weights for in-place updates), its KV cache and its processes' runtime."""
    shape = ModelShapeForMemory.of(hf_config)
    weight_bytes = shape.parameters * (2 if config.model.dtype == "bfloat16" else 4)
    copies = 2 if config.engine.weight_update == "inplace" else 1
    runtime = int(1.5 * GIB)  # EngineCore + worker processes with torch
    return runtime + copies * weight_bytes + int(config.engine.kv_cache_space_gib * GIB)


M_ARENA_MAX = -8
"""glibc's mallopt parameter number for the arena count."""


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name is not None else None


def one_malloc_arena() -> bool:
    """Make glibc's malloc use one arena for every thread of this process (True where it could).

    The trainer steps in worker threads (`asyncio.to_thread`); glibc gives each thread its own arena,
    and each arena keeps the memory of a step's freed tensors for that thread. A SmolLM2 run's trainer
    grew to 12 GB RSS in 8 steps and was OOM-killed; one arena reuses the same freed memory whatever
    thread asks: the same step in 4 rotating threads peaked at 9.5 GB after 2 steps with per-thread
    arenas (growing), 6.4 GB after 4 steps with one, and ran as fast. A no-op off glibc."""
    try:
        libc = _libc()
        return libc is not None and bool(libc.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (glibc 2.33 on)."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


TRIM_ABOVE_FREE_BYTES = 128 << 20
"""`release_free_memory` trims only when the heap holds at least this much free memory. A trim walks the
whole heap (~5.7 ms on the demo's trainer), and the next step faults the returned pages in and has the
kernel zero them again: with a trim after every step the demo's forward took 0.09 s, without 0.06 s.
Its steps leave ~80 MiB free, which the next step reuses; a SmolLM2 micro-batch leaves gigabytes, so the
resident set stays within this much of the live data. Reading the heap's free bytes (`mallinfo2`) takes
~0.15 ms."""


@functools.cache
def _malloc_functions() -> tuple[Any, Any]:
    """glibc's `malloc_trim` and `mallinfo2`, each None where absent (not glibc; `mallinfo2` before 2.33)."""
    try:
        libc = _libc()
    except OSError:
        return None, None
    if libc is None:
        return None, None
    trim, info = getattr(libc, "malloc_trim", None), getattr(libc, "mallinfo2", None)
    if info is not None:
        info.restype = _MallInfo2
    return trim, info


def release_free_memory() -> None:
    """Hand the heap's free pages back to the kernel (glibc `malloc_trim`) when it holds at least
    `TRIM_ABOVE_FREE_BYTES` free (`mallinfo2`; always where that cannot be read); a no-op off glibc.

    glibc keeps what a freed tensor occupied inside its heap, and a micro-batch's tensors free in an
    order that leaves gaps later requests do not fit: after two SmolLM2 steps the heap held 1.6 GB of
    live data and 3.4 GB free, all of it resident. Trimming between micro-batches keeps the RSS near the
    live data, at the price of the kernel zeroing those pages again when they are reused."""
    trim, info = _malloc_functions()
    if trim is not None and (info is None or info().fordblks >= TRIM_ABOVE_FREE_BYTES):
        trim(0)


def process_rss_gb() -> tuple[float, float]:
    """(resident now, peak resident since the process started) of this process in GB; NaN off Linux."""
    values = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024 / 1e9
    except OSError:
        pass
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))

