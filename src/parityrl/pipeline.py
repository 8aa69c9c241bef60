"""The online RL loop (PipelineRL-style, local mode).

async: the engine generates continuously; the trainer takes `prompts_per_step` finished groups,
steps, publishes version v+1 and the engine applies it inflight (requests keep running). At most
`max_inflight_groups` groups are generating or waiting for the trainer, which bounds staleness;
groups whose oldest token is more than `max_lag` versions behind are dropped and counted.
sync: generate a batch, train on it, update, repeat (no overlap; for debugging).

A run either finishes or stops with one message and a resumable checkpoint:
- the engine is supervised (`engines.supervisor`): every call has a deadline, a dead or hung engine
  is restarted with the current weights and its in-flight groups are generated again;
- rewards run in worker processes with a timeout (`rewards.RewardPool`); a failing reward scores 0
  and is counted, more than `MAX_REWARD_ERROR_FRAC` failures in one step stop the run;
- a step with a NaN/inf logprob, loss or gradient is skipped; `MAX_SKIPPED_IN_A_ROW` in a row stop it;
- a failure in any background task reaches this loop; SIGINT/SIGTERM stop at the next step boundary;
- checkpoints (`train.checkpoint`) let `parityrl train --resume RUN_DIR` continue with each step once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from parityrl.assets import load_tokenizer, prepare_model, task_prompt_ids
from parityrl.config import RunConfig
from parityrl.engines import make_engine
from parityrl.engines.supervisor import EngineGaveUp, SupervisedEngine
from parityrl.errors import UserError
from parityrl.evaluate import evaluate
from parityrl.metrics import MetricsLogger, truncate_metrics, write_json_atomic
from parityrl.progress import progress_bar
from parityrl.rewards import RewardItem, RewardPool
from parityrl.scoring import NO_VERSION, Sample
from parityrl.tasks import Problem, Task, check_prompt_lengths, load_task
from parityrl.train.checkpoint import RunState, latest_checkpoint, load_run_state, save_checkpoint
from parityrl.train.objectives import group_advantages
from parityrl.train.trainer import Trainer

MAX_REWARD_ERROR_FRAC = 0.10
"""More failed rewards than this in one step's batch stop the run: the reward itself is broken."""
MAX_SKIPPED_IN_A_ROW = 3
"""Consecutive non-finite steps that stop the run (one is noise, three is a diverged model or bad data)."""


class RunStopped(UserError):
    """The run cannot go on; the message says why and how to resume (exit status 1)."""

    exit_code = 1


@dataclass
class Group:
    problem: Problem
    samples: list[Sample]
    rewards: list[float]
    reward_errors: list[str] = field(default_factory=list)
    group_id: int = 0
    """Unique within a run, across resumes and engine restarts (a regenerated group keeps its id)."""

    @property
    def oldest_version(self) -> int:
        return min((s.oldest_version for s in self.samples), default=NO_VERSION)

    @property
    def tokens(self) -> int:
        return sum(len(s.completion_token_ids) for s in self.samples)


def completion_text(tokenizer, sample: Sample) -> str:
    return tokenizer.decode(sample.completion_token_ids, skip_special_tokens=True)


