"""The one definition of processed logprobs, against a brute-force implementation."""

from __future__ import annotations

import math

import pytest
import torch

from parityrl.config import SamplingConfig
from parityrl.engines.reference import SamplingPicker
from parityrl.policy import (
    EmulatedLowPrecision,
    Fp32LMHead,
    apply_penalties,
    compute_context,
    entropy_of,
    processed_log_distribution,
    processed_logprobs,
    raw_logprobs,
    use_fp32_head,
)


def brute_force_logprob(
    logits: list[float], token: int, temperature: float, top_k: int, top_p: float, min_p: float = 0.0
) -> float:
    """Plain-Python vLLM V1 semantics: scale, min-p (p >= min_p * p_max), top-k (>= k-th largest among
    the min-p survivors), top-p on ascending cumsum."""
    scaled = [x / temperature for x in logits]
    kept = set(range(len(scaled)))
    if min_p > 0:
        weights = [math.exp(x - max(scaled)) for x in scaled]  # proportional to probabilities
        kept = {i for i in kept if weights[i] >= min_p * max(weights)}
    if 0 < top_k < len(kept):
        kth = sorted((scaled[i] for i in kept), reverse=True)[top_k - 1]
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


@pytest.mark.parametrize("top_k", [1, 2, 7, 39])
def test_top_k_alone_masks_exactly_what_the_sorted_threshold_masks(top_k):
    """Top-k without top-p skips the sort (a threshold from `topk`, as vLLM's `apply_top_k_only`): the
    result must be bitwise the sorted definition's, with ties at the threshold and min-p's -inf entries
    among the candidates (fewer than k finite logits: nothing more is masked)."""
    from parityrl.policy import sampling_logits

    generator = torch.Generator().manual_seed(5)
    logits = torch.randint(-4, 5, (3, 8, 40), generator=generator).float()  # many ties
    for min_p in (0.0, 0.2):
        got = sampling_logits(logits, 0.7, top_k=top_k, min_p=min_p)
        scaled = sampling_logits(logits, 0.7, min_p=min_p)  # temperature and min-p only
        kth_largest = scaled.sort(dim=-1, descending=True).values[..., top_k - 1 : top_k]
        expected = scaled.masked_fill(scaled < kth_largest, float("-inf"))
        assert torch.equal(got, expected), (top_k, min_p)
        assert ((got > float("-inf")).sum(-1) >= min(top_k, 1)).all()


def test_raw_differs_from_processed_only_when_sampling_is_shaped():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    tokens = logits.argmax(-1)
    assert torch.allclose(raw_logprobs(logits, tokens), processed_logprobs(logits, tokens, 1.0))
    assert (raw_logprobs(logits, tokens) - processed_logprobs(logits, tokens, 0.7, -1, 0.9)).abs().min() > 1e-3


def test_entropy_of_truncated_distribution_is_finite_and_matches_definition():
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    entropy = entropy_of(processed_log_distribution(logits, 0.8, top_k=4, top_p=0.9))
    assert torch.isfinite(entropy).all()
    for row in range(3):
        lps = [brute_force_logprob(logits[row].tolist(), t, 0.8, 4, 0.9) for t in range(12)]
        expected = -sum(math.exp(lp) * lp for lp in lps if not math.isinf(lp))
        assert abs(float(entropy[row]) - expected) < 1e-5
    assert float(entropy_of(processed_log_distribution(logits, 1.0, top_k=1)).abs().max()) == 0.0


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


