"""The one definition of processed logprobs, against a brute-force implementation."""

from __future__ import annotations

import math

import pytest
import torch

from parityrl.policy import (
    EmulatedLowPrecision,
    Fp32LMHead,
    processed_entropy,
    processed_logprobs,
    raw_logprobs,
    use_fp32_head,
)

pytestmark = pytest.mark.unit


def brute_force_logprob(logits: list[float], token: int, temperature: float, top_k: int, top_p: float) -> float:
    """Plain-Python vLLM V1 semantics: scale, top-k (>= k-th largest), top-p on ascending cumsum."""
    scaled = [x / temperature for x in logits]
    kept = set(range(len(scaled)))
    if 0 < top_k < len(scaled):
        kth = sorted(scaled, reverse=True)[top_k - 1]
        kept = {i for i in kept if scaled[i] >= kth}
    if top_p < 1.0:
        total = sum(math.exp(scaled[i]) for i in kept)
        ascending = sorted(kept, key=lambda i: scaled[i])
        cumulative, dropped = 0.0, set()
        for position, i in enumerate(ascending):
            cumulative += math.exp(scaled[i]) / total
            if cumulative <= 1.0 - top_p and position != len(ascending) - 1:
                dropped.add(i)
        kept -= dropped
    if token not in kept:
        return float("-inf")
    norm = math.log(sum(math.exp(scaled[i]) for i in kept))
    return scaled[token] - norm


SETTINGS = [
    (1.0, -1, 1.0),
    (0.7, -1, 0.9),
    (0.7, 5, 1.0),
    (1.3, 3, 0.5),
    (0.5, 10, 0.8),
    (2.0, -1, 0.3),
    (0.9, 1, 1.0),
    (1.0, 16, 0.95),
]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_processed_logprobs_match_brute_force(temperature, top_k, top_p):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 16, generator=generator, dtype=torch.float64) * 3
    tokens = torch.randint(0, 16, (6,), generator=generator)
    # include every row's most likely token too, which is always in the support
    tokens[::2] = logits[::2].argmax(-1)
    got = processed_logprobs(logits, tokens, temperature, top_k, top_p)
    for row in range(6):
        expected = brute_force_logprob(logits[row].tolist(), int(tokens[row]), temperature, top_k, top_p)
        if math.isinf(expected):
            assert got[row] == float("-inf"), (row, got[row])
        else:
            assert abs(float(got[row]) - expected) < 1e-5, (row, float(got[row]), expected)


def test_top_k_keeps_ties_and_support_sums_to_one():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0, -1.0]])
    # k=2: the 2nd largest is 1.0 and both tied tokens survive
    lp = processed_logprobs(logits.expand(5, -1), torch.arange(5), 1.0, top_k=2)
    assert torch.isfinite(lp[:3]).all() and torch.isinf(lp[3:]).all()
    assert abs(lp[:3].exp().sum().item() - 1.0) < 1e-6


def test_raw_differs_from_processed_only_when_sampling_is_shaped():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    tokens = logits.argmax(-1)
    assert torch.allclose(raw_logprobs(logits, tokens), processed_logprobs(logits, tokens, 1.0))
    assert (raw_logprobs(logits, tokens) - processed_logprobs(logits, tokens, 0.7, -1, 0.9)).abs().min() > 1e-3


def test_entropy_of_truncated_distribution_is_finite_and_matches_definition():
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    entropy = processed_entropy(logits, 0.8, top_k=4, top_p=0.9)
    assert torch.isfinite(entropy).all()
    for row in range(3):
        lps = [brute_force_logprob(logits[row].tolist(), t, 0.8, 4, 0.9) for t in range(12)]
        expected = -sum(math.exp(lp) * lp for lp in lps if not math.isinf(lp))
        assert abs(float(entropy[row]) - expected) < 1e-5
    assert float(processed_entropy(logits, 1.0, top_k=1).abs().max()) == 0.0


def test_fp32_head_outputs_fp32_and_is_closer_to_fp32_reference():
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 500, bias=False).to(torch.bfloat16)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = head

        def get_output_embeddings(self):
            return self.lm_head

        def set_output_embeddings(self, module):
            self.lm_head = module

    model = Wrapper()
    hidden = torch.randn(8, 64).to(torch.bfloat16)
    bf16_logits = model.lm_head(hidden)
    exact = hidden.double() @ head.weight.double().T
    use_fp32_head(model)
    assert isinstance(model.lm_head, Fp32LMHead)
    fp32_logits = model.lm_head(hidden)
    assert fp32_logits.dtype == torch.float32
    assert model.lm_head.weight is head.weight  # same parameter: optimiser and checkpoint unchanged
    err_fp32 = (fp32_logits.double() - exact).abs().max().item()
    err_bf16 = (bf16_logits.double() - exact).abs().max().item()
    assert err_fp32 < 1e-4 < err_bf16


def test_emulated_bf16_matches_autocast_and_keeps_fp32_head_exact():
    """The CPU bf16 emulation must round like autocast (same dtype flow, ≤ 1 bf16 ulp apart), let
    gradients through, and leave the fp32 head untouched."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    head = Fp32LMHead(torch.nn.Linear(96, 500, bias=False))
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_hidden = layer(x)
    with EmulatedLowPrecision(torch.bfloat16):
        hidden = layer(x)
        scores = torch.matmul(hidden, hidden.transpose(0, 1))
        logits = head(hidden)
    assert hidden.dtype == ref_hidden.dtype == torch.bfloat16
    ulp = ref_hidden.float().abs().clamp(min=1e-3) * 2.0**-7
    assert ((hidden.float() - ref_hidden.float()).abs() <= ulp).all()
    assert scores.dtype == torch.bfloat16
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden.float() @ head.weight.T, rtol=0, atol=0)
    logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
