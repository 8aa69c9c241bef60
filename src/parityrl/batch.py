"""The engine -> trainer contract: what an engine hands the trainer, and how a list of it is laid
out for one forward pass. Below scoring (which computes on it) and the engines (which produce it).

- `Sample`: prompt and completion token ids, the logprob the engine reported for each sampled token
  (`logprobs_old`) and the policy version that produced it.
- `pack_samples` / `PackedBatch`: right-padded tensors of a list of samples, each prompt once per row
  of completions that share it.

Shapes: `B` sequences, `R` packed rows, `L` positions in a row, `P` prompt positions, `T` completion
positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

NO_VERSION = 1 << 40
"""Stands in for "no token" when taking the oldest version of an empty completion."""


@dataclass
class Sample:
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    logprobs_old: list[float]
    """Engine-reported logprob of each completion token (processed or raw, per engine config)."""
    version_per_token: list[int]
    """Policy version that produced each completion token."""
    finish_reason: str = "length"
    """`stop` (EOS) or `length` (max_new_tokens reached) or `abort`."""
    replica: int | None = None
    """Engine replica that generated the sample (`pipeline.backend: ray`); None with one local engine."""
    top_logprobs_old: list[dict[int, float]] | None = None
    """Only for `check --full-vocab`: per completion position, the engine's processed logprobs of its
    top-K tokens (all tokens when K is the vocabulary size)."""
    kv_version: int | None = None
    """`engine.prefix_caching: versioned`: the policy version the request was submitted (and its cache
    salted) under, the oldest whose KV its prompt may have read from the cache. A request that waited
    in vLLM's queue across an update reads version-v blocks and samples every token at v+1: it counts
    as spanning the update. None: the prompt was computed by its first token's version."""
    cached_prompt_tokens: int | None = None
    """Prompt tokens vLLM served from its prefix cache (None where the engine does not say)."""
    sampled_mask: list[bool] | None = None
    """Multi-turn episodes (`parityrl.episodes`): per completion token, True where the policy sampled it, False
    for environment and template tokens (context only: no loss, no parity; logprob 0, the version of the turn
    before them). None: every completion token was sampled."""
    turn_prompt_tokens: int | None = None
    """Multi-turn episodes: prompt tokens submitted to the engine over all turns (None: `prompt_token_ids`)."""

    @property
    def sampled_tokens(self) -> int:
        return len(self.completion_token_ids) if self.sampled_mask is None else sum(self.sampled_mask)

    @property
    def mixed_version(self) -> bool:
        """The sequence spans a weight update: its tokens, or the KV its prompt read (`kv_version`), come
        from more than one policy version."""
        versions = set(self.sampled_versions())
        if self.kv_version is not None and self.version_per_token:
            versions.add(self.kv_version)
        return len(versions) > 1

    @property
    def oldest_version(self) -> int:
        oldest = min(self.sampled_versions(), default=NO_VERSION)
        return oldest if self.kv_version is None or not self.version_per_token else min(oldest, self.kv_version)

    def turn_per_token(self) -> list[int]:
        """Episode turn (0 = first) of each completion token: a run of sampled tokens starts a turn, and
        the environment tokens after it count with it."""
        if self.sampled_mask is None:
            return [0] * len(self.completion_token_ids)
        turns, turn, previous = [], -1, False
        for sampled in self.sampled_mask:
            turn += sampled and not previous
            turns.append(max(turn, 0))
            previous = sampled
        return turns

    def sampled_versions(self) -> list[int]:
        if self.sampled_mask is None:
            return self.version_per_token
        return [v for v, sampled in zip(self.version_per_token, self.sampled_mask) if sampled]


