"""The scoring module: full-distribution mismatch against a brute-force oracle, and out-of-support
tokens through the real Trainer.step (they must be counted, never turn into -inf/NaN in a loss)."""

from __future__ import annotations

import math

import pytest
import torch

from parityrl.assets import build_model, build_tokenizer
from parityrl.batch import ModelShape, Sample, pack_samples
from parityrl.config import load_config
from parityrl.policy import sampling_logits
from parityrl.scoring import DistributionMismatch, Mismatch, listed_logprobs
from parityrl.train.trainer import Trainer


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


def test_shared_prompt_rows_give_the_per_sample_logprobs_and_compute_each_prompt_once(tmp_path):
    """Packing a group's completions after one copy of their prompt (block attention mask) must give
    every token the logprob of a forward pass over that sample alone — with penalties (which count the
    prompt), an empty completion and prompts of different lengths. Broken once: positions counted
    along the row instead of per sequence (position_ids = arange(L)) gives |diff| 0.024."""
    from parityrl.policy import apply_penalties, processed_logprobs, sequence_logits
    from parityrl.scoring import score

    config = load_config(None, ["sampling.temperature=0.7", "sampling.top_p=0.9", "sampling.repetition_penalty=1.3"])
    tokenizer = build_tokenizer(tmp_path)
    build_model(config, tokenizer, tmp_path)
    trainer = Trainer(config, tmp_path, pad_id=tokenizer.pad_token_id)
    model, sampling = trainer.model.eval(), config.trainer_sampling()
    generator = torch.Generator().manual_seed(0)
    samples = []
    for prompt_len in (4, 11, 7):
        prompt = torch.randint(3, 100, (prompt_len,), generator=generator).tolist()
        for length in (5, 0, 1, 8, 3):
            completion = torch.randint(3, 100, (length,), generator=generator).tolist()
            samples.append(Sample(prompt, completion, [0.0] * length, [0] * length))
    with torch.no_grad():
        packed = pack_samples(samples, tokenizer.pad_token_id, ModelShape.of(model))
        shared = score(model, packed, sampling, "float32").logprobs
        assert packed.input_ids.shape[0] == 3  # one row per prompt: each prompt computed once
        for row, sample in enumerate(samples):
            count = len(sample.completion_token_ids)
            if not count:
                assert not packed.completion_mask[row].any()
                continue
            ids = torch.tensor([sample.prompt_token_ids + sample.completion_token_ids])
            logits = sequence_logits(model, ids, torch.ones_like(ids))[:, len(sample.prompt_token_ids) - 1 : -1]
            completion = torch.tensor([sample.completion_token_ids])
            prompt = ids[:, : len(sample.prompt_token_ids)]
            every = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
            penalised = apply_penalties(logits, prompt, every(prompt), completion, every(completion), sampling)
            alone = processed_logprobs(penalised, completion, sampling.temperature, sampling.top_k, sampling.top_p)[0]
            both = torch.isfinite(alone)
            assert torch.equal(both, torch.isfinite(shared[row, :count]))
            assert (shared[row, :count][both] - alone[both]).abs().max() <= 1e-5


def test_completions_share_a_row_only_where_it_saves_compute():
    from parityrl.batch import completions_per_row

    demo, wide = ModelShape(256, 512), ModelShape(768, 2048)
    assert completions_per_row(9, 4.0, 8, demo) == 8  # short answers after a prompt: all share it
    assert completions_per_row(70, 20.0, 8, demo) == 8
    # 86-token completions after a 12-token prompt: a row of 8 would make the L×L attention dominate
    assert completions_per_row(12, 86.0, 8, wide) <= 3
    assert completions_per_row(12, 86.0, 8, None) == 8 and completions_per_row(5, 3.0, 1, demo) == 1


