"""Reference engine: sampling semantics, inflight updates with kept KV cache, the full RL loop."""

from __future__ import annotations

import asyncio
import json

import torch

from parityrl.config import SamplingConfig, load_config
from parityrl.engines.reference import ReferenceEngine, score_with_kv_switch
from parityrl.policy import load_policy, load_tokenizer, processed_logprobs, sequence_logits
from parityrl.scoring import k3
from parityrl.tasks import encode_prompt


def full_recompute(model, prompt_ids, completion_ids, sampling: SamplingConfig) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = sequence_logits(model, ids, torch.ones_like(ids))[0, len(prompt_ids) - 1 : -1]
    return processed_logprobs(logits, torch.tensor(completion_ids), sampling.temperature, sampling.top_k, sampling.top_p)


def perturbed_state(model, scale: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: t + scale * t.float().std().nan_to_num(0.0) * torch.randn(t.shape, generator=generator)
        for name, t in model.state_dict().items()
    }


def test_inflight_update_keeps_kv_and_tags_versions(tiny_model_dir):
    # ignore_eos: 24 tokens per sequence, so the update lands mid-sequence however fast the wave decodes;
    # no truncation: past EOS the tiny model is sure of EOS, and a top-p cut would make those logprobs
    # exactly 0 under both weights, hiding the staleness this test must see
    sampling = SamplingConfig(temperature=1.3, max_new_tokens=24, n=4, ignore_eos=True)
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = encode_prompt(tokenizer, "12+34=")
    model_v0 = load_policy(tiny_model_dir, "float32", lm_head_fp32=True).eval()
    new_weights = perturbed_state(model_v0, 0.05, seed=3)
    model_v1 = load_policy(tiny_model_dir, "float32", lm_head_fp32=True).eval()
    model_v1.load_state_dict(new_weights)

    async def scenario():
        engine = ReferenceEngine(tiny_model_dir, "float32", lm_head_fp32=True, seed=0)
        await engine.start()
        await engine.pause()  # hold the wave at its first decode step until we choose the switch
        generation = asyncio.create_task(engine.generate(prompt, sampling, "r0"))
        await asyncio.sleep(0.2)
        await engine.resume()
        await asyncio.sleep(0.01)
        await engine.update_weights(new_weights, version=1)
        samples = await generation
        await engine.close()
        return samples

    samples = asyncio.run(scenario())
    spanning = [s for s in samples if s.mixed_version]
    assert spanning, f"no sequence spans the update: {[s.version_per_token for s in samples]}"
    stale_k3 = []
    with torch.no_grad():
        for sample in spanning:
            switch = sample.version_per_token.index(1)
            assert sample.version_per_token == [0] * switch + [1] * (len(sample.version_per_token) - switch)
            old = torch.tensor(sample.logprobs_old)
            kept_kv = score_with_kv_switch(model_v0, model_v1, prompt, sample.completion_token_ids, switch, sampling)
            at_v0 = full_recompute(model_v0, prompt, sample.completion_token_ids, sampling)
            at_v1 = full_recompute(model_v1, prompt, sample.completion_token_ids, sampling)
            assert (old[:switch] - at_v0[:switch]).abs().max() <= 1e-5
            assert (old - kept_kv).abs().max() <= 1e-5
            stale_k3.append(k3(at_v1[switch:] - old[switch:]).mean().item())
    # the kept KV cache was built by v0: a full v1 recompute differs, and we must be able to see it
    assert max(stale_k3) > 1e-8