def test_fp32_head_in_bf16_compute_multiplies_the_operands_vllm_holds():
    """vLLM's fp32 head upcasts its bf16 hidden states and bf16 head weight: inside a bf16 compute_context the
    trainer's fp32 head must compute exactly that product (its master weight rounded), with the rounding
    passed straight through by the gradients; outside it, the fp32 operands as they are."""
    torch.manual_seed(0)
    head = Fp32LMHead(torch.nn.Linear(96, 500, bias=False))
    with torch.no_grad():
        head.weight.add_(3.0)  # a vector every row shares (assets.shared_logit): its bf16 rounding is what shows
    hidden = torch.randn(8, 96, requires_grad=True)
    with compute_context("bfloat16"):
        logits = head(hidden)
    engine = torch.nn.functional.linear(hidden.detach().bfloat16().float(), head.weight.detach().bfloat16().float())
    torch.testing.assert_close(logits, engine, rtol=0, atol=0)
    exact = hidden.detach() @ head.weight.detach().T
    assert (logits - exact).abs().max() > 1e-2  # the rounding is really there: it is what the engine computes
    grad_out = torch.randn_like(logits)
    logits.backward(grad_out)
    torch.testing.assert_close(head.weight.grad, grad_out.T @ hidden.detach().bfloat16().float())
    torch.testing.assert_close(hidden.grad, grad_out @ head.weight.detach().bfloat16().float())
    torch.testing.assert_close(head(hidden.detach()), exact, rtol=1e-6, atol=1e-5)  # fp32 compute: unrounded
    # the rounded weight is kept between calls: every change of the weight must make it anew
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.5, fused=True)  # in place, as the trainer steps it
    changes = {"fused AdamW step": optimizer.step, "load_state_dict": lambda: head.load_state_dict({"weight": head.weight.detach() * 1.5})}
    for change, apply in changes.items():
        with torch.no_grad(), compute_context("bfloat16"):
            head(hidden.detach())  # the rounding of the weight before the change is now kept
            apply()
            now = head(hidden.detach())
        engine = torch.nn.functional.linear(hidden.detach().bfloat16().float(), head.weight.detach().bfloat16().float())
        assert torch.equal(now, engine), change


# --------------------------------------------------------------------------- min-p and penalties


def brute_force_penalised(
    logits: list[float], prompt: list[int], previous: list[int], repetition: float, presence: float, frequency: float
) -> list[float]:
    """Plain-Python vLLM V1 penalties for one position, before temperature: repetition (token in the
    prompt or in the previous completion tokens: divide a positive logit, multiply a negative one),
    then frequency (count in the previous completion tokens only), then presence (same tokens)."""
    out = []
    for token, logit in enumerate(logits):
        count = previous.count(token)
        if token in prompt or count > 0:
            logit = logit / repetition if logit > 0 else logit * repetition
        logit -= frequency * count
        logit -= presence * (1 if count > 0 else 0)
        out.append(logit)
    return out


VOCAB, STEPS = 12, 7
# (temperature, top_k, top_p, min_p, repetition, presence, frequency): each transform alone, then mixed
SHAPED = [
    (1.0, -1, 1.0, 0.1, 1.0, 0.0, 0.0),
    (0.7, -1, 1.0, 0.3, 1.0, 0.0, 0.0),
    (0.8, 5, 0.9, 0.05, 1.0, 0.0, 0.0),
    (1.3, 3, 0.5, 0.2, 1.0, 0.0, 0.0),
    (1.0, -1, 1.0, 0.0, 1.5, 0.0, 0.0),
    (0.7, -1, 1.0, 0.0, 0.6, 0.0, 0.0),
    (0.7, -1, 1.0, 0.0, 1.0, 0.8, 0.0),
    (1.0, -1, 1.0, 0.0, 1.0, -0.5, 0.0),
    (1.4, -1, 1.0, 0.0, 1.0, 0.0, 0.6),
    (0.9, -1, 1.0, 0.0, 1.0, 0.0, -0.4),
    (0.7, 8, 0.9, 0.05, 1.3, 0.4, 0.2),
    (0.8, 6, 1.0, 0.05, 1.3, 0.4, 0.2),
    (1.5, -1, 0.8, 0.1, 0.8, -0.3, 0.5),
    (0.6, 4, 0.95, 0.0, 2.0, 1.0, 1.0),
]