class Rollouts:
    """Keeps the engine busy with prompt groups and hands finished ones to the trainer.

    Every group drawn from the sampler is tracked in `pending` until the trainer takes it, so a
    checkpoint can record what was drawn but not trained on, and a resume regenerates it first."""

    def __init__(
        self,
        engine: SupervisedEngine,
        config: RunConfig,
        task: Task,
        tokenizer,
        rewards: RewardPool,
        log,
        sampler_state=None,
        requeue: list[Problem] | None = None,
        group_counter: int = 0,
    ):
        self.engine, self.config, self.task, self.tokenizer, self.rewards, self.log = engine, config, task, tokenizer, rewards, log
        self.rng = random.Random(config.seed)
        if sampler_state is not None:
            self.rng.setstate(sampler_state)
        self.requeue: deque[Problem] = deque(requeue or [])
        self.pending: dict[int, Problem] = {}
        self.ready: asyncio.Queue[tuple[int, Group]] = asyncio.Queue()
        self.failure: asyncio.Future = asyncio.get_running_loop().create_future()
        max_lag = config.pipeline.max_lag if config.pipeline.max_lag is not None else 1
        limit = config.pipeline.max_inflight_groups or config.train.prompts_per_step * max(1, max_lag)
        self.slots = asyncio.Semaphore(limit)
        self.generating = 0
        self.generated_tokens = 0
        self.reward_errors_reported = False
        self.engine_idle_s = 0.0
        self._idle_since: float | None = time.perf_counter()
        self._counter = group_counter
        self._tasks: set[asyncio.Task] = set()

    def next_problem(self) -> Problem:
        return self.requeue.popleft() if self.requeue else self.task.sample_train(self.rng, 1)[0]

    def undrained(self) -> list[Problem]:
        """Problems drawn but not trained on, in the order a resume should regenerate them."""
        return list(self.requeue) + list(self.pending.values())

    @property
    def group_counter(self) -> int:
        return self._counter

    async def one_group(self, problem: Problem, request_id: str, group_id: int = 0) -> Group:
        self._mark_busy()
        try:
            samples = await self.engine.generate(task_prompt_ids(self.tokenizer, self.task, problem.prompt), self.config.sampling, request_id)
        finally:
            self._mark_done()
        items = [RewardItem(completion_text(self.tokenizer, s), problem.answer, problem.prompt) for s in samples]
        results = await self.rewards.score(items)
        errors = [r.error for r in results if r.error is not None]
        if errors and not self.reward_errors_reported:
            self.reward_errors_reported = True  # once per run: the per-step count is in pipeline/reward_errors
            self.log(f"reward failed (scored 0): {errors[0]} — prompt {problem.prompt!r}, completion {items[0].completion!r}")
        group = Group(problem, samples, [r.value for r in results], errors, group_id)
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

    def _fail(self, error: BaseException) -> None:
        if not self.failure.done():
            self.failure.set_exception(error)

    def start(self) -> asyncio.Task:
        producer = asyncio.create_task(self._produce_forever())
        producer.add_done_callback(lambda task: None if task.cancelled() or task.exception() is None else self._fail(task.exception()))
        return producer

    async def _produce_forever(self) -> None:
        while True:
            await self.slots.acquire()
            self._counter += 1
            group_id, problem = self._counter, self.next_problem()
            self.pending[group_id] = problem
            task = asyncio.create_task(self._produce_one(group_id, problem))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _produce_one(self, group_id: int, problem: Problem) -> None:
        delivered = False
        try:
            group = await self.one_group(problem, f"g{group_id}", group_id)
            self.ready.put_nowait((group_id, group))
            delivered = True
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # reaches the main loop through take()
            self._fail(error)
        finally:
            if not delivered:
                self.slots.release()

    async def take(self, count: int, trainer_version: int, max_lag: int, deadline_s: float) -> tuple[list[Group], int]:
        """`count` groups no staler than max_lag; returns (groups, dropped). Raises what a background
        task raised, or RunStopped when no group arrives within `deadline_s`."""
        groups, dropped = [], 0
        while len(groups) < count:
            group_id, group = await self._next_ready(deadline_s)
            self.slots.release()
            self.pending.pop(group_id, None)
            if group.oldest_version < trainer_version - max_lag:
                dropped += 1
                continue
            groups.append(group)
        return groups, dropped

    async def _next_ready(self, deadline_s: float) -> tuple[int, Group]:
        if self.ready.empty() and self.failure.done():
            raise self.failure.exception()
        getter = asyncio.ensure_future(self.ready.get())
        done, _ = await asyncio.wait({getter, self.failure}, timeout=deadline_s, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self.failure.done():
            raise self.failure.exception()
        raise RunStopped(f"no prompt group finished within {deadline_s:.0f} s although the engine reports no failure")

    async def probe(self, count: int) -> list[Sample]:
        """Samples for the parity probe (not trained on, not counted in rollout throughput)."""
        problems = self.task.sample_train(self.rng, count)
        self._counter += 1
        groups = await asyncio.gather(
            *(
                self.engine.generate(task_prompt_ids(self.tokenizer, self.task, p.prompt), self.config.sampling, f"probe{self._counter}-{i}")
                for i, p in enumerate(problems)
            )
        )
        return [s for group in groups for s in group]

    async def sync_batch(self, count: int) -> list[Group]:
        problems = [self.next_problem() for _ in range(count)]
        first = self._counter + 1
        self._counter += count
        return list(await asyncio.gather(*(self.one_group(p, f"g{first + i}", first + i) for i, p in enumerate(problems))))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def batch_tensors(groups: list[Group], advantage_kind: str) -> tuple[list[Sample], torch.Tensor, torch.Tensor]:
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)  # [groups, n]
    advantages = group_advantages(rewards, advantage_kind)
    samples = [s for g in groups for s in g.samples]
    return samples, advantages.flatten(), rewards


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (with a checkpoint); a second
    signal falls back to the default behaviour, so a stuck run can still be interrupted."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._installed: list[signal.Signals] = []

    def __enter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._installed.append(sig)
        return self

    def _on_signal(self, sig: signal.Signals) -> None:
        self.received = sig.name
        asyncio.get_running_loop().remove_signal_handler(sig)

    def __exit__(self, *exc_info) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)


