"""`parityrl check`: does the engine's logprob mean what the trainer computes, on this model?

Three measurements, all against `parityrl.policy` at the same weights (trainer precision: fp32
master weights, bf16 compute via `policy.compute_context` for bf16 models, fp32 head as configured):

1. static parity: sample completions, recompute every sampled token's processed logprob;
2. inflight update: pause mid-generation, load perturbed weights, resume; tokens of version v are
   compared with a full recompute at v, tokens of v+1 with the reference computation that applied the
   same update at the same position keeping the KV cache (`score_with_kv_switch`), and the v+1
   tokens' distance to a full v+1 recompute is the KV staleness;
3. post-update prompts: new requests for the same prompts after the update must match a full v+1
   recompute. The hazard of fix 2 is put in front of them on every model: before the update a sample
   runs on past one KV block, whose KV v computes and vLLM caches (`cache_hazard_sequence`); after
   it that sequence is requested as a prompt, as a multi-turn episode's next turn would be. Unsalted
   prefix caching (`on`) serves it v's block and misses the v+1 recompute; `versioned` salts it with
   v+1 and recomputes.

In bf16, the static samples are also scored by the trainer in fp32 (`parity_fp32/*`): the distance of
the engine's bf16 arithmetic from the exact model, which no bf16 trainer can get under (on SmolLM2 the
fp32 trainer sits closer to the bf16 engine than the bf16 trainer does: docs/real-model.md).

`--attribute` repeats the measurements with each of the four fixes switched off in turn.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from parityrl.assets import prepare_model
from parityrl.batch import ModelShape, Sample, pack_samples
from parityrl.config import RunConfig, SamplingConfig, deep_merge, parse_overrides
from parityrl.engines import make_engine
from parityrl.engines.base import RolloutEngine
from parityrl.engines.reference import score_with_kv_switch
from parityrl.episodes import ChatCodec, EpisodeLimits, play_group
from parityrl.errors import UserError
from parityrl.hardware import cpu_description
from parityrl.policy import compute_context, export_state_dict, load_policy, load_tokenizer
from parityrl.reward_pool import EnvironmentPool
from parityrl.scoring import DistributionMismatch, Mismatch, listed_logprobs, score
from parityrl.tasks import load_task, task_prompt_ids


@dataclass(frozen=True)
class FixOff:
    """One row of `--attribute`: a fix switched off alone, and the measurement that shows what it is for."""

    overrides: tuple[str, ...]
    judged_on: tuple[str, ...]
    """The metric this fix exists to keep down, first one the row has: on the static samples every row drew
    (`parity_common/*`) where the fix acts on every token, so that a ratio is not a change of samples."""


STATIC_PARITY = ("parity_common/kl", "parity/kl")
FIX_OFF: dict[str, FixOff] = {
    "fix1 off (raw logprobs)": FixOff(("engine.logprobs_mode=raw_logprobs",), STATIC_PARITY),
    "fix2 off (prefix caching + async scheduling at vLLM defaults)": FixOff(
        ("engine.prefix_caching=on", "engine.async_scheduling=null"), ("post_update/kl",)
    ),
    "fix3 off (pause aborts + clears caches)": FixOff(("engine.update_mode=abort",), ("inflight/aborted_frac",)),
    "fix4 off (bf16/model-dtype head, both sides)": FixOff(("engine.lm_head_fp32=false", "model.lm_head_fp32=false"), STATIC_PARITY),
    "fix4 one-sided (fp32 head on engine only)": FixOff(("model.lm_head_fp32=false", "engine.force_one_sided_head=true"), STATIC_PARITY),
}

SHOWN_AT = 3.0
"""A fix shows where switching it off multiplies the mismatch it is judged on by at least this much (fix 3:
where it aborts requests that the configured row keeps). At 2x, 225 tokens let sampling alone show fix 4
on the showcase at 2.4x, which 900 tokens put at 1.4x."""


@dataclass(frozen=True)
class FixEffect:
    """What switching one fix off did, measured against the configured row."""

    row: str
    metric: str | None
    configured: float | None
    off: float | None
    ratio: float | None
    shows: bool | None
    """None: not measured (`--no-inflight` leaves fixes 2 and 3 nothing to act on)."""

    def describe(self) -> str:
        label = self.row.split(" (")[0]
        if self.shows is None:
            return f"{label}: not measured (no {' or '.join(FIX_OFF[self.row].judged_on)} in this check)"
        amount = f"{self.ratio:.3g}×" if self.ratio is not None else f"{self.configured:.3g} → {self.off:.3g}"
        bar = f" ({'≥' if self.shows else '<'} {SHOWN_AT:g}×)" if self.ratio is not None else ""
        return f"{label}: {self.metric} {amount}: {'shows' if self.shows else 'does not show'}{bar}"


def with_fix_off(config: RunConfig, name: str) -> RunConfig:
    """`config` with the fix of `FIX_OFF[name]` switched off."""
    return RunConfig.model_validate(deep_merge(config.model_dump(mode="json"), parse_overrides(list(FIX_OFF[name].overrides))))


def fix_effects(rows: dict[str, dict]) -> list[FixEffect]:
    """Each `--attribute` row of `rows` (a `check --json` output) judged against the configured row."""
    base = rows["configured"]
    effects = []
    for name, fix in FIX_OFF.items():
        if name not in rows:
            continue
        metric = next((m for m in fix.judged_on if base.get(m) is not None and rows[name].get(m) is not None), None)
        if metric is None:
            effects.append(FixEffect(name, None, None, None, None, None))
            continue
        configured, off = float(base[metric]), float(rows[name][metric])
        if metric == "inflight/aborted_frac":
            effects.append(FixEffect(name, metric, configured, off, None, off > 0 and configured == 0))
        else:
            ratio = off / configured if configured > 0 else float("inf")
            effects.append(FixEffect(name, metric, configured, off, ratio, ratio >= SHOWN_AT))
    return effects


@torch.no_grad()
def trainer_logprobs(model: nn.Module, samples: list[Sample], sampling: SamplingConfig, dtype: str) -> list[Tensor]:
    """Full-recompute processed logprobs of each sample's completion, [len(completion)] each (-inf
    outside the trainer's support): `scoring.score`, the trainer's own recompute."""
    scored = score(model, pack_samples(samples, pad_id=0, shape=ModelShape.of(model)), sampling, dtype)
    return [scored.logprobs[row, : len(s.completion_token_ids)] for row, s in enumerate(samples)]


def compare(samples: list[Sample], recomputed: list[Tensor], select=None) -> Mismatch:
    """Engine vs recomputed logprobs over all samples; `select(sample)` -> bool [len(completion)] picks tokens."""
    total = Mismatch()
    for sample, new in zip(samples, recomputed):
        old = torch.tensor(sample.logprobs_old, dtype=torch.float32)
        total = total + Mismatch.of(new, old, None if select is None else select(sample))
    return total


def perturbed_weights(model: nn.Module, scale: float, seed: int) -> dict[str, Tensor]:
    """Weights + gaussian noise of `scale` × each tensor's std: a stand-in for one optimiser step.
    Names that share one tensor (tied input embedding and head) get the same noise, as an optimiser
    step would give them: noised apart, the engine (which loads only the embedding of a tied pair)
    and the trainer (whose last-loaded name wins) ran different heads (post_update/kl 1e-4)."""
    generator = torch.Generator().manual_seed(seed)
    perturbed: dict[str, Tensor] = {}
    by_storage: dict[int, Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key not in by_storage:
            std = tensor.float().std().nan_to_num(0.0) if tensor.numel() > 1 else torch.tensor(0.0)
            by_storage[key] = (tensor.float() + scale * std * torch.randn(tensor.shape, generator=generator)).to(tensor.dtype)
        perturbed[name] = by_storage[key]
    return perturbed


async def generate_all(engine: RolloutEngine, prompts: list[list[int]], sampling: SamplingConfig, tag: str, top_logprobs: int = 0) -> list[Sample]:
    extra = {"top_logprobs": top_logprobs} if top_logprobs else {}
    groups = await asyncio.gather(*(engine.generate(p, sampling, f"{tag}-{i}", **extra) for i, p in enumerate(prompts)))
    return [s for group in groups for s in group]


FULL_VOCAB_LIMIT = 4096
"""Up to this vocabulary size `--full-vocab` asks the engine for every token's logprob; above it, for
the top `FULL_VOCAB_TOP_K` (the rest pooled into one outcome: lower bounds of KL and TV)."""
FULL_VOCAB_TOP_K = 1024


def full_vocab_k(model_dir) -> int:
    from parityrl.preflight import model_vocab_size, read_hf_config

    vocab = model_vocab_size(read_hf_config(model_dir))
    if vocab is None:
        raise UserError(f"check --full-vocab: {model_dir}/config.json does not say the vocabulary size (vocab_size).")
    return vocab if vocab <= FULL_VOCAB_LIMIT else FULL_VOCAB_TOP_K


@torch.no_grad()
def full_distribution_mismatch(model: nn.Module, samples: list[Sample], sampling: SamplingConfig, dtype: str) -> dict:
    """`parity/full_kl`, `parity/full_tv`, `parity/support_mismatch_frac` of the engine's listed
    processed logprobs (`Sample.top_logprobs_old`) against the trainer's whole processed distribution."""
    packed = pack_samples(samples, pad_id=0, shape=ModelShape.of(model))
    trainer_rows = score(model, packed, sampling, dtype, keep_distribution=True).log_distribution  # [N, V], sample by sample
    ids, logprobs = listed_logprobs([entry for s in samples for entry in (s.top_logprobs_old or [])])
    if ids.shape[0] != trainer_rows.shape[0]:
        raise RuntimeError(f"the engine listed top logprobs for {ids.shape[0]} positions, the samples have {trainer_rows.shape[0]}")
    return DistributionMismatch.of(trainer_rows, ids, logprobs, trainer_rows.shape[-1]).summary("parity")


