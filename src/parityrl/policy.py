"""The policy: model loading, the fp32 head, and the one definition of processed logprobs.

Everything that needs "the logprob of a sampled token" — the trainer's objective, the reference
engine's sampler, every parity check — calls `processed_logprobs` (or `sampling_logits`, from which
it is derived). Nothing recomputes these quantities inline: a second definition is how mismatches
get in. (That is also why this file runs past 400 lines: every transform of the sampler, and the
precision it runs in, stays beside the others.)

Semantics follow vLLM V1's sampler exactly, in its order (vllm/v1/sample/sampler.py, `Sampler`
docstring and `forward` -> `apply_logits_processors` -> `sample`):

1. logits are cast to fp32;
2. penalties, on the raw logits (`apply_penalties`; vllm/v1/sample/ops/penalties.py ->
   vllm/model_executor/layers/utils.py `apply_penalties`): repetition (tokens in the prompt or the
   completion so far: positive logits divided by the penalty, negative ones multiplied), then
   frequency (minus penalty x count in the completion so far), then presence (minus penalty if in the
   completion so far); the prompt counts for repetition only;
3. division by the temperature;
4. min-p (vllm/v1/sample/logits_processor/builtin.py `MinPLogitsProcessor`, an argmax-invariant
   processor run right after the temperature): tokens whose probability is below min_p times the
   largest probability get -inf;
5. top-k keeps logits >= the k-th largest (ties kept), then top-p sorts ascending and drops the
   tokens whose cumulative probability is <= 1 - p (the most likely token is always kept)
   (vllm/v1/sample/ops/topk_topp_sampler.py `apply_top_k_top_p_pytorch`);
6. `processed_logprobs` is log-softmax of what is left: it includes every step above
   (`TopKTopPSampler.forward_native/forward_cpu` return it, `Sampler.forward` reports it).

vLLM's model runner V2 (the GPU default when Triton is present; vllm/v1/worker/gpu/sample/sampler.py
`apply_sampling_params`) applies the same steps in the same order; its min-p compares logits with
max_logit + log(min_p), equal to step 4 up to rounding at the cut-off.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from parityrl.config import SamplingConfig

NEG_INF = float("-inf")


def _fp32(value: float, like: Tensor) -> Tensor:
    """`value` as a 0-d fp32 tensor: vLLM keeps per-request sampling parameters in fp32 tensors, so the
    arithmetic below rounds the parameter to fp32 first, as vLLM does."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def has_penalties(sampling: SamplingConfig) -> bool:
    """True when any of the three penalties is on (vLLM skips them all otherwise: `no_penalties`)."""
    return sampling.repetition_penalty != 1.0 or sampling.presence_penalty != 0.0 or sampling.frequency_penalty != 0.0


def token_counts(token_ids: Tensor, mask: Tensor, vocab: int) -> Tensor:
    """Occurrences of every vocabulary entry in each row. token_ids, mask [B, N] -> [B, V] fp32.

    fp32 counts are exact (integers < 2^24) and multiply like vLLM's int64 counts, which it promotes
    to fp32 when it scales them by the fp32 penalty."""
    counts = torch.zeros(token_ids.shape[0], vocab + 1, dtype=torch.float32, device=token_ids.device)
    # masked-out positions land in an extra column that is dropped (vLLM pads with id V the same way)
    ids = token_ids.long().masked_fill(~mask.bool(), vocab)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def penalize_logits(logits: Tensor, in_prompt: Tensor, output_counts: Tensor, sampling: SamplingConfig) -> Tensor:
    """Repetition, frequency and presence penalties, in vLLM's order, on fp32 logits.

    logits [..., V] (raw: before temperature); in_prompt [..., V] bool: the token occurs in the prompt;
    output_counts [..., V] fp32: its count in the completion *before* the position being predicted.
    Returns [..., V] fp32. Same arithmetic as vllm/model_executor/layers/utils.py `apply_penalties` and
    vllm/_custom_ops.py `apply_repetition_penalties_torch` (multiply by the fp32 reciprocal to divide).
    """
    logits = logits.float()
    in_output = output_counts > 0
    if sampling.repetition_penalty != 1.0:
        # the prompt counts for the repetition penalty only (prompt_mask | output_mask in vLLM)
        penalty = torch.where(in_prompt | in_output, _fp32(sampling.repetition_penalty, logits), 1.0)
        # a positive logit shrinks towards 0 and a negative one grows away from it: both make the token less likely
        logits = logits * torch.where(logits > 0, 1.0 / penalty, penalty)
    if sampling.frequency_penalty != 0.0:
        logits = logits - _fp32(sampling.frequency_penalty, logits) * output_counts
    if sampling.presence_penalty != 0.0:
        logits = logits - _fp32(sampling.presence_penalty, logits) * in_output
    return logits


