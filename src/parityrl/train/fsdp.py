"""FSDP2 for the trainer ranks (`train.fsdp`): each rank holds a shard of every weight, gradient and
AdamW state tensor instead of all of them.

`fully_shard` (torch.distributed.fsdp) goes on each decoder layer and then on the `PolicyScorer`
around the model, the root: the scorer's forward is what the loss runs through (body, then the
chunked head), so the root's all-gather covers the embedding, the final norm and the head, tied or
not. Every forward and backward of a sharded model is a collective: ranks must run the same number
of micro-batches (`equal_micro_batch_count`, here), score the parity probe together
(`Trainer._accumulate_probe`), and gather the weights for engines and checkpoints together, one
tensor at a time (`policy.export_state_dict`).
"""

from __future__ import annotations

import torch
from torch import nn

from parityrl.policy import decoder_layers


def shard(scorer: nn.Module) -> nn.Module:
    """Shard `scorer` (a `PolicyScorer`) in place: each decoder layer of its model, then the scorer as
    the root. Weights stay fp32 (the trainer's master weights; bf16 compute comes from autocast, as
    without FSDP). Returns the scorer, now an `FSDPModule`."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(scorer.model):  # type: ignore[attr-defined]
        fully_shard(layer)
    fully_shard(scorer)
    return scorer


def equal_micro_batch_count(chunks: list[list[int]]) -> list[list[int]]:
    """`chunks` split further until this rank has as many micro-batches as the rank with the most.

    Each micro-batch's forward and backward all-gather weights and reduce-scatter gradients, so a
    rank that ran fewer would leave the others waiting forever. Splitting a micro-batch only lowers
    its tokens, so the budgets still hold; every rank has the same number of samples and each
    micro-batch at least one, so the largest count is always reachable."""
    import torch.distributed as dist

    count = torch.tensor([len(chunks)])
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    chunks = [list(chunk) for chunk in chunks]
    while len(chunks) < int(count.item()):
        largest = max(range(len(chunks)), key=lambda i: len(chunks[i]))
        if len(chunks[largest]) < 2:
            raise RuntimeError(f"cannot split {len(chunks)} micro-batches into {int(count.item())}: the ranks were given different sample counts")
        half = len(chunks[largest]) // 2
        chunks[largest : largest + 1] = [chunks[largest][:half], chunks[largest][half:]]
    return chunks