async def run_check(
    config: RunConfig,
    num_prompts: int = 16,
    inflight: bool = True,
    perturb_scale: float = 0.05,
    full_vocab: bool = False,
    engine: RolloutEngine | None = None,
    kept: dict | None = None,
) -> dict:
    """All measurements for one configuration; returns metric-name → value.

    `engine`: a started engine on `config`'s model and engine settings to measure instead of starting
    one (a notebook's, or the test suite's shared one). It is left running, back on the model's own
    weights (a new version) when the inflight measurement perturbed them. `kept`: receives the static
    samples and the trainer's logprobs of them (`samples`, `recomputed`), for `common_samples`."""
    task = load_task(config.task)
    model_dir = prepare_model(config, task)
    tokenizer = load_tokenizer(model_dir)
    episodes = _episode_setup(config, model_dir, tokenizer) if task.environment is not None else None
    prompts = [task_prompt_ids(tokenizer, task, p.prompt) for p in task.eval[:num_prompts]]
    sampling = config.sampling
    trainer_sampling = config.trainer_sampling()
    dtype = config.model.dtype
    model_v0 = load_policy(model_dir, "float32", config.model.lm_head_fp32).eval()
    top_logprobs = full_vocab_k(model_dir) if full_vocab else 0
    if full_vocab and config.engine.kind != "vllm":
        raise UserError("check --full-vocab compares vLLM's listed logprobs with the trainer: it needs engine.kind=vllm.")
    owned = engine is None
    if engine is None:
        engine = make_engine(config, model_dir, max_logprobs=top_logprobs or None)
        await engine.start()
    elif engine.settings().get("logprobs_mode", config.engine.logprobs_mode) != config.engine.logprobs_mode:
        raise UserError(f"check: the engine given reports {engine.settings()['logprobs_mode']}, the config asks for {config.engine.logprobs_mode}.")
    # float results depend on the CPU's vector units (bf16 above all): the row says which it ran on
    result: dict = {"settings": engine.settings() | {"cpu": cpu_description()}}
    try:
        if episodes is not None:  # whole episodes with the environment; the inflight part on their first prompts
            samples = await play_all(engine, episodes, task.eval[:num_prompts], sampling, "static")
            prompts = [list(p) for p in dict.fromkeys(tuple(s.prompt_token_ids) for s in samples)]
            result |= per_turn_parity(samples, trainer_logprobs(model_v0, samples, trainer_sampling, dtype))
        else:
            samples = await generate_all(engine, prompts, sampling, "static", top_logprobs)
        recomputed = trainer_logprobs(model_v0, samples, trainer_sampling, dtype)
        result |= compare(samples, recomputed, sampled_tokens).summary("parity")
        if kept is not None:
            kept |= {"samples": samples, "recomputed": recomputed}
        if dtype != "float32":  # how far the engine's low-precision arithmetic alone sits from the exact model
            result |= compare(samples, trainer_logprobs(model_v0, samples, trainer_sampling, "float32")).summary("parity_fp32")
        if full_vocab:
            result |= full_distribution_mismatch(model_v0, samples, trainer_sampling, dtype)
        if inflight:
            result |= await _inflight(engine, model_v0, prompts, sampling, trainer_sampling, dtype, perturb_scale)
    finally:
        if episodes is not None:
            episodes[0].close()
        if owned:
            await engine.close()
        elif inflight:
            await engine.update_weights(export_state_dict(model_v0), version=engine.version + 1)
    return result