def apply_penalties(
    logits: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor, sampling: SamplingConfig
) -> Tensor:
    """Penalised fp32 logits for every completion position at once (the reference engine's replay).

    logits [B, T, V]: position t predicts completion token t; prompt_ids, prompt_mask [B, P] (any
    padding, mask True on prompt tokens); completion_ids, completion_mask [B, T] (mask True on
    generated tokens). Position t is penalised for the prompt and completion[:t], exactly what vLLM
    had seen when it sampled token t. Returns [B, T, V] fp32 (the logits unchanged, in fp32, when every
    penalty is off). The trainer penalises chunks of positions instead (`apply_penalties_at`).
    """
    batch, steps, vocab = logits.shape
    rows = torch.arange(batch, device=logits.device).repeat_interleave(steps)  # [B*T]
    positions = torch.arange(steps, device=logits.device).repeat(batch)  # [B*T]
    flat = apply_penalties_at(logits.reshape(batch * steps, vocab), prompt_ids, prompt_mask, completion_ids, completion_mask, rows, positions, sampling)
    return flat.reshape(batch, steps, vocab)


def apply_penalties_at(
    logits: Tensor,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    rows: Tensor,
    positions: Tensor,
    sampling: SamplingConfig,
) -> Tensor:
    """Penalised fp32 logits of N chosen completion positions. logits [N, V]: entry i predicts
    completion token `positions[i]` of sequence `rows[i]` of the [B, P] prompt and [B, T] completion
    tensors. Counts are built for these N positions only ([N, V]), never for the whole [B, T, V]
    batch: that is what bounds the trainer's memory by the chunk, not by the batch times the vocabulary.
    """
    if not has_penalties(sampling):
        return logits.float()
    vocab = logits.shape[-1]
    in_prompt = token_counts(prompt_ids[rows], prompt_mask[rows], vocab) > 0  # [N, V]
    steps = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    # completion[:t] of each position's own sequence: the tokens vLLM had generated when it sampled t
    before = completion_mask[rows] & (steps.unsqueeze(0) < positions.unsqueeze(-1))  # [N, T]
    counts_before = token_counts(completion_ids[rows], before, vocab)  # [N, V]
    return penalize_logits(logits, in_prompt, counts_before, sampling)