@dataclass
class PackedBatch:
    """Samples laid out for one forward pass, with each prompt computed once for all its completions.

    A GRPO group's n samples share their prompt, so a packed row holds the prompt once followed by the
    completions that share it, each completion attending to the prompt and to itself only (a block
    mask, `attention_bias`) and positioned as if it followed the prompt directly (`position_ids`). The
    logits predicting a completion's tokens are read from its own positions and, for its first token,
    from the prompt's last one. Mathematically this is the per-sample forward pass; in floats it
    differs only in summation order (masked keys add exact zeros), the same order of difference as
    batching. `completions_per_row` decides how many completions share a row."""

    input_ids: Tensor  # [R, L] packed rows: a prompt, then completions sharing it; right-padded
    position_ids: Tensor  # [R, L] position in the sample's own sequence (a completion continues its prompt)
    segment_ids: Tensor  # [R, L] 0 = prompt, k >= 1 = the row's k-th completion, -1 = padding
    sample_row: Tensor  # [B] packed row of each sample
    logit_index: Tensor  # [B, T] position in the sample's row whose logits predict each completion token
    prompt_ids: Tensor  # [B, P] each sample's prompt, right-padded (penalties count its tokens)
    prompt_mask: Tensor  # [B, P] bool, prompt token (not padding)
    completion_ids: Tensor  # [B, T]
    completion_mask: Tensor  # [B, T] bool, sampled by the policy (not padding, not an environment token of an episode)
    logprobs_old: Tensor  # [B, T] engine logprobs, 0 at padding
    version_per_token: Tensor  # [B, T] int64, -1 at padding
    replica: Tensor  # [B] int64 engine replica of each sequence, -1 when unknown (one local engine)
    kv_version: Tensor  # [B] int64 `Sample.kv_version`, -1 when None (the prompt is its first token's version)
    turn_index: Tensor  # [B, T] int64 episode turn (0 = first) of each completion token, -1 at padding

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch on `device` (the trainer's)."""
        return PackedBatch(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))

    def attention_bias(self, dtype: torch.dtype) -> Tensor:
        """[R, 1, L, L] additive attention mask: 0 where a query may attend to a key, dtype-min elsewhere.

        A key is visible when it precedes the query in the row, is not padding, and is either prompt or
        in the query's own completion (HF models take a 4D mask as given)."""
        segments = self.segment_ids
        length = segments.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()  # [L, L]
        key_segment = segments.unsqueeze(1)  # [R, 1, L]
        same_sequence = (key_segment == 0) | (key_segment == segments.unsqueeze(2))  # [R, L, L]
        allowed = causal & same_sequence & (key_segment >= 0)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    def sequence_versions(self) -> tuple[Tensor, Tensor, Tensor]:
        """(oldest [B], newest [B], has_tokens [B]) policy version of each sequence's completion."""
        generated = self.completion_mask
        newest = self.version_per_token.masked_fill(~generated, -1).amax(-1)
        oldest = self.version_per_token.masked_fill(~generated, NO_VERSION).amin(-1)
        # a prompt read from cache blocks of an older version than any token (`Sample.kv_version`)
        oldest = torch.where(self.kv_version >= 0, torch.minimum(oldest, self.kv_version), oldest)
        return oldest, newest, generated.any(-1)


@dataclass(frozen=True)
class ModelShape:
    """What `completions_per_row` needs to know of the model: its width and MLP width."""

    hidden_size: int
    intermediate_size: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape | None:
        config = getattr(model, "config", None)
        hidden, intermediate = getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None)
        return cls(hidden, intermediate) if hidden and intermediate else None


def completions_per_row(prompt_len: int, completion_len: float, count: int, shape: ModelShape | None) -> int:
    """How many of a prompt's `count` completions (mean length `completion_len`) share one packed row.

    Sharing saves the prompt's projections and MLP for every extra completion (~a·d² per token, with a
    = 4 attention projections + 3 MLP matrices of width d_ff/d), while the eager attention computes the
    full L×L score matrix of a row, masked entries included (~4·L²·d per row). The count that minimises
    the cost per completion wins: short completions after a long prompt share a row, long ones do not.
    Without a shape (no model at hand) every completion of a prompt shares its row."""
    if shape is None or count <= 1:
        return max(count, 1)
    d = shape.hidden_size
    a = 4 + 3 * shape.intermediate_size / d

    def cost_per_completion(k: int) -> float:
        length = prompt_len + k * completion_len
        return (a * d * length + 4 * length * length) / k

    return min(range(1, count + 1), key=cost_per_completion)


def _padded(values: list, length: int, fill: object) -> list:
    """`values` as a list of `length` entries, `fill` after them."""
    return [*values, *([fill] * (length - len(values)))]


