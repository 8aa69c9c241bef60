"""An independent oracle for the objectives: TRL's GRPOTrainer computes the loss of the same batch.

parityrl's own tests check its formulas against hand computations written by the same people; here
the loss and every parameter's gradient come from TRL's `GRPOTrainer._compute_loss` (its own forward,
logprobs and aggregation) on the same model, sequences, old logprobs and advantages, and must equal
parityrl's (packed scoring + `policy_loss`) to 1e-6. The mappings (what each side calls the objective):

- parityrl `grpo` (token-level PPO-clip, summed over every token of the batch, divided by the token
  count once) = TRL `importance_sampling_level="token"`, `loss_type="bnpo"` on one micro-batch;
- parityrl `gspo` (the sequence's mean log-ratio, clipped, one loss per sequence, mean over sequences)
  = TRL `importance_sampling_level="sequence"`, `loss_type="grpo"`.

A token-level PPO-clip loss written out longhand, per token with Python floats, checks `grpo` without
either library's tensor code.
"""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch

from parityrl.batch import ModelShape, Sample, pack_samples
from parityrl.config import SamplingConfig, TrainConfig
from parityrl.policy import load_policy, load_tokenizer
from parityrl.scoring import score
from parityrl.train.objectives import clip_bounds, policy_loss

ADVANTAGES = [1.0, -0.5, 0.8, -1.2]
COMPLETION_LENGTHS = [5, 3, 6, 4]


# noise on the old logprobs that puts some units inside the clip range and some outside (GSPO's range
# is ±3e-4..4e-4 on a sequence's mean log-ratio, GRPO's ±0.2 on each token's ratio)
NOISE = {"grpo": 0.3, "gspo": 6e-4}


def fixed_batch(model, tokenizer, objective: str) -> tuple[list[Sample], torch.Tensor]:
    """Two prompts of equal length (TRL takes a rectangular prompt block), two completions each of
    different lengths; old logprobs = the model's own plus noise, so ratios spread over both sides of
    the clip range."""
    generator = torch.Generator().manual_seed(3)
    prompts = [tokenizer("12+34=")["input_ids"], tokenizer("56+78=")["input_ids"]]
    assert len(prompts[0]) == len(prompts[1])
    vocab = model.config.vocab_size
    samples = []
    for i, length in enumerate(COMPLETION_LENGTHS):
        completion = torch.randint(3, vocab, (length,), generator=generator).tolist()
        samples.append(Sample(prompts[i // 2], completion, [0.0] * length, [0] * length))
    with torch.no_grad():
        current = score(model, pack_samples(samples, 0, ModelShape.of(model)), SamplingConfig(temperature=1.0), "float32").logprobs
    for row, sample in enumerate(samples):
        noise = NOISE[objective] * torch.randn(len(sample.completion_token_ids), generator=generator)
        sample.logprobs_old = (current[row, : len(sample.completion_token_ids)] + noise).tolist()
    return samples, torch.tensor(ADVANTAGES)


def parityrl_loss(model, samples: list[Sample], advantages: torch.Tensor, objective: str) -> torch.Tensor:
    packed = pack_samples(samples, 0, ModelShape.of(model))
    scored = score(model, packed, SamplingConfig(temperature=1.0), "float32")
    out = policy_loss(scored.logprobs_safe, packed.logprobs_old, advantages, scored.in_support, TrainConfig(objective=objective))
    assert 0 < out.clipped < out.units, (out.clipped, out.units)  # both branches of the clip are exercised
    loss = out.loss_sum / out.units
    loss.backward()
    return loss.detach()


def trl_loss(model, tokenizer, samples: list[Sample], advantages: torch.Tensor, objective: str, tmp_path) -> torch.Tensor:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    low, high = clip_bounds(TrainConfig(objective=objective))
    level, loss_type = {"grpo": ("token", "bnpo"), "gspo": ("sequence", "grpo")}[objective]
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[], bf16=False, per_device_train_batch_size=4, num_generations=4,
        beta=0.0, epsilon=low, epsilon_high=high, temperature=1.0, importance_sampling_level=level, loss_type=loss_type,
        max_completion_length=max(COMPLETION_LENGTHS),
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
        train_dataset=Dataset.from_list([{"prompt": "12+34="}] * 4), processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    width = max(COMPLETION_LENGTHS)
    completion_ids = torch.zeros(len(samples), width, dtype=torch.long)
    completion_mask = torch.zeros(len(samples), width, dtype=torch.long)
    old = torch.zeros(len(samples), width)
    for row, sample in enumerate(samples):
        n = len(sample.completion_token_ids)
        completion_ids[row, :n] = torch.tensor(sample.completion_token_ids)
        completion_mask[row, :n] = 1
        old[row, :n] = torch.tensor(sample.logprobs_old)
    prompt_ids = torch.tensor([s.prompt_token_ids for s in samples])
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
        "num_items_in_batch": completion_mask.sum(),
    }
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("objective", ["grpo", "gspo"])
def test_loss_and_gradients_equal_trl_grpo_trainer(tiny_model_dir, tmp_path, objective):
    if importlib.util.find_spec("trl") is None:  # in the `test` extra: skipped only where someone installed without it
        pytest.skip("TRL is not installed (`pip install -e .[test]`)")
    import trl  # noqa: F401  (installed but broken: an ImportError here fails the test, never a skip)

    tokenizer = load_tokenizer(tiny_model_dir)
    ours = load_policy(tiny_model_dir, "float32", lm_head_fp32=False).train()
    theirs = copy.deepcopy(ours)
    samples, advantages = fixed_batch(ours, tokenizer, objective)
    loss_ours = parityrl_loss(ours, samples, advantages, objective)
    loss_trl = trl_loss(theirs, tokenizer, samples, advantages, objective, tmp_path)
    assert loss_ours.item() == pytest.approx(loss_trl.item(), abs=1e-6)
    assert loss_ours.abs().item() > 1e-3  # a loss that is not trivially zero
    grads_trl = dict(theirs.named_parameters())
    compared = 0
    for name, param in ours.named_parameters():
        other = grads_trl[name].grad
        if param.grad is None and other is None:
            continue
        torch.testing.assert_close(param.grad, other, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        compared += 1
    assert compared == len(list(ours.parameters()))


def test_grpo_equals_ppo_clip_written_out_per_token():
    """PPO-clip per token, with Python floats: loss_t = -min(r_t A, clip(r_t, 1-eps_lo, 1+eps_hi) A),
    averaged over every generated token of the batch (padding excluded)."""
    config = TrainConfig(objective="grpo")
    eps_low, eps_high = clip_bounds(config)
    new = [[-1.0, -0.2, -2.5], [-0.7, -3.0, 0.0]]
    old = [[-1.3, -0.2, -2.0], [-0.1, -3.4, 0.0]]
    mask = [[True, True, True], [True, True, False]]
    advantages = [0.9, -1.1]
    total, count = 0.0, 0
    for row in range(2):
        for t in range(3):
            if not mask[row][t]:
                continue
            ratio = math.exp(new[row][t] - old[row][t])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            total += -min(ratio * advantages[row], clipped * advantages[row])
            count += 1
    out = policy_loss(torch.tensor(new), torch.tensor(old), torch.tensor(advantages), torch.tensor(mask), config)
    assert out.units == count == 5
    assert (out.loss_sum / out.units).item() == pytest.approx(total / count, abs=1e-7)