def sampled_tokens(sample: Sample) -> Tensor:
    """bool [len(completion)]: the tokens the policy sampled (all of a single-turn sample's)."""
    return torch.tensor(sample.sampled_mask if sample.sampled_mask is not None else [True] * len(sample.completion_token_ids))


def _episode_setup(config: RunConfig, model_dir, tokenizer) -> Episodes:
    """The environment workers, the chat codec (its template checked) and the episode limits of `config`."""
    from parityrl.preflight import model_context, read_hf_config

    codec = ChatCodec(tokenizer, config.task.system_prompt)
    codec.preflight([{"role": "user", "content": "1"}], tokenizer.eos_token_id)
    context = model_context(read_hf_config(model_dir)) or 1 << 40
    limits = EpisodeLimits(config.task.max_turns, min(config.task.max_episode_tokens or context, context))
    return EnvironmentPool.from_config(config.task), codec, limits


Episodes = tuple[EnvironmentPool, ChatCodec, EpisodeLimits]


async def play_all(engine: RolloutEngine, episodes: Episodes, problems, sampling: SamplingConfig, tag: str) -> list[Sample]:
    """`sampling.n` episodes of each problem, as Samples (their sampled tokens marked)."""
    envs, codec, limits = episodes
    groups = await asyncio.gather(*(play_group(engine.generate, envs, codec, p, sampling, limits, f"{tag}-{i}") for i, p in enumerate(problems)))
    return [episode.to_sample() for group in groups for episode in group]