def pack_samples(samples: list[Sample], pad_id: int, shape: ModelShape | None = None) -> PackedBatch:
    """Lay `samples` out in shared-prompt rows (`PackedBatch`); samples keep their order in every [B, ...]
    tensor. `shape`: the model's (`ModelShape.of(model)`), to decide how many completions share a row."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for index, sample in enumerate(samples):
        by_prompt.setdefault(tuple(sample.prompt_token_ids), []).append(index)
    rows: list[tuple[tuple[int, ...], list[int]]] = []  # (prompt, sample indices) per packed row
    for prompt, members in by_prompt.items():
        mean_completion = sum(len(samples[i].completion_token_ids) for i in members) / len(members)
        per_row = completions_per_row(len(prompt), mean_completion, len(members), shape)
        rows += [(prompt, members[i : i + per_row]) for i in range(0, len(members), per_row)]
    width = max(len(prompt) + sum(len(samples[i].completion_token_ids) for i in members) for prompt, members in rows)
    max_prompt = max(len(s.prompt_token_ids) for s in samples)
    max_completion = max(1, max(len(s.completion_token_ids) for s in samples))
    # built as Python lists and converted once per field: a tensor per sample and field made packing
    # ~13 ms of the demo's ~250 ms trainer step
    row_ids: list[list[int]] = []
    row_positions: list[list[int]] = []
    row_segments: list[list[int]] = []
    sample_row = [0] * len(samples)
    logit_index = [[0] * max_completion for _ in samples]
    for row, (prompt, members) in enumerate(rows):
        plen = len(prompt)
        ids, positions, segments = list(prompt), list(range(plen)), [0] * plen
        cursor = plen
        for segment, index in enumerate(members, start=1):
            completion = samples[index].completion_token_ids
            count = len(completion)
            ids += completion
            positions += range(plen, plen + count)
            segments += [segment] * count
            sample_row[index] = row
            # token t is predicted at the position before it: the prompt's last token for t = 0
            logit_index[index][:count] = [plen - 1, *range(cursor, cursor + count - 1)][:count]
            cursor += count
        row_ids.append(_padded(ids, width, pad_id))
        row_positions.append(_padded(positions, width, 0))
        row_segments.append(_padded(segments, width, -1))
    completion_masks = [[True] * len(s.completion_token_ids) if s.sampled_mask is None else list(s.sampled_mask) for s in samples]
    input_ids = torch.tensor(row_ids, dtype=torch.long)
    position_ids = torch.tensor(row_positions, dtype=torch.long)
    segment_ids = torch.tensor(row_segments, dtype=torch.long)
    prompt_ids = torch.tensor([_padded(s.prompt_token_ids, max_prompt, pad_id) for s in samples], dtype=torch.long)
    prompt_mask = torch.tensor([_padded([True] * len(s.prompt_token_ids), max_prompt, False) for s in samples], dtype=torch.bool)
    completion_ids = torch.tensor([_padded(s.completion_token_ids, max_completion, 0) for s in samples], dtype=torch.long)
    completion_mask = torch.tensor([_padded(m, max_completion, False) for m in completion_masks], dtype=torch.bool)
    logprobs_old = torch.tensor([_padded(s.logprobs_old, max_completion, 0.0) for s in samples], dtype=torch.float32)
    versions = torch.tensor([_padded(s.version_per_token, max_completion, -1) for s in samples], dtype=torch.long)
    turn_index = torch.tensor([_padded(s.turn_per_token(), max_completion, -1) for s in samples], dtype=torch.long)
    replica = torch.tensor([-1 if s.replica is None else s.replica for s in samples], dtype=torch.long)
    kv_version = torch.tensor([-1 if s.kv_version is None else s.kv_version for s in samples], dtype=torch.long)
    return PackedBatch(
        input_ids, position_ids, segment_ids, torch.tensor(sample_row, dtype=torch.long), torch.tensor(logit_index, dtype=torch.long), prompt_ids, prompt_mask,
        completion_ids, completion_mask, logprobs_old, versions, replica, kv_version, turn_index,
    )
