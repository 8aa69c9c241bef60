"""The scoring module: full-distribution mismatch against a brute-force oracle, and out-of-support
tokens through the real Trainer.step (they must be counted, never turn into -inf/NaN in a loss)."""

from __future__ import annotations

import math

import pytest
import torch

from parityrl.assets import build_model, build_tokenizer
from parityrl.config import load_config
from parityrl.policy import sampling_logits
from parityrl.scoring import DistributionMismatch, Mismatch, Sample, listed_logprobs
from parityrl.train.trainer import Trainer

pytestmark = pytest.mark.unit


def log_dist(logits: torch.Tensor, temperature=0.7, top_k=-1, top_p=0.9) -> torch.Tensor:
    return sampling_logits(logits, temperature, top_k, top_p).log_softmax(-1).double()


def brute_force_kl_tv(engine: torch.Tensor, trainer: torch.Tensor) -> tuple[float, float]:
    """Mean over positions of KL(engine || trainer) and TV, one token at a time."""
    kls, tvs = [], []
    for row_e, row_t in zip(engine.tolist(), trainer.tolist()):
        kl = sum(math.exp(e) * (e - t) for e, t in zip(row_e, row_t) if e != float("-inf"))
        tv = 0.5 * sum(abs((math.exp(e) if e != float("-inf") else 0.0) - (math.exp(t) if t != float("-inf") else 0.0)) for e, t in zip(row_e, row_t))
        kls.append(kl)
        tvs.append(tv)
    return sum(kls) / len(kls), sum(tvs) / len(tvs)


def listing(engine: torch.Tensor, k: int) -> list[dict[int, float]]:
    """What vLLM returns with logprobs=k: the top-k tokens of each position and their logprobs."""
    values, ids = engine.topk(k, dim=-1)
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]


def test_full_distribution_kl_and_tv_match_brute_force_and_pooling_is_a_lower_bound():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 40, generator=generator) * 3
    trainer = log_dist(logits)
    same = DistributionMismatch.of(trainer, *listed_logprobs(listing(trainer, 40)), vocab_size=40).summary()
    assert same["parity/full_kl"] == pytest.approx(0.0, abs=1e-12) and same["parity/support_mismatch_frac"] == 0
    # a perturbed engine with the same support: temperature 0.72 instead of 0.7, no top-p
    trainer_wide, engine_wide = log_dist(logits, top_p=1.0), log_dist(logits, temperature=0.72, top_p=1.0)
    full = DistributionMismatch.of(trainer_wide, *listed_logprobs(listing(engine_wide, 40)), vocab_size=40).summary()
    kl, tv = brute_force_kl_tv(engine_wide, trainer_wide)
    assert full["parity/full_kl"] == pytest.approx(kl, rel=1e-9) and full["parity/full_tv"] == pytest.approx(tv, rel=1e-9)
    assert kl > 1e-4
    pooled = DistributionMismatch.of(trainer_wide, *listed_logprobs(listing(engine_wide, 5)), vocab_size=40).summary()
    # (the "rest" mass is 1 - sum of fp32 probabilities: ~1e-7 rounding)
    assert 0 < pooled["parity/full_kl"] <= kl * (1 + 1e-5) and 0 < pooled["parity/full_tv"] <= tv * (1 + 1e-5)
    assert pooled["parity/full_listed_tokens"] == 5


def test_support_mismatch_is_counted_not_averaged():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0], [2.0, 1.9, 1.8, -3.0]])
    trainer = log_dist(logits, temperature=1.0, top_k=2, top_p=1.0)  # 2 tokens per row in support
    engine = log_dist(logits, temperature=1.0, top_k=3, top_p=1.0)  # row 2: a third token with mass
    result = DistributionMismatch.of(trainer, *listed_logprobs(listing(engine, 4)), vocab_size=4).summary()
    # row 0: the third token's prob is tiny but > 0 on the engine side: the supports differ there too
    assert result["parity/support_mismatch_frac"] == 1.0 and result["parity/full_kl"] is None
    stats = Mismatch.of(torch.tensor([-0.1, float("-inf"), -2.0]), torch.tensor([-0.1, -3.0, -2.5])).summary("p")
    assert stats["p/outside_support_frac"] == pytest.approx(1 / 3) and stats["p/abs_diff_max"] == pytest.approx(0.5)


def test_out_of_support_token_through_trainer_step_is_masked_and_counted(tmp_path):
    config = load_config(None, ["sampling.top_k=1", "train.objective=grpo"])
    tokenizer = build_tokenizer(tmp_path)
    build_model(config, tokenizer, tmp_path)
    trainer = Trainer(config, tmp_path, pad_id=tokenizer.pad_token_id)
    prompt = tokenizer("12+34=", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    inside, outside = int(logits.argmax()), int(logits.argmin())  # top-k 1: only the argmax is in support
    samples = [Sample(prompt, [inside], [0.0], [0]), Sample(prompt, [outside], [-5.0], [0])]
    metrics = trainer.step(samples, torch.tensor([1.0, -1.0]))
    assert metrics["train/skipped_steps"] == 0 and math.isfinite(metrics["train/loss"])
    assert metrics["parity/outside_support_frac"] == pytest.approx(0.5)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