def test_rl_loop_end_to_end_through_pipeline(tiny_model_dir, tmp_path):
    from parityrl.pipeline import run_training

    config = load_config(
        None,
        [
            "engine.kind=reference",
            f"model.path={tiny_model_dir}",
            "train.steps=4",
            "train.prompts_per_step=4",
            "train.eval_every=2",
            "sampling.n=4",
            "sampling.max_new_tokens=6",
            "task.eval_size=32",
            "logging.tensorboard=false",
        ],
    )
    summary = asyncio.run(run_training(config, tmp_path / "async"))
    records = [json.loads(line) for line in (tmp_path / "async" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    assert [r["version"] for r in steps] == [1, 2, 3, 4]
    assert max(r["pipeline/lag_max"] for r in steps) >= 1  # generation overlapped training
    assert all(0 <= r["rl/reward"] <= 1 and r["rl/entropy"] > 0 for r in steps)
    assert (tmp_path / "async" / "checkpoints" / "step_000004" / "model.safetensors").is_file()
    assert summary["checkpoint"].endswith("step_000004")
    assert "eval_success_end" in summary

    # lag 0 (synchronous): every sequence is the trainer's own version -> pure parity, same math
    sync = config.model_copy(update={"pipeline": config.pipeline.model_copy(update={"mode": "sync"})})
    asyncio.run(run_training(sync, tmp_path / "sync"))
    records = [json.loads(line) for line in (tmp_path / "sync" / "metrics.jsonl").read_text().splitlines()]
    for record in (r for r in records if r["step"] > 0):
        assert record["parity/coverage"] > 0.99
        assert record["parity/kl"] <= 1e-9
        assert record["parity/abs_diff_max"] <= 1e-5
        assert record["pipeline/lag_max"] == 0


def test_check_on_reference_engine_reports_exact_parity_and_kv_staleness(tiny_model_dir):
    from parityrl.parity.check import run_check

    config = load_config(
        None,
        # T 1.3, no truncation: the check's inflight generation runs past EOS, where the tiny model is nearly
        # sure of EOS; at T 0.7 / top-p 0.9 every later logprob is (nearly) 0 under both weights, so the
        # staleness vanished whenever the update landed after the answer (the reference engine is fast)
        [f"model.path={tiny_model_dir}", "engine.kind=reference", "sampling.temperature=1.3", "sampling.n=4"],
    )
    result = asyncio.run(run_check(config, num_prompts=4))
    assert result["parity/tokens"] > 0 and result["parity/kl"] <= 1e-9
    assert result["inflight/spanning_frac"] > 0 and result["inflight/aborted_frac"] == 0
    assert result["inflight_v/kl"] <= 1e-9
    assert result["inflight_v1_kept_kv/kl"] <= 1e-9  # same update, same position, KV kept
    assert result["pipeline/kv_staleness_kl"] > 1e-8  # ...which a full recompute does not reproduce
    assert result["post_update/kl"] <= 1e-9


def test_pipeline_inflight_updates_change_versions_within_sequences(tiny_model_dir, tmp_path):
    """Through the whole pipeline: long generations keep the engine busy, so trainer updates land
    mid-sequence. Versions must then change inside sequences, and the trainer, which holds the
    weights of the newest version, must report the KV staleness of that version's tokens."""
    from parityrl.pipeline import run_training

    config = load_config(
        None,
        [
            "engine.kind=reference",
            f"model.path={tiny_model_dir}",
            "train.steps=6",
            "train.prompts_per_step=2",
            "train.eval_every=6",
            "sampling.n=4",
            "sampling.max_new_tokens=48",
            "sampling.ignore_eos=true",
            "pipeline.max_lag=1",
            "task.eval_size=16",
            "logging.tensorboard=false",
        ],
    )
    asyncio.run(run_training(config, tmp_path / "run"))
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["step"] > 0]
    assert max(r["pipeline/mixed_version_frac"] for r in steps) > 0, [r["pipeline/mixed_version_frac"] for r in steps]
    staleness = [r["pipeline/kv_staleness_kl"] for r in steps if r["pipeline/kv_staleness_kl"] is not None]
    assert staleness and all(value >= 0 for value in staleness) and max(staleness) > 0


def test_evaluation_covers_eval_path_and_keeps_every_completion(tiny_model_dir, tmp_path):
    """A JSONL task with a `task.eval_path` set: both sets are decoded at the start and the end, every
    completion is kept with its split and what the math_verify reward read, and the logged metrics are the
    records' own counts (the tiny model answers with a bare number: never a marked answer)."""
    from parityrl.pipeline import run_training

    def write(path, pairs):
        path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a, b in pairs))
        return path

    train = write(tmp_path / "train.jsonl", [(a, b) for a in range(10, 40) for b in range(10, 20)])
    ood = write(tmp_path / "ood.jsonl", [(a, b) for a in range(50, 60) for b in range(3)])
    config = load_config(None, [
        "engine.kind=reference", f"model.path={tiny_model_dir}", "task.kind=jsonl", f"task.path={train}", f"task.eval_path={ood}",
        "task.reward=math_verify", "task.eval_size=16", "train.steps=2", "train.prompts_per_step=2", "sampling.n=2",
        "sampling.max_new_tokens=6", "logging.tensorboard=false",
    ])  # fmt: skip
    summary = asyncio.run(run_training(config, tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for version, row in ((0, rows[0]), (2, rows[-1])):
        records = [json.loads(line) for line in (tmp_path / "run" / "eval_episodes" / f"v{version:06d}.jsonl").read_text().splitlines()]
        by_split = {split: [r for r in records if r["split"] == split] for split in ("held_out", "ood")}
        assert (len(by_split["held_out"]), len(by_split["ood"])) == (16, 30)
        assert {r["prompt"] for r in by_split["ood"]} == {f"{a}+{b}=" for a in range(50, 60) for b in range(3)}
        for split, prefix in (("held_out", "eval/"), ("ood", "eval/ood_")):
            kept = by_split[split]
            assert row[f"{prefix}success"] == sum(r["reward"] >= 1 for r in kept) / len(kept)
            assert row[f"{prefix}last_number_correct"] == sum(r["last_number_correct"] for r in kept) / len(kept)
            assert row[f"{prefix}answered"] == 0.0 and all(r["answer_form"] in ("last_line", "") for r in kept)
    assert summary["eval_start"] == {k: v for k, v in rows[0].items() if k.startswith("eval/")}
    assert summary["eval_end"]["eval/ood_success"] == rows[-1]["eval/ood_success"]