def penalty_batch() -> dict:
    """Rows with repeated tokens in prompt and completion, negative and positive logits, different
    prompt lengths (left padding with id 0, a token that occurs nowhere else) and right-padded
    completions whose padding holds real token ids."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, STEPS, VOCAB, generator=generator, dtype=torch.float64) * 3
    prompts = [[3, 3, 5, 7], [1, 2], [9, 9, 9, 4, 4, 11], [6]]
    completions = [[5, 5, 2, 5, 8, 3, 3], [2, 2, 2, 1, 10], [4, 7, 4], [6, 6, 6, 6, 6, 6, 6]]
    width = max(map(len, prompts))
    prompt_ids = torch.zeros(4, width, dtype=torch.long)
    prompt_mask = torch.zeros(4, width, dtype=torch.bool)
    completion_ids = torch.randint(1, VOCAB, (4, STEPS), generator=generator)
    completion_mask = torch.zeros(4, STEPS, dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        prompt_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        prompt_mask[row, width - len(prompt) :] = True
        completion_ids[row, : len(completion)] = torch.tensor(completion)
        completion_mask[row, : len(completion)] = True
    return dict(
        logits=logits, prompts=prompts, completions=completions, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        completion_ids=completion_ids, completion_mask=completion_mask,
    )


def sampling_of(setting: tuple) -> SamplingConfig:
    t, k, p, min_p, repetition, presence, frequency = setting
    return SamplingConfig(
        temperature=t, top_k=k, top_p=p, min_p=min_p,
        repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency,
    )


def replayed_logprobs(batch: dict, sampling: SamplingConfig) -> torch.Tensor:
    """The trainer's replay, full vocabulary: [B, T, V] processed logprobs of every token."""
    penalised = apply_penalties(
        batch["logits"], batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"], sampling
    )
    every_token = torch.arange(VOCAB).expand(*penalised.shape[:2], VOCAB)
    s = sampling
    return processed_logprobs(penalised.unsqueeze(-2).expand(-1, -1, VOCAB, -1), every_token, s.temperature, s.top_k, s.top_p, min_p=s.min_p)


def oracle_logprobs(batch: dict, setting: tuple, row: int, step: int) -> list[float]:
    t, k, p, min_p, repetition, presence, frequency = setting
    previous = batch["completions"][row][:step]
    logits = brute_force_penalised(batch["logits"][row, step].tolist(), batch["prompts"][row], previous, repetition, presence, frequency)
    return [brute_force_logprob(logits, token, t, k, p, min_p) for token in range(VOCAB)]


def assert_same_distribution(got: list[float], expected: list[float], where) -> None:
    for token, (g, e) in enumerate(zip(got, expected)):
        if math.isinf(e):
            assert g == float("-inf"), (where, token, g, e)
        else:
            assert abs(g - e) < 1e-5, (where, token, g, e)


@pytest.mark.parametrize("setting", SHAPED, ids=str)
def test_min_p_and_penalties_match_brute_force_at_every_position(setting):
    batch = penalty_batch()
    got = replayed_logprobs(batch, sampling_of(setting))
    for row, completion in enumerate(batch["completions"]):
        for step in range(len(completion)):  # generated positions only; padding is never scored
            assert_same_distribution(got[row, step].tolist(), oracle_logprobs(batch, setting, row, step), (row, step))