def full_logits_logprobs(model, packed, sampling) -> torch.Tensor:
    """The unchunked recompute the trainer used before chunking: [B, T, V] logits for the whole batch,
    penalised and processed at once. The oracle the chunked path must equal."""
    from parityrl.policy import apply_penalties, processed_logprobs

    bias = packed.attention_bias(torch.float32)
    logits = model(input_ids=packed.input_ids, attention_mask=bias, position_ids=packed.position_ids, use_cache=False).logits
    logits_completion = logits[packed.sample_row.unsqueeze(-1), packed.logit_index]  # [B, T, V]
    penalised = apply_penalties(logits_completion, packed.prompt_ids, packed.prompt_mask, packed.completion_ids, packed.completion_mask, sampling)
    logprobs = processed_logprobs(penalised, packed.completion_ids, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
    return torch.where(packed.completion_mask, logprobs, torch.zeros_like(logprobs))


def test_chunked_scoring_equals_the_whole_batch_logits_and_their_gradient(tmp_path, monkeypatch):
    """The trainer never holds [tokens x vocabulary]: head, penalties and the processed distribution run on
    chunks of positions, recomputed in backward. Logprobs and every parameter's gradient must equal the
    whole-batch computation (fp32, top-k + top-p + min-p + all three penalties, 7-position chunks so a
    chunk boundary falls inside sequences). Broken once: a chunk's penalties counted one token too many
    (positions + 1 in PolicyScorer) moved tokens across the support boundary."""
    import parityrl.scoring as scoring

    overrides = [
        "sampling.temperature=0.7", "sampling.top_k=80", "sampling.top_p=0.9", "sampling.min_p=0.02",
        "sampling.repetition_penalty=1.3", "sampling.presence_penalty=0.4", "sampling.frequency_penalty=0.2",
        "train.activation_checkpointing=false",
    ]
    config = load_config(None, overrides)
    tokenizer = build_tokenizer(tmp_path)
    build_model(config, tokenizer, tmp_path)
    model = Trainer(config, tmp_path, pad_id=tokenizer.pad_token_id).model.eval()
    sampling = config.trainer_sampling()
    generator = torch.Generator().manual_seed(1)
    samples = []
    for prompt_len in (5, 9, 7, 4):
        prompt = torch.randint(3, 100, (prompt_len,), generator=generator).tolist()
        for length in (6, 0, 11, 3):
            # few distinct tokens, so the penalties' counts are > 1
            completion = torch.randint(3, 20, (length,), generator=generator).tolist()
            samples.append(Sample(prompt, completion, [0.0] * length, [0] * length))
    packed = pack_samples(samples, tokenizer.pad_token_id, ModelShape.of(model))
    weights = torch.randn(packed.completion_ids.shape, generator=generator)

    def loss_and_grads(logprobs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        (torch.where(valid, logprobs, torch.zeros_like(logprobs)) * weights).sum().backward()
        return logprobs.detach(), [p.grad.clone() for p in model.parameters()]

    expected = full_logits_logprobs(model, packed, sampling)
    valid = packed.completion_mask & torch.isfinite(expected)
    assert valid.sum() >= 15 and (packed.completion_mask & ~valid).sum() > 0  # some tokens fall outside top-k/top-p/min-p
    expected, expected_grads = loss_and_grads(expected, valid)
    monkeypatch.setattr(scoring, "SCORE_CHUNK_ELEMENTS", 7 * config.model.vocab_size)
    scored = scoring.score(model, packed, sampling, "float32")
    assert torch.equal(scored.in_support, valid)
    got, grads = loss_and_grads(scored.logprobs, scored.in_support)
    assert (got[valid] - expected[valid]).abs().max() <= 1e-6
    # gradients: relative to each tensor's largest entry (the sums run in another order)
    relative = max(float((g - e).abs().max() / e.abs().max().clamp(min=1e-12)) for g, e in zip(grads, expected_grads))
    assert relative <= 1e-5


def test_micro_batches_respect_the_token_budget_and_keep_order():
    from parityrl.train.trainer import micro_batches

    def sample(prompt: int, completion: int) -> Sample:
        return Sample([1] * prompt, [2] * completion, [0.0] * completion, [0] * completion)

    samples = [sample(10, 30), sample(10, 50), sample(10, 100), sample(10, 5), sample(10, 5), sample(10, 5)]
    assert micro_batches(samples, max_sequences=64, max_tokens=100) == [[0, 1], [2], [3, 4, 5]]  # 40+60; 110 alone; 3x15
    assert micro_batches(samples, max_sequences=2, max_tokens=10_000) == [[0, 1], [2, 3], [4, 5]]


# The peak the chunked head exists to avoid, measured in a fresh process (this one's peak RSS is
# whatever earlier tests reached). A 1-layer body under a 49k-vocabulary head (SmolLM2's width of
# vocabulary), 8 samples x 120 generated tokens, top-k + top-p, forward and backward.
CHUNK_MEMORY_PROBE = r"""
import json, sys
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
import parityrl.scoring as scoring
from parityrl.batch import ModelShape, Sample, pack_samples
from parityrl.config import SamplingConfig
from parityrl.memory import release_free_memory

if sys.argv[1] == "unchunked":  # what PolicyScorer did before chunking: the whole batch at once
    scoring.SCORE_CHUNK_ELEMENTS = 1 << 40
torch.manual_seed(0)
torch.set_num_threads(1)
vocab = 49152
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
model.config._attn_implementation = "eager"
generator = torch.Generator().manual_seed(1)
samples = [Sample(torch.randint(3, vocab, (8,), generator=generator).tolist(), torch.randint(3, vocab, (120,), generator=generator).tolist(),
                  [0.0] * 120, [0] * 120) for _ in range(8)]
packed = pack_samples(samples, 0, ModelShape.of(model))
sampling = SamplingConfig(temperature=0.7, top_k=200, top_p=0.9)
scoring.score(model, pack_samples(samples[:1], 0, ModelShape.of(model)), sampling, "float32")  # warm-up: kernels, allocator
release_free_memory()
status = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0])  # kiB
before_kib = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from now: imports and set-up do not count
scored = scoring.score(model, packed, sampling, "float32")
scored.logprobs_safe.sum().backward()
peak_kib = status("VmHWM")
print(json.dumps({"positions": int(packed.completion_mask.sum()), "vocab": vocab, "extra_mib": (peak_kib - before_kib) / 1024}))
"""


def test_chunked_scoring_bounds_the_peak_memory_of_a_large_vocabulary():
    """The reason chunking exists, measured: the peak memory of scoring 960 positions of a 49k
    vocabulary (forward + backward) stays below one [positions x vocabulary] fp32 tensor, where the
    whole-batch head needs several of them. Measured here: 113 MiB chunked (model gradients and a few
    [85, V] chunk copies); 1002 MiB with chunking off (`CHUNK_MEMORY_PROBE unchunked`: one chunk, no
    recompute), which fails the bound."""
    import json
    import os
    import subprocess
    import sys

    def extra_peak_mib(mode: str) -> dict:
        # a fixed mmap threshold: glibc's default one grows with every large free, after which freed
        # chunks stay in the heap and the peak RSS counts them as if live (662 MiB measured, not 113)
        environment = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run([sys.executable, "-c", CHUNK_MEMORY_PROBE, mode], capture_output=True, text=True, timeout=300, env=environment)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    chunked = extra_peak_mib("chunked")
    one_logits_mib = chunked["positions"] * chunked["vocab"] * 4 / 2**20  # 180 MiB
    print(f"\nchunked scoring: {chunked['extra_mib']:.0f} MiB above the model (one [N, V] fp32 tensor: {one_logits_mib:.0f} MiB)")
    assert chunked["extra_mib"] <= one_logits_mib, chunked
