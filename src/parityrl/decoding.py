"""KV-cached batched decoding with a pluggable token picker: greedy for held-out evaluation
(`evaluate`), sampling from the processed distribution for the reference engine
(`engines.reference.SamplingPicker`). Below both, so evaluation never reaches into an engine."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

TokenPicker = Callable[[Tensor], tuple[Tensor, Tensor]]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) [batch, max_len], prompts aligned to the right edge."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention[row, width - len(prompt) :] = 1
    return input_ids, attention


@torch.no_grad()
def decode_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pick: TokenPicker,
    before_step: Callable[[int], None] | None = None,
    ignore_eos: bool = False,
) -> tuple[list[list[int]], list[list[float]], list[str]]:
    """KV-cached batched decoding. `before_step(step)` runs before every decode step (used to apply
    weight updates and pauses between steps). Returns per row: tokens, logprobs, finish reason."""
    device = next(model.parameters()).device
    input_ids, attention = (t.to(device) for t in left_pad(prompts, pad_id=0))
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    batch = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    logprobs: list[list[float]] = [[] for _ in range(batch)]
    finish = ["length"] * batch
    alive = torch.ones(batch, dtype=torch.bool)
    past = None
    step_input, step_positions = input_ids, position_ids
    for step in range(max_new_tokens):
        if before_step is not None:
            before_step(step)
        out = model(
            input_ids=step_input, attention_mask=attention, position_ids=step_positions, past_key_values=past, use_cache=True
        )
        past = out.past_key_values
        next_tokens, next_logprobs = pick(out.logits[:, -1].float())
        for row in alive.nonzero().flatten().tolist():
            tokens[row].append(int(next_tokens[row]))
            logprobs[row].append(float(next_logprobs[row]))
            if int(next_tokens[row]) == eos_id and not ignore_eos:
                finish[row] = "stop"
                alive[row] = False
        if not alive.any():
            break
        step_input = next_tokens.unsqueeze(-1)
        step_positions = step_positions[:, -1:] + 1
        attention = torch.cat([attention, torch.ones((batch, 1), dtype=attention.dtype, device=device)], dim=-1)
    return tokens, logprobs, finish


def greedy_picker(logits: Tensor) -> tuple[Tensor, Tensor]:
    return logits.argmax(-1), torch.zeros(logits.shape[0])