def test_the_batch_exercises_every_rule():
    """The oracle tests can fail: on this batch each wrong variant of the rules (presence/frequency after
    the temperature, prompt tokens counted by frequency/presence or not by repetition, repetition dividing
    negative logits too, the prompt's padding counted, min-p before the temperature) changes a logprob.
    (Repetition commutes with the temperature: both scale, and neither changes a logit's sign.)"""
    batch = penalty_batch()
    logits, prompts, completions = batch["logits"], batch["prompts"], batch["completions"]
    assert (logits < 0).any() and (logits > 0).any()

    def max_change(setting: tuple, variant) -> float:
        worst = 0.0
        for row, completion in enumerate(completions):
            for step in range(len(completion)):
                right = oracle_logprobs(batch, setting, row, step)
                wrong = variant(row, step)
                for r, w in zip(right, wrong):
                    worst = max(worst, math.inf if math.isinf(r) != math.isinf(w) else (0.0 if math.isinf(r) else abs(r - w)))
        return worst

    def penalties_after_temperature(setting):
        t, k, p, min_p, rep, pres, freq = setting

        def variant(row, step):
            scaled = [x / t for x in logits[row, step].tolist()]
            penalised = brute_force_penalised(scaled, prompts[row], completions[row][:step], rep, pres, freq)
            return [brute_force_logprob(penalised, token, 1.0, k, p, min_p) for token in range(VOCAB)]

        return variant

    def prompt_counts_for(setting, rep_uses_prompt=True, freq_pres_use_prompt=False, prompt_pad=False):
        t, k, p, min_p, rep, pres, freq = setting

        def variant(row, step):
            prompt = ([0] * (6 - len(prompts[row])) if prompt_pad else []) + prompts[row]
            previous = completions[row][:step]
            seen_by_freq = (prompt if freq_pres_use_prompt else []) + previous
            out = []
            for token, logit in enumerate(logits[row, step].tolist()):
                if (token in prompt and rep_uses_prompt) or token in previous:
                    logit = logit / rep if logit > 0 else logit * rep
                count = seen_by_freq.count(token)
                out.append(logit - freq * count - pres * (count > 0))
            return [brute_force_logprob(out, token, t, k, p, min_p) for token in range(VOCAB)]

        return variant

    def repetition_always_divides(setting):
        t, k, p, min_p, rep, _, _ = setting

        def variant(row, step):
            seen = set(prompts[row]) | set(completions[row][:step])
            out = [x / rep if token in seen else x for token, x in enumerate(logits[row, step].tolist())]
            return [brute_force_logprob(out, token, t, k, p, min_p) for token in range(VOCAB)]

        return variant

    def min_p_before_temperature(setting):
        t, k, p, min_p, *_ = setting

        def variant(row, step):
            raw = logits[row, step].tolist()
            weights = [math.exp(x - max(raw)) for x in raw]
            kept = [x if w >= min_p * max(weights) else -math.inf for x, w in zip(raw, weights)]
            return [brute_force_logprob(kept, token, t, k, p) for token in range(VOCAB)]

        return variant

    assert max_change(SHAPED[6], penalties_after_temperature(SHAPED[6])) > 1e-3  # presence
    assert max_change(SHAPED[8], penalties_after_temperature(SHAPED[8])) > 1e-3  # frequency
    assert max_change(SHAPED[8], prompt_counts_for(SHAPED[8], freq_pres_use_prompt=True)) > 1e-3
    assert max_change(SHAPED[6], prompt_counts_for(SHAPED[6], freq_pres_use_prompt=True)) > 1e-3
    assert max_change(SHAPED[4], prompt_counts_for(SHAPED[4], rep_uses_prompt=False)) > 1e-3
    assert max_change(SHAPED[4], prompt_counts_for(SHAPED[4], prompt_pad=True)) > 1e-3
    assert max_change(SHAPED[4], repetition_always_divides(SHAPED[4])) > 1e-3
    assert max_change(SHAPED[1], min_p_before_temperature(SHAPED[1])) > 1e-3