async def run_training(config: RunConfig, run_dir: Path, console: Console | None = None, resume: bool = False) -> dict:
    """Full run: assets, engine, RL loop, metrics, checkpoints. Returns the summary dict.

    resume: continue from RUN_DIR's newest checkpoint (model, optimizer, step, version, RNG, sampler,
    groups drawn but not trained on); metrics.jsonl is cut back to that step so each step is logged once."""
    console = console or Console()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = load_task(config.task)
    model_dir = prepare_model(config, task)  # SFT warm-up if not cached (one thread, deterministic)
    # from here on the engine and the trainer share the cores: the split is explicit
    torch.set_num_threads(config.train.threads)
    tokenizer = load_tokenizer(model_dir)
    context = _model_context(model_dir)
    if context is not None:
        check_prompt_lengths(task, tokenizer, lambda tok, prompt: task_prompt_ids(tok, task, prompt), context, config.sampling.max_new_tokens)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        console.print(f"[yellow]{run_dir} has no complete checkpoint yet: starting from step 0[/yellow]")
    trainer = Trainer(config, checkpoint or model_dir, pad_id=tokenizer.pad_token_id or 0)
    state = load_run_state(checkpoint, trainer.optimizer) if checkpoint is not None else None
    start_step = state.step if state is not None else 0
    counters: dict[str, float] = dict(state.counters) if state is not None else {}
    if state is not None:
        trainer.version = state.version
        console.print(f"[bold]resuming[/bold] {run_dir} at step {start_step} (policy v{state.version}) from {checkpoint.name}")
    truncate_metrics(run_dir, start_step if resume else -1)
    engine = SupervisedEngine(lambda: make_engine(config, model_dir), config.engine, log=lambda line: console.print(f"[yellow]{line}[/yellow]"))
    if trainer.version > 0:
        engine.publish(trainer.state_dict_for_engines(), trainer.version)
    rewards = RewardPool.from_config(config.task)
    console.print(f"[bold]engine[/bold] {config.engine.kind}: starting …")
    wandb_config = config.model_dump() if config.logging.wandb else None
    logger: MetricsLogger | None = None
    rollouts: Rollouts | None = None
    producer: asyncio.Task | None = None
    probe_task: asyncio.Task | None = None
    summary: dict = {"engine": config.engine.kind, "model_dir": str(model_dir)}
    step = start_step
    try:
        await engine.start()
        settings = engine.settings()
        write_json_atomic(run_dir / "engine_settings.json", settings)
        console.print(f"[bold]engine settings in force[/bold]: {settings}")
        logger = MetricsLogger(run_dir, tensorboard=config.logging.tensorboard, wandb_config=wandb_config, purge_step=start_step + 1)
        rollouts = Rollouts(
            engine, config, task, tokenizer, rewards, log=lambda line: console.print(f"[yellow]{line}[/yellow]"),
            sampler_state=state.sampler_state if state is not None else None,
            requeue=state.pending_prompts if state is not None else None,
            group_counter=int(counters.get("group_counter", 0)),
        )

        def held_out_success() -> float:
            return evaluate(trainer.model, tokenizer, task, rewards.score_sync, config.model.dtype, config.sampling.max_new_tokens)

        def checkpoint_now(extra_pending: list[Problem] = ()) -> RunState:
            run_state = RunState(
                step=step,
                version=trainer.version,
                sampler_state=rollouts.rng.getstate(),
                pending_prompts=list(extra_pending) + rollouts.undrained(),
                counters=dict(counters),
                eval_success=eval_success,
            )
            save_checkpoint(run_dir, trainer.model, trainer.optimizer, tokenizer, run_state)
            return run_state

        async def stop_run(reason: str, extra_pending: list[Problem] = ()) -> RunStopped:
            await asyncio.to_thread(checkpoint_now, extra_pending)
            return RunStopped(
                f"the run stopped at step {step}: {reason}. A checkpoint of step {step} is in {run_dir}/checkpoints; "
                f"fix the cause, then continue with `parityrl train --resume {run_dir}`."
            )

        if state is None:
            eval_success = await asyncio.to_thread(held_out_success)
            logger.log(0, {"eval/success": eval_success})
            counters["eval_success_start"] = eval_success
        else:
            eval_success = state.eval_success
        summary["eval_success_start"] = counters.get("eval_success_start")
        console.print(f"held-out success before RL: [bold]{counters.get('eval_success_start', float('nan')):.3f}[/bold]")
        # max_lag 0 admits only samples of the current version: that is the synchronous loop
        max_lag = config.pipeline.max_lag if config.pipeline.max_lag is not None else 1 << 40
        if config.pipeline.mode == "async" and max_lag > 0:
            producer = rollouts.start()
        # a batch can take several group deadlines (queued behind others, an engine restart or two)
        take_deadline_s = config.engine.request_timeout_s * (config.engine.max_restarts + 2)
        rl_start = last_time = time.perf_counter()
        rl_seconds_before = counters.get("rl_seconds", 0.0)
        totals_before = dict(counters)  # run totals up to the checkpoint; this session's counts add to them
        last_tokens, trainer_wait_s, skipped_in_a_row = 0, 0.0, 0
        restarts_seen, requeued_seen = engine.restarts, engine.requeued_groups
        probe_count = config.pipeline.parity_probe_prompts if producer is not None else 0
        probe_task = asyncio.create_task(rollouts.probe(probe_count)) if probe_count else None
        with StopSignals() as signals, progress_bar() as progress:
            bar = progress.add_task("RL", total=config.train.steps, completed=start_step, info="")
            for step in range(start_step + 1, config.train.steps + 1):
                wait_start = time.perf_counter()
                try:
                    if producer is not None:
                        groups, dropped = await rollouts.take(config.train.prompts_per_step, trainer.version, max_lag, take_deadline_s)
                    else:
                        groups, dropped = await rollouts.sync_batch(config.train.prompts_per_step), 0
                    probe = await probe_task if probe_task is not None else None
                except EngineGaveUp as error:
                    step -= 1
                    raise await stop_run(str(error)) from None
                waited = time.perf_counter() - wait_start
                trainer_wait_s += waited
                reward_errors = sum(len(g.reward_errors) for g in groups)
                sample_count = sum(len(g.samples) for g in groups)
                if reward_errors > MAX_REWARD_ERROR_FRAC * sample_count:
                    first = next(g for g in groups if g.reward_errors)
                    step -= 1
                    raise await stop_run(
                        f"{reward_errors} of {sample_count} rewards failed in one batch (more than {MAX_REWARD_ERROR_FRAC:.0%}); "
                        f"first: {first.reward_errors[0]} (prompt {first.problem.prompt!r})",
                        [g.problem for g in groups],
                    ) from None
                samples, advantages, rewards_tensor = batch_tensors(groups, config.train.advantage)
                metrics = await asyncio.to_thread(trainer.step, samples, advantages, probe)
                if metrics.get("train/skipped_steps"):
                    skipped_in_a_row += 1
                    counters["skipped_steps"] = counters.get("skipped_steps", 0) + 1
                    console.print(f"[yellow]step {step} skipped: {metrics.get('train/skip_reason')}[/yellow]")
                else:
                    skipped_in_a_row = 0
                    sync_start = time.perf_counter()
                    try:
                        await engine.update_weights(trainer.state_dict_for_engines(), trainer.version)
                    except EngineGaveUp as error:
                        raise await stop_run(str(error)) from None
                    metrics["perf/weight_sync_s"] = time.perf_counter() - sync_start
                if probe_count:
                    probe_task = asyncio.create_task(rollouts.probe(probe_count))
                now = time.perf_counter()
                counters["reward_errors"] = counters.get("reward_errors", 0) + reward_errors
                metrics |= {
                    "rl/reward": float(rewards_tensor.mean()),
                    "rl/success": float((rewards_tensor >= 1).float().mean()),
                    "pipeline/dropped_groups": dropped,
                    "pipeline/group_ids": [g.group_id for g in groups],
                    "pipeline/reward_errors": reward_errors,
                    "pipeline/requeued_groups": engine.requeued_groups - requeued_seen,
                    "pipeline/engine_restarts": engine.restarts - restarts_seen,
                    "perf/rollout_tok_s": (rollouts.generated_tokens - last_tokens) / max(now - last_time, 1e-9),
                    "perf/engine_idle_frac": rollouts.idle_seconds() / max(now - rl_start, 1e-9),
                    "perf/trainer_idle_frac": trainer_wait_s / max(now - rl_start, 1e-9),
                    "version": trainer.version,
                    "time_s": rl_seconds_before + now - rl_start,
                }
                restarts_seen, requeued_seen = engine.restarts, engine.requeued_groups
                last_time, last_tokens = now, rollouts.generated_tokens
                if step % config.train.eval_every == 0 or step == config.train.steps:
                    eval_success = await asyncio.to_thread(held_out_success)
                    metrics["eval/success"] = eval_success
                counters |= {
                    "engine_restarts": totals_before.get("engine_restarts", 0) + engine.restarts,
                    "requeued_groups": totals_before.get("requeued_groups", 0) + engine.requeued_groups,
                    "rollout_tokens": totals_before.get("rollout_tokens", 0) + rollouts.generated_tokens,
                    "engine_idle_s": totals_before.get("engine_idle_s", 0.0) + rollouts.idle_seconds(),
                    "rl_seconds": rl_seconds_before + now - rl_start,
                    "group_counter": rollouts.group_counter,
                }
                logger.log(step, metrics)
                if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise await stop_run(f"{skipped_in_a_row} steps in a row were skipped (last: {metrics.get('train/skip_reason')})") from None
                if step == config.train.steps or (config.train.checkpoint_every and step % config.train.checkpoint_every == 0):
                    await asyncio.to_thread(checkpoint_now)
                progress.update(
                    bar,
                    advance=1,
                    info=f"reward {metrics['rl/reward']:.2f} · eval {eval_success:.2f} · clip {metrics.get('rl/clip_rate') or 0:.3f}",
                )
                if signals.received is not None and step < config.train.steps:
                    raise await stop_run(f"{signals.received} received")
        summary |= _summary(counters, eval_success, config.train.steps, run_dir)
    finally:
        for background in (producer, probe_task):
            if background is not None:
                background.cancel()
                await asyncio.gather(background, return_exceptions=True)
        if rollouts is not None:
            await rollouts.stop()
        summary["engine_failures"] = engine.failures
        await engine.close()
        rewards.close()
        if logger is not None:
            logger.close()
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def _model_context(model_dir: Path) -> int | None:
    """The model's context length from its config.json (None if it does not say)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    value = config.get("max_position_embeddings") or config.get("n_positions") or config.get("max_sequence_length")
    return int(value) if value else None


def _summary(counters: dict, eval_success: float | None, steps: int, run_dir: Path) -> dict:
    rl_seconds = max(counters.get("rl_seconds", 0.0), 1e-9)
    busy_seconds = max(rl_seconds - counters.get("engine_idle_s", 0.0), 1e-9)
    tokens = counters.get("rollout_tokens", 0)
    final = latest_checkpoint(run_dir)
    return {
        "eval_success_end": eval_success,
        "rl_seconds": round(rl_seconds, 1),
        "steps": steps,
        "rollout_tokens": tokens,
        # wall-clock rate, and the rate while the engine had work (the trainer can be the bottleneck)
        "rollout_tok_s": round(tokens / rl_seconds, 1),
        "rollout_busy_tok_s": round(tokens / busy_seconds, 1),
        "engine_restarts": counters.get("engine_restarts", 0),
        "requeued_groups": counters.get("requeued_groups", 0),
        "reward_errors": counters.get("reward_errors", 0),
        "skipped_steps": counters.get("skipped_steps", 0),
        "checkpoint": str(final) if final is not None else None,
    }