def per_turn_parity(samples: list[Sample], recomputed: list[Tensor]) -> dict:
    """`parity/kl_per_turn`: k3 of each turn's sampled tokens, turn 1 first (`Sample.turn_per_token`)."""
    turns = max((max(s.turn_per_token(), default=0) for s in samples), default=0) + 1
    per_turn = []
    for turn in range(turns):
        def select(sample: Sample, turn: int = turn) -> Tensor:
            return sampled_tokens(sample) & (torch.tensor(sample.turn_per_token(), dtype=torch.long) == turn)

        per_turn.append(compare(samples, recomputed, select).summary("p")["p/kl"])
    turns_played = [s.turn_per_token()[-1] + 1 for s in samples if s.completion_token_ids]
    return {"parity/kl_per_turn": per_turn, "episode/turns": sum(turns_played) / max(len(turns_played), 1)}


HAZARD_TOKENS = 32
"""Tokens sampled (EOS ignored) by the requests after the update that continue the hazard sequence."""
HAZARD_TAIL = 8
"""Tokens of the hazard sequence after its first KV block (computed afresh by every request)."""


async def cache_hazard_sequence(engine: RolloutEngine, prompt: list[int], sampling: SamplingConfig) -> list[int] | None:
    """Fix 2's hazard, built at version v: a sample of `prompt` run on past EOS until prompt and
    completion fill the KV blocks the prompt starts, and HAZARD_TAIL tokens more. vLLM caches the blocks of generated tokens as
    it does a prompt's, so that sequence's first block now holds KV computed by v, as a multi-turn
    episode's history does; asked for again as a prompt after the update, unsalted caching serves it.
    (A made-up prompt of the task's prompts end to end showed little: past EOS on text it never saw the
    tiny model is certain, logprob 0 under either weights.) None where the engine has no block cache
    (the reference engine) or the context cannot hold the sequence and a continuation."""
    settings = engine.settings()
    block_size, max_model_len = settings.get("block_size"), settings.get("max_model_len")
    length = (len(prompt) // block_size + 1) * block_size + HAZARD_TAIL if block_size else 0
    if not block_size or not max_model_len or length + HAZARD_TOKENS > max_model_len:
        return None
    run_on = sampling.model_copy(update={"max_new_tokens": length - len(prompt), "ignore_eos": True})
    first, *_ = await engine.generate(prompt, run_on, "hazard-at-v")
    return (list(prompt) + list(first.completion_token_ids))[:length]


async def _inflight(engine, model_v0, prompts, sampling, trainer_sampling, dtype, perturb_scale) -> dict:
    long_sampling = sampling.model_copy(update={"max_new_tokens": max(sampling.max_new_tokens, 96), "ignore_eos": True})
    new_weights = perturbed_weights(model_v0, perturb_scale, seed=17)
    model_v1 = load_policy_like(model_v0, new_weights)
    hazard = await cache_hazard_sequence(engine, prompts[0], sampling)  # its first block cached at v
    tokens_before = _tokens_out(engine)
    generation = asyncio.create_task(generate_all(engine, prompts, long_sampling, "inflight"))
    await _wait_for_progress(engine, generation, tokens_before)
    if getattr(getattr(engine, "config", None), "update_mode", "keep") == "keep":
        # freeze the requests where they are first: the update then lands a few tokens in, not after the
        # weights are serialised (past EOS a tiny model is certain, and staleness would have nothing to show)
        await engine.pause()
        await engine.update_weights(new_weights, version=engine.version + 1)
        await engine.resume()
    else:  # the naive abort-mode update, as `update_weights` does it (what the fix-3 row measures)
        await engine.update_weights(new_weights, version=engine.version + 1)
    samples = await generation
    v1 = engine.version
    spanning = [s for s in samples if s.mixed_version]
    result: dict = {
        "inflight/sequences": len(samples),
        "inflight/spanning_frac": len(spanning) / max(1, len(samples)),
        "inflight/aborted_frac": sum(s.finish_reason == "abort" for s in samples) / max(1, len(samples)),
    }
    before = compare(samples, trainer_logprobs(model_v0, samples, trainer_sampling, dtype),
                     select=lambda s: torch.tensor(s.version_per_token) < v1)
    result |= before.summary("inflight_v")
    # a request that waited in vLLM's queue across the update, served prompt blocks its siblings built
    # at v, computed the rest of its prompt at v+1: no reference model knows which positions were which
    replayable = [s for s in spanning if not (s.kv_version is not None and s.kv_version < s.version_per_token[0] and s.cached_prompt_tokens)]
    result["inflight/unreplayable_frac"] = 1 - len(replayable) / len(spanning) if spanning else None
    kept_kv = []
    with torch.no_grad(), compute_context(dtype):
        for sample in replayable:
            switch = sample.version_per_token.index(v1)
            kept_kv.append(score_with_kv_switch(model_v0, model_v1, sample.prompt_token_ids, sample.completion_token_ids, switch, trainer_sampling))
    after_select = lambda s: torch.tensor(s.version_per_token) == v1  # noqa: E731
    result |= compare(replayable, kept_kv, select=after_select).summary("inflight_v1_kept_kv")
    full_v1 = trainer_logprobs(model_v1, spanning, trainer_sampling, dtype) if spanning else []
    result["pipeline/kv_staleness_kl"] = compare(spanning, full_v1, select=after_select).summary("stale")["stale/kl"]
    # new requests after the update: must be pure v+1 (unsalted prefix caching reuses v-built prompt KV)
    fresh = await generate_all(engine, prompts, sampling, "post-update")
    recomputed = trainer_logprobs(model_v1, fresh, trainer_sampling, dtype)
    if hazard is not None:
        continuing = sampling.model_copy(update={"max_new_tokens": HAZARD_TOKENS, "ignore_eos": True})
        hazard_samples = await generate_all(engine, [hazard], continuing, "post-update-hazard")
        fresh, recomputed = fresh + hazard_samples, recomputed + trainer_logprobs(model_v1, hazard_samples, trainer_sampling, dtype)
    result |= compare(fresh, recomputed).summary("post_update")
    result["post_update/hazard_prompt_tokens"] = len(hazard) if hazard is not None else 0
    result["post_update/cached_prompt_frac"] = (sum(s.cached_prompt_tokens or 0 for s in fresh)
                                                / max(1, sum(len(s.prompt_token_ids) for s in fresh)))
    return result


def load_policy_like(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(state_dict)
    return clone.eval()


def _tokens_out(engine: RolloutEngine) -> int:
    """Tokens the engine has produced so far, counted as they stream (not when requests finish)."""
    detail = engine.health().detail
    return int(detail.get("streamed_tokens", detail.get("generated_tokens", 0)))


async def _wait_for_progress(engine: RolloutEngine, generation: asyncio.Task, tokens_before: int, timeout_s: float = 60.0) -> None:
    """Wait until the engine is decoding these requests, so the update lands mid-generation."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline and not generation.done():
        if _tokens_out(engine) > tokens_before:
            return
        await asyncio.sleep(0.005)


def run_check_matrix(config: RunConfig, attribute: bool, num_prompts: int, inflight: bool, full_vocab: bool = False) -> dict[str, dict]:
    """The configured settings, and with `attribute` each fix off in turn (one engine at a time)."""
    kept: dict[str, dict] = {"configured": {}}
    rows = {"configured": asyncio.run(run_check(config, num_prompts, inflight, full_vocab=full_vocab, kept=kept["configured"]))}
    if attribute:
        for name in FIX_OFF:
            kept[name] = {}
            rows[name] = asyncio.run(run_check(with_fix_off(config, name), num_prompts, inflight, full_vocab=full_vocab, kept=kept[name]))
        for name, measured in common_samples(kept).items():
            rows[name] |= measured
    return rows


def common_samples(kept: dict[str, dict]) -> dict[str, dict]:
    """Each row's mismatch on the static samples whose tokens are the same in every row. The rows sample the
    same prompts with the same seeds, but a setting that moves the logits (the head's dtype) changes a few
    samples: comparing rows on their own samples would mix that change into a row's ratio."""
    tokens = {name: [tuple(s.completion_token_ids) for s in rows["samples"]] for name, rows in kept.items() if rows}
    counts = {len(lists) for lists in tokens.values()}
    if len(counts) != 1:
        return {}
    (count,) = counts
    common = [i for i in range(count) if len({lists[i] for lists in tokens.values()}) == 1]
    measured = {}
    for name in tokens:
        samples, recomputed = kept[name]["samples"], kept[name]["recomputed"]
        mismatch = compare([samples[i] for i in common], [recomputed[i] for i in common], sampled_tokens) if common else None
        measured[name] = {"parity/same_samples_frac": len(common) / count if count else 0.0} | (mismatch.summary("parity_common") if mismatch else {})
    return measured