def test_min_p_is_applied_before_top_p():
    """Top-p renormalises over the min-p survivors: with min-p first, a token that top-p alone (or
    top-p then min-p) would keep drops out."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.12, 0.08])).expand(4, 4)
    tokens = torch.arange(4)
    # top-p 0.85 alone: ascending cumsum 0.08, 0.20, 0.50, 1.0; only 0.08 is <= 0.15, so {0, 1, 2} stay
    top_p_only = processed_logprobs(logits, tokens, 1.0, top_p=0.85)
    assert torch.isfinite(top_p_only[:3]).all() and torch.isinf(top_p_only[3])
    # min-p 0.2 first drops token 3 (0.08 < 0.1); top-p then sees 0.543, 0.326, 0.130 and drops token 2
    both = processed_logprobs(logits, tokens, 1.0, top_p=0.85, min_p=0.2)
    assert torch.isfinite(both[:2]).all() and torch.isinf(both[2:]).all()
    assert abs(both[:2].exp().sum().item() - 1.0) < 1e-6


def test_penalties_are_neutral_by_default_and_padding_never_counts():
    batch = penalty_batch()
    args = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
    unchanged = apply_penalties(batch["logits"], *args, SamplingConfig())
    assert unchanged.dtype == torch.float32 and torch.equal(unchanged, batch["logits"].float())
    # a token masked out in the middle of a completion (and in the prompt padding) is not "seen"
    sampling = SamplingConfig(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.5)
    holed_mask = batch["completion_mask"].clone()
    holed_mask[1, 0] = False  # row 1's first token (2) no longer counts, but two later 2s still do
    holed = apply_penalties(batch["logits"], batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], holed_mask, sampling)
    full = apply_penalties(batch["logits"], *args, sampling)
    assert torch.equal(holed[1, 1, :2], full[1, 1, :2]) and torch.equal(holed[1, 1, 3:], full[1, 1, 3:])
    assert not torch.equal(holed[1, 1, 2], full[1, 1, 2])
    assert torch.equal(holed[[0, 2, 3]], full[[0, 2, 3]])


def test_entropy_with_min_p_and_penalties_matches_brute_force():
    batch = penalty_batch()
    setting = SHAPED[10]
    sampling = sampling_of(setting)
    penalised = apply_penalties(
        batch["logits"], batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"], sampling
    )
    entropy = entropy_of(processed_log_distribution(penalised, sampling.temperature, sampling.top_k, sampling.top_p, min_p=sampling.min_p))
    for row, completion in enumerate(batch["completions"]):
        for step in range(len(completion)):
            lps = oracle_logprobs(batch, setting, row, step)
            expected = -sum(math.exp(lp) * lp for lp in lps if not math.isinf(lp))
            assert abs(float(entropy[row, step]) - expected) < 1e-5


@pytest.mark.parametrize("setting", [SHAPED[10], SHAPED[12], SHAPED[13]], ids=str)
def test_reference_sampler_reports_what_the_trainer_replays(setting):
    """The reference engine's incremental penalties (step by step, as vLLM samples) and the trainer's
    all-positions replay give the same logprobs for the tokens it sampled."""
    sampling = sampling_of(setting)
    generator = torch.Generator().manual_seed(5)
    prompts = [[3, 3, 5, 7], [1, 2], [9, 9, 9, 4, 4, 11]]
    step_logits = torch.randn(STEPS, 3, VOCAB, generator=generator) * 3
    picker = SamplingPicker(sampling, torch.Generator().manual_seed(6), prompts)
    picked = [picker(logits) for logits in step_logits]
    tokens = torch.stack([chosen for chosen, _ in picked], dim=1)  # [B, T]
    reported = torch.stack([logprobs for _, logprobs in picked], dim=1)  # [B, T]
    assert torch.isfinite(reported).all()
    width = max(map(len, prompts))
    prompt_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    penalised = apply_penalties(step_logits.transpose(0, 1), prompt_ids, prompt_mask, tokens, mask, sampling)
    replayed = processed_logprobs(penalised, tokens, sampling.temperature, sampling.top_k, sampling.top_p, min_p=sampling.min_p)
    torch.testing.assert_close(replayed, reported, rtol=0, atol=1e-6)


@pytest.mark.parametrize("top_k,min_p", [(-1, 0.0), (50, 0.0), (-1, 0.05), (700, 0.01)])
def test_top_p_from_candidates_equals_the_full_sort_on_a_large_vocabulary(top_k, min_p):
    """A 49k vocabulary takes top-p from the 1024 largest logits instead of a sort (a quarter of a
    SmolLM2 training step). Same support and logprobs as vLLM's sorted computation, on peaked rows
    (LM-like), flat rows (the tail holds more than 1 - p: the sorted fallback) and rows with tied
    logits. Broken once: the tail mass left out of the cumulative sum keeps ~8x too few tokens."""
    from parityrl.policy import TOP_P_CANDIDATES, _top_k_top_p_sorted, sampling_logits

    generator = torch.Generator().manual_seed(3)
    vocab = 49152
    peaked = torch.randn(48, vocab, generator=generator) * 3.5
    flat = torch.randn(8, vocab, generator=generator) * 0.1
    tied = torch.randn(8, vocab, generator=generator).round()  # many equal logits
    logits = torch.cat([peaked, flat, tied])
    for top_p in (0.9, 0.5, 0.99):
        got = sampling_logits(logits, 0.7, top_k=top_k, top_p=top_p, min_p=min_p)
        reference = sampling_logits(logits, 0.7, min_p=min_p)  # temperature and min-p only
        use_top_k = 0 < top_k < vocab
        expected = _top_k_top_p_sorted(reference, top_k, use_top_k, top_p)
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
        kept = torch.isfinite(got)
        assert (got.log_softmax(-1)[kept] - expected.log_softmax(-1)[kept]).abs().max() <= 1e-6
        if top_p < 0.99:  # the candidate path decided these rows (not the sorted fallback)
            assert int(kept.sum(-1)[:48].float().median()) < TOP_P_CANDIDATES and int(kept.sum(-1)[:48].max()) > 5
