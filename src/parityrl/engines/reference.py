"""Reference engine: a batched, KV-cached torch sampler — the ground truth for every parity check.

It samples from exactly the distribution `policy.processed_logprobs` describes, and applies weight
updates between decode steps while keeping the KV cache of sequences in flight, as vLLM does with
`pause_generation(mode="keep")`. A background thread runs the decode loop (torch releases the GIL),
so generation continues while the trainer works.

Scheduling is by waves: queued requests with the same sampling parameters are prefilled together and
decoded until all are finished; requests that arrive meanwhile join the next wave.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from parityrl.batch import Sample
from parityrl.config import SamplingConfig
from parityrl.decoding import decode_batch, greedy_picker, left_pad
from parityrl.engines.base import EngineHealth, Weights, weight_items
from parityrl.policy import (
    apply_penalties,
    compute_context,
    has_penalties,
    load_policy,
    penalize_logits,
    processed_logprobs,
    sample_tokens,
    token_counts,
)


class SamplingPicker:
    """`TokenPicker` that samples every row from the processed distribution of `sampling`.

    With a penalty on it also keeps, per row, what vLLM's input batch keeps for it
    (vllm/v1/worker/gpu_input_batch.py: prompt token ids, output token ids): which tokens the prompt
    holds and how often each token has been picked so far, so step t is penalised for the prompt and
    the first t tokens, as `policy.apply_penalties` replays it.
    """

    def __init__(self, sampling: SamplingConfig, generator: torch.Generator, prompts: list[list[int]]):
        self.sampling = sampling
        self.generator = generator
        self.prompts = prompts
        self.in_prompt: Tensor | None = None  # [batch, vocab] bool, built at the first step (vocab known)
        self.output_counts: Tensor | None = None  # [batch, vocab] fp32 count of each token picked so far

    def _penalised(self, logits: Tensor) -> Tensor:
        if self.in_prompt is None or self.output_counts is None:
            prompt_ids, prompt_mask = left_pad(self.prompts, pad_id=0)
            self.in_prompt = token_counts(prompt_ids, prompt_mask, logits.shape[-1]) > 0
            self.output_counts = torch.zeros(logits.shape, dtype=torch.float32)
        return penalize_logits(logits, self.in_prompt, self.output_counts, self.sampling)

    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        s = self.sampling
        penalties = has_penalties(s)
        if penalties:
            logits = self._penalised(logits)
        chosen = sample_tokens(logits, s.temperature, s.top_k, s.top_p, self.generator, min_p=s.min_p)
        logprobs = processed_logprobs(logits, chosen, s.temperature, s.top_k, s.top_p, min_p=s.min_p)
        if penalties:
            assert self.output_counts is not None
            # finished rows keep being picked for; their tokens are discarded, so counting them is harmless
            self.output_counts.scatter_add_(1, chosen.unsqueeze(-1), torch.ones(chosen.shape[0], 1))
        return chosen, logprobs


@torch.no_grad()
def score_with_kv_switch(
    model_old: nn.Module,
    model_new: nn.Module,
    prompt_ids: list[int],
    completion_ids: list[int],
    switch_index: int,
    sampling: SamplingConfig,
) -> Tensor:
    """Processed logprobs [len(completion)] of a completion sampled across an inflight weight update
    that kept the KV cache — what vLLM (`pause(mode="keep")`) and this engine compute.

    `switch_index` = k is the first completion token sampled by the new weights. When the update
    lands, the cache holds the prompt and completion[:k-1] computed by the old weights; completion[k-1]
    was sampled but not yet fed, so its KV (and everything after) is computed by the new weights.
    k == 0 (not prefilled before the update) means all new weights. Compare with a full recompute
    under `model_new` to measure the KV staleness.
    """
    targets = torch.tensor(completion_ids, dtype=torch.long)
    if switch_index <= 0 or switch_index >= len(completion_ids):
        model = model_new if switch_index <= 0 else model_old
        ids = torch.tensor([prompt_ids + completion_ids])
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1]
    else:
        prefix = torch.tensor([prompt_ids + completion_ids[: switch_index - 1]])
        rest = torch.tensor([completion_ids[switch_index - 1 : -1]])
        out_old = model_old(input_ids=prefix, use_cache=True)
        positions = torch.arange(prefix.shape[1], prefix.shape[1] + rest.shape[1]).unsqueeze(0)
        out_new = model_new(input_ids=rest, past_key_values=out_old.past_key_values, position_ids=positions, use_cache=True)
        logits = torch.cat([out_old.logits[0, len(prompt_ids) - 1 :], out_new.logits[0]])
    penalised = apply_penalties(
        logits.unsqueeze(0),
        torch.tensor([prompt_ids]),
        torch.ones(1, len(prompt_ids), dtype=torch.bool),
        targets.unsqueeze(0),
        torch.ones(1, len(completion_ids), dtype=torch.bool),
        sampling,
    )[0]
    return processed_logprobs(penalised, targets, sampling.temperature, sampling.top_k, sampling.top_p, min_p=sampling.min_p)


@dataclass
class _Request:
    prompt_token_ids: list[int]
    sampling: SamplingConfig
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    greedy_max_new_tokens: int | None = None
    """Set for a greedy (evaluation) request: decode argmax up to this many tokens; result = token ids."""


@dataclass
class _Update:
    state_dict: Mapping[str, Tensor]
    version: int
    done: threading.Event = field(default_factory=threading.Event)


class ReferenceEngine:
    """Plain-torch `RolloutEngine`. Runs its decode loop in a background thread."""

    name = "reference"

    def __init__(self, model_dir: Path, model_dtype: str, lm_head_fp32: bool, seed: int, max_batch: int = 256, threads: int = 1):
        self.model_dir = Path(model_dir)
        self.model_dtype = model_dtype
        self.lm_head_fp32 = lm_head_fp32
        self.max_batch = max_batch
        self.threads = threads
        self.version = 0
        self.generator = torch.Generator().manual_seed(seed)
        self._queue: list[_Request] = []
        self._update: _Update | None = None
        self._paused = False
        self._closed = False
        self._inflight = 0
        self._generated_tokens = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.model: nn.Module | None = None
        self.eos_id: int | None = None

    async def start(self) -> None:
        from transformers import GenerationConfig

        self.model = load_policy(self.model_dir, self.model_dtype, self.lm_head_fp32).eval()
        self.eos_id = int(GenerationConfig.from_pretrained(str(self.model_dir)).eos_token_id)
        self._thread = threading.Thread(target=self._run, name="reference-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig, request_id: str) -> list[Sample]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        with self._cond:
            self._queue.append(_Request(list(prompt_token_ids), sampling, future, loop))
            self._cond.notify_all()
        return await future

    async def greedy(self, prompts: list[list[int]], max_new_tokens: int, request_id: str) -> list[list[int]]:
        loop = asyncio.get_running_loop()
        futures = []
        with self._cond:
            for prompt in prompts:
                future: asyncio.Future = loop.create_future()
                # the sampling field only groups greedy requests into waves of their own (its n counts toward the wave size)
                self._queue.append(_Request(list(prompt), SamplingConfig(n=2, max_new_tokens=max_new_tokens), future, loop, max_new_tokens))
                futures.append(future)
            self._cond.notify_all()
        return list(await asyncio.gather(*futures))

    async def update_weights(self, state_dict: Weights, version: int) -> None:
        # chunks are fetched here, not in the decode thread (which holds the condition while it applies them)
        update = _Update(await asyncio.to_thread(lambda: dict(weight_items(state_dict))), version)
        with self._cond:
            self._update = update
            self._cond.notify_all()
        await asyncio.to_thread(update.done.wait)

    async def pause(self) -> None:
        with self._cond:
            self._paused = True

    async def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def health(self) -> EngineHealth:
        alive = self._thread is not None and self._thread.is_alive()
        return EngineHealth(
            ok=alive and not self._closed,
            version=self.version,
            inflight_requests=self._inflight,
            detail={"generated_tokens": self._generated_tokens},
        )

    def settings(self) -> dict:
        return {
            "engine": "reference",
            "dtype": self.model_dtype,
            "logprobs_mode": "processed_logprobs",
            "lm_head_fp32": self.lm_head_fp32,
            "torch": torch.__version__,
        }

    async def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # --- background thread -------------------------------------------------------------------
    def _apply_pending_update(self) -> None:
        """Called with the condition held, between decode steps: the KV cache of the wave is kept."""
        update = self._update
        if update is None:
            return
        assert self.model is not None
        with torch.no_grad():
            params = self.model.state_dict()
            for name, tensor in update.state_dict.items():
                params[name].copy_(tensor)
        self.version = update.version
        self._update = None
        update.done.set()

    def _between_steps(self, _step: int) -> None:
        with self._cond:
            self._apply_pending_update()
            while self._paused and not self._closed:
                self._cond.wait(timeout=0.1)
                self._apply_pending_update()

    def _take_wave(self) -> list[_Request]:
        first = self._queue[0]
        wave, rest, rows = [], [], 0
        for request in self._queue:
            same = request.sampling == first.sampling and request.greedy_max_new_tokens == first.greedy_max_new_tokens
            if same and rows + request.sampling.n <= max(self.max_batch, first.sampling.n):
                wave.append(request)
                rows += request.sampling.n
            else:
                rest.append(request)
        self._queue = rest
        return wave

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        # bf16 weights compute like the trainer's bf16 (fast emulation on CPUs without bf16 units)
        with compute_context(self.model_dtype):
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cond:
                self._apply_pending_update()
                while not self._closed and (self._paused or not self._queue):
                    self._cond.wait(timeout=0.1)
                    self._apply_pending_update()
                if self._closed:
                    for request in self._queue:
                        request.loop.call_soon_threadsafe(request.future.cancel)
                    return
                wave = self._take_wave()
                self._inflight = len(wave)
            try:
                results = self._run_wave(wave)
                for request, samples in zip(wave, results):
                    request.loop.call_soon_threadsafe(_set_result, request.future, samples)
            except Exception as error:  # surface engine failures to every waiting caller
                for request in wave:
                    request.loop.call_soon_threadsafe(_set_exception, request.future, error)
            finally:
                self._inflight = 0

    def _run_wave(self, wave: list[_Request]) -> list:
        assert self.model is not None and self.eos_id is not None
        if wave[0].greedy_max_new_tokens is not None:
            tokens, _, _ = decode_batch(
                self.model, [r.prompt_token_ids for r in wave], wave[0].greedy_max_new_tokens, self.eos_id, greedy_picker, self._between_steps
            )
            return tokens
        sampling = wave[0].sampling
        prompts = [request.prompt_token_ids for request in wave for _ in range(request.sampling.n)]
        versions_at_step: list[int] = []

        def before_step(step: int) -> None:
            self._between_steps(step)
            versions_at_step.append(self.version)
            self._generated_tokens += len(prompts) if step else 0

        tokens, logprobs, finish = decode_batch(
            self.model,
            prompts,
            sampling.max_new_tokens,
            self.eos_id,
            SamplingPicker(sampling, self.generator, prompts),
            before_step,
            ignore_eos=sampling.ignore_eos,
        )
        samples = [
            Sample(prompt, toks, lps, versions_at_step[: len(toks)], reason)
            for prompt, toks, lps, reason in zip(prompts, tokens, logprobs, finish)
        ]
        grouped, cursor = [], 0
        for request in wave:
            grouped.append(samples[cursor : cursor + request.sampling.n])
            cursor += request.sampling.n
        return grouped


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)

