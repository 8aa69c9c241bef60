"""The online RL loop (PipelineRL-style, local mode).

async: the engine generates continuously; the trainer takes `prompts_per_step` finished groups,
steps, publishes version v+1 and the engine applies it inflight (requests keep running). At most
`max_inflight_groups` groups are generating or waiting for the trainer, which bounds staleness;
groups whose oldest token is more than `max_lag` versions behind are dropped and counted.
sync: generate a batch, train on it, update, repeat (no overlap; for debugging).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from parityrl.assets import (
    encode_prompt,
    greedy_success,
    load_tokenizer,
    prepare_model,
    progress_bar,
)
from parityrl.config import RunConfig
from parityrl.engines import make_engine
from parityrl.engines.base import RolloutEngine, Sample
from parityrl.metrics import MetricsLogger, write_json_atomic
from parityrl.policy import compute_context
from parityrl.tasks import Problem, Task, load_task
from parityrl.train.objectives import group_advantages
from parityrl.train.trainer import Trainer


@dataclass
class Group:
    problem: Problem
    samples: list[Sample]
    rewards: list[float]

    @property
    def oldest_version(self) -> int:
        return min((min(s.version_per_token) for s in self.samples if s.version_per_token), default=1 << 40)

    @property
    def tokens(self) -> int:
        return sum(len(s.completion_token_ids) for s in self.samples)


def completion_text(tokenizer, sample: Sample) -> str:
    return tokenizer.decode(sample.completion_token_ids, skip_special_tokens=True)


def evaluate(model, tokenizer, task: Task, max_new_tokens: int, dtype: str = "float32") -> float:
    """Greedy success rate on the held-out split."""
    was_training = model.training
    with compute_context(dtype):
        success = greedy_success(model, tokenizer, task, task.eval)
    if was_training:
        model.train()
    return success


class Rollouts:
    """Keeps the engine busy with prompt groups and hands finished ones to the trainer."""

    def __init__(self, engine: RolloutEngine, config: RunConfig, task: Task, tokenizer):
        self.engine, self.config, self.task, self.tokenizer = engine, config, task, tokenizer
        self.rng = random.Random(config.seed)
        self.ready: asyncio.Queue[Group] = asyncio.Queue()
        max_lag = config.pipeline.max_lag if config.pipeline.max_lag is not None else 1
        limit = config.pipeline.max_inflight_groups or config.train.prompts_per_step * max(1, max_lag)
        self.slots = asyncio.Semaphore(limit)
        self.generating = 0
        self.generated_tokens = 0
        self.engine_idle_s = 0.0
        self._idle_since: float | None = time.perf_counter()
        self._counter = 0
        self._tasks: set[asyncio.Task] = set()

    async def one_group(self, problem: Problem) -> Group:
        self._counter += 1
        self._mark_busy()
        try:
            samples = await self.engine.generate(
                encode_prompt(self.tokenizer, problem.prompt), self.config.sampling, f"g{self._counter}"
            )
        finally:
            self._mark_done()
        rewards = [self.task.reward(completion_text(self.tokenizer, s), problem.answer) for s in samples]
        group = Group(problem, samples, rewards)
        self.generated_tokens += group.tokens
        return group

    def _mark_busy(self) -> None:
        if self.generating == 0 and self._idle_since is not None:
            self.engine_idle_s += time.perf_counter() - self._idle_since
            self._idle_since = None
        self.generating += 1

    def _mark_done(self) -> None:
        self.generating -= 1
        if self.generating == 0:
            self._idle_since = time.perf_counter()

    def idle_seconds(self) -> float:
        extra = time.perf_counter() - self._idle_since if self._idle_since is not None else 0.0
        return self.engine_idle_s + extra

    async def produce_forever(self) -> None:
        while True:
            await self.slots.acquire()
            problem = self.task.sample_train(self.rng, 1)[0]
            task = asyncio.create_task(self._produce_one(problem))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _produce_one(self, problem: Problem) -> None:
        await self.ready.put(await self.one_group(problem))

    async def take(self, count: int, trainer_version: int, max_lag: int) -> tuple[list[Group], int]:
        """`count` groups no staler than max_lag; returns (groups, dropped)."""
        groups, dropped = [], 0
        while len(groups) < count:
            group = await self.ready.get()
            self.slots.release()
            if group.oldest_version < trainer_version - max_lag:
                dropped += 1
                continue
            groups.append(group)
        return groups, dropped

    async def probe(self, count: int) -> list[Sample]:
        """Samples for the parity probe (not trained on, not counted in rollout throughput)."""
        problems = self.task.sample_train(self.rng, count)
        self._counter += 1
        groups = await asyncio.gather(
            *(
                self.engine.generate(encode_prompt(self.tokenizer, p.prompt), self.config.sampling, f"probe{self._counter}-{i}")
                for i, p in enumerate(problems)
            )
        )
        return [s for group in groups for s in group]

    async def sync_batch(self, count: int) -> list[Group]:
        problems = self.task.sample_train(self.rng, count)
        return list(await asyncio.gather(*(self.one_group(p) for p in problems)))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def batch_tensors(groups: list[Group], advantage_kind: str) -> tuple[list[Sample], torch.Tensor, torch.Tensor]:
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)  # [groups, n]
    advantages = group_advantages(rewards, advantage_kind)
    samples = [s for g in groups for s in g.samples]
    return samples, advantages.flatten(), rewards


async def run_training(config: RunConfig, run_dir: Path, console: Console | None = None) -> dict:
    """Full run: assets, engine, RL loop, metrics, checkpoint. Returns a summary dict."""
    console = console or Console()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = load_task(config.task)
    model_dir = prepare_model(config, task)  # SFT warm-up if not cached (one thread, deterministic)
    # from here on the engine and the trainer share the cores: the split is explicit
    torch.set_num_threads(config.train.threads)
    tokenizer = load_tokenizer(model_dir)
    trainer = Trainer(config, model_dir, pad_id=tokenizer.pad_token_id or 0)
    engine = make_engine(config, model_dir)
    console.print(f"[bold]engine[/bold] {config.engine.kind}: starting …")
    await engine.start()
    settings = engine.settings()
    write_json_atomic(run_dir / "engine_settings.json", settings)
    console.print(f"[bold]engine settings in force[/bold]: {settings}")
    wandb_config = config.model_dump() if config.logging.wandb else None
    logger = MetricsLogger(run_dir, tensorboard=config.logging.tensorboard, wandb_config=wandb_config)
    rollouts = Rollouts(engine, config, task, tokenizer)
    summary: dict = {"engine": config.engine.kind, "model_dir": str(model_dir)}
    producer: asyncio.Task | None = None
    probe_task: asyncio.Task | None = None
    try:
        success_start = await asyncio.to_thread(evaluate, trainer.model, tokenizer, task, config.sampling.max_new_tokens, config.model.dtype)
        logger.log(0, {"eval/success": success_start})
        summary["eval_success_start"] = success_start
        console.print(f"held-out success before RL: [bold]{success_start:.3f}[/bold]")
        # max_lag 0 admits only samples of the current version: that is the synchronous loop
        max_lag = config.pipeline.max_lag if config.pipeline.max_lag is not None else 1 << 40
        if config.pipeline.mode == "async" and max_lag > 0:
            producer = asyncio.create_task(rollouts.produce_forever())
        rl_start = last_time = time.perf_counter()
        last_tokens, trainer_wait_s, eval_success = 0, 0.0, success_start
        probe_count = config.pipeline.parity_probe_prompts if producer is not None else 0
        probe_task = asyncio.create_task(rollouts.probe(probe_count)) if probe_count else None
        with progress_bar() as progress:
            bar = progress.add_task("RL", total=config.train.steps, info="")
            for step in range(1, config.train.steps + 1):
                wait_start = time.perf_counter()
                if producer is not None:
                    if producer.done():
                        producer.result()  # re-raise a crashed producer
                    groups, dropped = await rollouts.take(
                        config.train.prompts_per_step, trainer.version, max_lag
                    )
                else:
                    groups, dropped = await rollouts.sync_batch(config.train.prompts_per_step), 0
                waited = time.perf_counter() - wait_start
                trainer_wait_s += waited
                samples, advantages, rewards = batch_tensors(groups, config.train.advantage)
                probe = await probe_task if probe_task is not None else None
                metrics = await asyncio.to_thread(trainer.step, samples, advantages, probe)
                sync_start = time.perf_counter()
                await engine.update_weights(trainer.state_dict_for_engines(), trainer.version)
                metrics["perf/weight_sync_s"] = time.perf_counter() - sync_start
                if probe_count:
                    probe_task = asyncio.create_task(rollouts.probe(probe_count))
                now = time.perf_counter()
                metrics |= {
                    "rl/reward": float(rewards.mean()),
                    "rl/success": float((rewards >= 1).float().mean()),
                    "pipeline/dropped_groups": dropped,
                    "perf/rollout_tok_s": (rollouts.generated_tokens - last_tokens) / max(now - last_time, 1e-9),
                    "perf/engine_idle_frac": rollouts.idle_seconds() / max(now - rl_start, 1e-9),
                    "perf/trainer_idle_frac": trainer_wait_s / max(now - rl_start, 1e-9),
                    "version": trainer.version,
                    "time_s": now - rl_start,
                }
                last_time, last_tokens = now, rollouts.generated_tokens
                if step % config.train.eval_every == 0 or step == config.train.steps:
                    eval_success = await asyncio.to_thread(
                        evaluate, trainer.model, tokenizer, task, config.sampling.max_new_tokens, config.model.dtype
                    )
                    metrics["eval/success"] = eval_success
                logger.log(step, metrics)
                if config.train.checkpoint_every and step % config.train.checkpoint_every == 0:
                    await asyncio.to_thread(trainer.save_checkpoint, run_dir / "checkpoint", tokenizer)
                progress.update(
                    bar,
                    advance=1,
                    info=f"reward {metrics['rl/reward']:.2f} · eval {eval_success:.2f} · clip {metrics['rl/clip_rate'] or 0:.3f}",
                )
        rl_seconds = time.perf_counter() - rl_start
        busy_seconds = max(rl_seconds - rollouts.idle_seconds(), 1e-9)
        summary |= {
            "eval_success_end": eval_success,
            "rl_seconds": round(rl_seconds, 1),
            "steps": config.train.steps,
            "rollout_tokens": rollouts.generated_tokens,
            # wall-clock rate, and the rate while the engine had work (the trainer can be the bottleneck)
            "rollout_tok_s": round(rollouts.generated_tokens / rl_seconds, 1),
            "rollout_busy_tok_s": round(rollouts.generated_tokens / busy_seconds, 1),
        }
        await asyncio.to_thread(trainer.save_checkpoint, run_dir / "checkpoint", tokenizer)
    finally:
        for background in (producer, probe_task):
            if background is not None:
                background.cancel()
                await asyncio.gather(background, return_exceptions=True)
        await rollouts.stop()
        await engine.close()
        logger.close()
    write_json_atomic(run_dir / "summary.json", summary)
    return summary