def sampling_logits(logits: Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """fp32 logits of the distribution actually sampled from: scaled, with masked tokens at -inf.

    logits: [..., vocab] in any dtype, already penalised (`apply_penalties`) when penalties are on.
    Returns [..., vocab] float32. Order: temperature, min-p, top-k, top-p (see the module docstring).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for a sampling distribution, got {temperature}")
    scaled = logits.float() / temperature
    if min_p > 0.0:
        # MinPLogitsProcessor.apply: probabilities of the scaled logits against min_p x the largest one
        probs = scaled.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * _fp32(min_p, scaled)
        scaled = scaled.masked_fill(probs < threshold, NEG_INF)
    vocab = scaled.shape[-1]
    use_top_k = 0 < top_k < vocab
    use_top_p = top_p < 1.0
    if not (use_top_k or use_top_p):
        return scaled
    if not use_top_p:
        # top-k alone needs only the k-th largest logit, not a sort (vLLM's `apply_top_k_only` likewise):
        # the same threshold as the sorted path below, so the same mask; 30x faster on a 32k vocabulary
        kth_largest = scaled.topk(top_k, dim=-1).values[..., -1:]
        return scaled.masked_fill(scaled < kth_largest, NEG_INF)
    flat = scaled.reshape(-1, vocab)
    if vocab > TOP_P_CANDIDATES_FROM_VOCAB and (not use_top_k or top_k <= TOP_P_CANDIDATES):
        return _top_p_from_candidates(flat, top_k if use_top_k else TOP_P_CANDIDATES, use_top_k, top_p).reshape(scaled.shape)
    return _top_k_top_p_sorted(flat, top_k, use_top_k, top_p).reshape(scaled.shape)


TOP_P_CANDIDATES = 1024
"""Top-p looks at this many largest logits per position (`_top_p_from_candidates`) instead of sorting the vocabulary."""
TOP_P_CANDIDATES_FROM_VOCAB = 8 * TOP_P_CANDIDATES
"""Vocabularies larger than this take the candidate path (a 49k-row head: the sort was a quarter of a training step)."""


def _top_k_top_p_sorted(flat: Tensor, top_k: int, use_top_k: bool, top_p: float) -> Tensor:
    """[N, V] fp32: vLLM's `apply_top_k_top_p` literally: sort ascending, top-k, top-p on the cumulative sum."""
    vocab = flat.shape[-1]
    # min-p's -inf entries sort first; if fewer than k tokens survive it, the k-th largest is -inf and
    # top-k removes nothing more, and they carry no probability mass into top-p's cumulative sum
    sorted_logits, sorted_index = flat.sort(dim=-1, descending=False)
    if use_top_k:
        kth_largest = sorted_logits[:, vocab - top_k].unsqueeze(-1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, NEG_INF)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1.0 - top_p
    drop[:, -1] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.empty_like(flat).scatter_(-1, sorted_index, sorted_logits)


def _top_p_from_candidates(flat: Tensor, candidates: int, is_top_k: bool, top_p: float) -> Tensor:
    """[N, V] fp32: top-k (when `is_top_k`, k = `candidates`) and top-p from the `candidates` largest logits.

    vLLM drops the sorted tokens whose ascending cumulative probability is <= 1 - p. Every token outside
    the candidates has a cumulative sum <= the candidates' complement (the tail mass); when that tail is
    <= 1 - p they are all dropped, and the candidates' own cumulative sums are the tail plus their
    ascending running sum. Rows whose tail is larger (a flat distribution) take the full sort. The same
    support and renormalised logprobs as the sort, up to float rounding of a cumulative sum that lands
    exactly on 1 - p (the order of the tail's summation differs)."""
    values, index = flat.topk(candidates, dim=-1)  # [N, C] descending
    if is_top_k:  # vLLM keeps ties of the k-th largest logit: such rows take the sorted path
        kth_largest = values[:, -1:]
        keep = flat >= kth_largest
        masked = flat.masked_fill(~keep, NEG_INF)
        ties = keep.sum(-1) > candidates
    else:
        masked, ties = flat, torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
    log_normaliser = masked.logsumexp(dim=-1, keepdim=True)  # [N, 1]
    probs = (values - log_normaliser).exp()  # [N, C] descending: the softmax of the (top-k-masked) row at the candidates
    if is_top_k:
        tail = torch.zeros_like(log_normaliser)  # top-k left no mass outside the candidates
    else:
        # summed from the small probabilities themselves, in fp64 (as 1 - the candidates' sum, fp32 rounding
        # moved 1 token in ~2000 across a 0.01 boundary); vLLM's ascending cumulative sum adds the same numbers
        outside = (masked - log_normaliser).exp().scatter(-1, index, 0.0)
        tail = outside.double().sum(-1, keepdim=True)
    cumulative = (tail + probs.double().flip(-1).cumsum(-1)).float()  # ascending, as vLLM sums
    drop = (cumulative <= 1.0 - top_p).flip(-1)  # back to descending order
    drop[:, 0] = False  # the most likely token always survives
    result = torch.full_like(flat, NEG_INF).scatter_(-1, index, values.masked_fill(drop, NEG_INF))
    fallback = ties | (tail.squeeze(-1) > 1.0 - top_p)
    if fallback.any():
        result[fallback] = _top_k_top_p_sorted(flat[fallback], candidates, is_top_k, top_p)
    return result


def processed_log_distribution(logits: Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """[..., vocab] fp32 log-probabilities of the whole distribution sampled from (-inf outside the
    min-p/top-k/top-p support). logits: [..., vocab], penalised (`apply_penalties`) when penalties are on."""
    return sampling_logits(logits, temperature, top_k, top_p, min_p).log_softmax(dim=-1)


def processed_logprobs(
    logits: Tensor, tokens: Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0
) -> Tensor:
    """Logprob of `tokens` under the distribution sampled from (vLLM `processed_logprobs`).

    logits: [..., vocab], penalised with `apply_penalties` when penalties are on; tokens: [...] int64.
    Returns [...] float32; -inf for a token outside the min-p/top-k/top-p support (callers decide what
    to do with those, see `scoring.score`).
    """
    return token_logprobs(processed_log_distribution(logits, temperature, top_k, top_p, min_p), tokens)


def token_logprobs(log_distribution: Tensor, tokens: Tensor) -> Tensor:
    """[...] entries of `log_distribution` [..., vocab] at `tokens` [...]."""
    return log_distribution.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def raw_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """Logprob of `tokens` under log_softmax of the unscaled logits (vLLM `raw_logprobs`). [...] fp32."""
    return logits.float().log_softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(log_distribution: Tensor) -> Tensor:
    """Entropy (nats) per position of a [..., vocab] log-distribution with -inf outside its support."""
    probs = log_distribution.exp()
    # masked tokens have p = 0 and logp = -inf; 0 * -inf is NaN, so zero them explicitly
    return -(probs * log_distribution.masked_fill(probs == 0, 0.0)).sum(dim=-1)


def sample_tokens(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None, min_p: float = 0.0
) -> Tensor:
    """Draw one token per row from the processed distribution. logits [batch, vocab] (penalised) -> [batch]."""
    probs = sampling_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Fp32LMHead(nn.Module):
    """Final projection computed in fp32 whatever the model dtype (fix 4, trainer side).

    The weight stays a parameter of the model dtype (so optimiser and checkpoints are unchanged);
    only the matmul is done in fp32. Inside a bf16 `compute_context` its operands are first rounded
    to bf16, as vLLM's are: its fp32 head (`head_dtype`) upcasts the bf16 hidden states and the head
    weight it holds in the model dtype. With fp32 master operands instead, the trainer's head differs
    from the engine's by the weight's rounding, which grows with the weight (on the showcase's head,
    whose rows share a large vector, `parity/kl` 1.5e-4 against 8.7e-5 rounded; on the unshifted head 1%).
    The rounded weight is made once per version of the weight (an optimiser step, a load), not per
    call: rounding SmolLM2's head in every chunk made its trainer step ~15% slower.
    """

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias
        self._rounded: tuple[tuple, Tensor] | None = None  # (`rounded_weight`'s key, the rounding as fp32)

    def forward(self, hidden: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        operands = getattr(_precision, "operands", None)
        with full_precision(hidden.device.type):
            if operands is None:
                return F.linear(hidden.float(), self.weight.float(), bias)
            return _LinearOnRounded.apply(hidden, self.weight, self.rounded_weight(operands), operands, bias)

    def rounded_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight rounded to `dtype`, as fp32 [vocab, hidden]; remade after any optimiser step (fused AdamW
        changes the weight without touching its version counter), any other in-place change (`load_state_dict`:
        the version counter) and when the weight's storage moved."""
        weight = self.weight
        key = (weight.data_ptr(), weight._version, _optimizer_steps[0], dtype)
        if self._rounded is None or self._rounded[0] != key:
            self._rounded = None  # the old copy goes before the new one is made
            self._rounded = (key, weight.detach().to(dtype).float())
        return self._rounded[1]


_optimizer_steps = [0]
"""Optimiser steps taken in this process, by any optimiser: part of `Fp32LMHead`'s key for its rounded weight."""


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class _LinearOnRounded(torch.autograd.Function):
    """`F.linear` in fp32 of hidden states rounded to `dtype` and the weight's rounding (given); gradients
    pass the rounding straight through to the hidden states and the weight."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, weight_rounded: Tensor, dtype: torch.dtype, bias: Tensor | None) -> Tensor:
        hidden_rounded = hidden.to(dtype)
        ctx.save_for_backward(hidden_rounded, weight_rounded)
        ctx.dtypes, ctx.has_bias = (hidden.dtype, weight.dtype), bias is not None
        return F.linear(hidden_rounded.float(), weight_rounded, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden_rounded, weight_rounded = ctx.saved_tensors
        grad_hidden = grad_weight = grad_bias = None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])  # [tokens, vocab]
        with full_precision(grad_out.device.type):  # a backward run inside compute_context stays fp32 too
            if ctx.needs_input_grad[0]:
                grad_hidden = (grad_out @ weight_rounded).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                grad_weight = (flat_grad.T @ hidden_rounded.reshape(-1, hidden_rounded.shape[-1]).float()).to(ctx.dtypes[1])
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = flat_grad.sum(dim=0)
        return grad_hidden, grad_weight, None, None, grad_bias


def use_fp32_head(model: nn.Module) -> None:
    """Swap the model's lm_head for an fp32 one in place (idempotent)."""
    head = model.get_output_embeddings()
    if isinstance(head, Fp32LMHead):
        return
    if not isinstance(head, nn.Linear):
        raise TypeError(f"expected an nn.Linear lm_head, got {type(head).__name__}")
    model.set_output_embeddings(Fp32LMHead(head))


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# The ops autocast runs in low precision on CPU (torch's CPU lower-precision list, minus convs/RNNs).
_LOW_PRECISION_FUNCS = {
    F.linear, F.scaled_dot_product_attention,
    torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm, torch.bmm, Tensor.bmm,
    torch.addmm, Tensor.addmm, torch.baddbmm, Tensor.baddbmm,
}
_precision = threading.local()


@contextlib.contextmanager
def full_precision(device_type: str = "cpu"):
    """Compute the enclosed ops in fp32 even inside `compute_context` (autocast or emulated bf16)."""
    before = getattr(_precision, "full", False)
    _precision.full = True
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        _precision.full = before


def _round_to(x, dtype: torch.dtype):
    """fp32 tensor holding `x` rounded to `dtype`; gradients pass straight through the rounding."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return x
    if x.dtype != torch.float32:
        return x.float()
    return x + (x.to(dtype).float() - x).detach()


class EmulatedLowPrecision(TorchFunctionMode):
    """bf16 compute for CPUs without bf16 matmul units: what autocast does, ~13x faster.

    On such CPUs torch's bf16 GEMM is a scalar fallback (measured here: 2.7 s vs 0.15 s fp32 for one
    forward+backward of the tiny model; 0.21 s emulated). Every op autocast would run in bf16 here gets its operands
    rounded to bf16, multiplies them with fp32 accumulation (what bf16 GEMMs do on every
    accelerator) and returns a bf16 tensor, exactly autocast's dtype flow. Only the order of the
    fp32 accumulation differs from a native bf16 kernel.
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _LOW_PRECISION_FUNCS or getattr(_precision, "full", False):
            return func(*args, **kwargs)
        args = tuple(_round_to(a, self.dtype) for a in args)
        kwargs = {k: _round_to(v, self.dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs).to(self.dtype)


@functools.cache  # a property of the machine; compute_context runs once per micro-batch
def cpu_has_fast_bf16() -> bool:
    """True where torch's CPU bf16 matmul runs on hardware (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_context(dtype: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """Trainer-side precision: fp32 master weights, bf16 compute when dtype is bf16.

    The trainer keeps fp32 weights (AdamW steps of 1e-4 vanish in bf16 weights); engines receive the
    weights and run them in the configured dtype. bf16 compute is torch autocast, except on CPUs
    without bf16 hardware, where `EmulatedLowPrecision` gives the same rounding ~13x faster.
    Thread-local: enter it in the thread that runs the model.
    """
    if dtype == "float32":
        return contextlib.nullcontext()
    compute = torch_dtype(dtype)
    if device_type == "cpu" and not cpu_has_fast_bf16():
        return _with_head_operands(compute, EmulatedLowPrecision(compute))
    return _with_head_operands(compute, torch.autocast(device_type=device_type, dtype=compute))


@contextlib.contextmanager
def _with_head_operands(dtype: torch.dtype, low_precision: contextlib.AbstractContextManager):
    """`low_precision` entered, and the fp32 head told to round its operands to `dtype` (`Fp32LMHead`)."""
    before = getattr(_precision, "operands", None)
    _precision.operands = dtype
    try:
        with low_precision:
            yield
    finally:
        _precision.operands = before


def load_policy(model_dir: str | Path, dtype: str, lm_head_fp32: bool) -> nn.Module:
    """Load an HF causal LM from a local directory (never a hub) in `dtype`, optionally with fp32 head."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch_dtype(dtype), local_files_only=True, attn_implementation="eager"
    )
    if lm_head_fp32:
        use_fp32_head(model)
    return model


def export_state_dict(model: nn.Module, dtype: torch.dtype | None = None, keep_fp32: frozenset[str] = frozenset(), keep: bool = True) -> dict[str, Tensor]:
    """HF-named weights of `model`, copied so the trainer can keep stepping while engines load them:
    every chunk of `export_chunks` in one dict (the arguments are `export_chunks`')."""
    exported: dict[str, Tensor] = {}
    for chunk in export_chunks(model, dtype, keep_fp32, keep):
        exported |= chunk
    return exported


def export_chunks(
    model: nn.Module, dtype: torch.dtype | None = None, keep_fp32: frozenset[str] = frozenset(), keep: bool = True
) -> Iterator[dict[str, Tensor]]:
    """`model`'s HF-named weights, copied, one decoder layer at a time (every other tensor alone).

    A consumer that sends each chunk on before taking the next (`TrainerRank.weight_chunks` puts it in
    Ray's object store) never holds more than one layer beyond its shard: a whole copy of a 7B model's
    weights on rank 0 was the memory ceiling of publication.

    dtype: the engine's parameter dtype. An engine running bf16 rounds fp32 weights to bf16 as it loads
    them (a copy into its parameters, round-to-nearest-even as `Tensor.to`), so rounding them here gives
    it the same weights in half the copy, shared memory and transfer; the names in `keep_fp32` (the
    fp32 head of fix 4) stay fp32, though vLLM 0.32 copies them into its head parameter of the model
    dtype all the same (its fp32 head is an fp32 product of bf16 operands: `Fp32LMHead`). A tied head is the input
    embedding's parameter under a second name: it goes once, as the embedding (engines tie it again).

    A model sharded by FSDP (`train.fsdp`) is gathered one tensor at a time, on every rank (a
    collective: each rank walks the same names); `keep` is False on the ranks that only take part:
    they yield nothing (but must exhaust the iterator, as the keeping rank does)."""
    aliases = tied_aliases(model)
    chunk: dict[str, Tensor] = {}
    chunk_key: str | None = None
    for name, tensor in model.state_dict().items():
        if name in aliases:
            continue
        key = _chunk_key(name)
        if chunk and key != chunk_key:
            yield chunk
            chunk = {}
        chunk_key = key
        tensor = full_tensor(tensor.detach())
        if not keep:
            continue
        target = dtype if dtype is not None and tensor.is_floating_point() and name not in keep_fp32 else tensor.dtype
        # on CPU: engines (vLLM's in-place reload, Ray's object store) take host tensors whatever the trainer's device
        chunk[name] = tensor.to("cpu", dtype=target, copy=True).contiguous()
        del tensor  # a gathered shard: free it before the next gather
    if chunk:
        yield chunk


_DECODER_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def _chunk_key(name: str) -> str:
    """The decoder layer a weight belongs to (`model.layers.3`), or the weight's own name."""
    match = _DECODER_LAYER.match(name)
    return match.group(1) if match else name


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor: gathered from every rank if it is an FSDP shard (a collective), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of an HF causal LM (`model.model.layers` for Qwen2/Llama); [] if not found."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are a parameter seen earlier under another name (a tied head), by
    identity: the same answer on every rank of a sharded model, whose local shards may be empty."""
    first: set[int] = set()
    aliases = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases.add(name)
        first.add(id(parameter))
    return aliases


def sequence_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Logits for a right-padded batch. input_ids/attention_mask [batch, seq] -> [batch, seq, vocab]."""
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(model_dir: Path):
    """The tokenizer of a model directory, as its tokenizer_config.json declares it.

    A directory that declares the generic class (the built character tokenizer, any tokenizer saved
    from a `tokenizers` object) is loaded as exactly that: next to a Qwen2 `config.json`,
    transformers 5's AutoTokenizer swaps in the model type's own tokenizer class, whose byte-level
    pre-tokenizer turns a space into a symbol the character vocabulary lacks, and every space of
    every prompt and answer was silently dropped ("23 24" became "2324")."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    declared = None
    with contextlib.suppress(OSError, ValueError):
        declared = json.loads((Path(model_dir) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    loader = PreTrainedTokenizerFast if declared in GENERIC_TOKENIZER_CLASSES else AutoTokenizer
    return loader.from_pretrained(str(model_dir), local_files_only=True)
