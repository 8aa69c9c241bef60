"""The online RL loop (PipelineRL-style), read top to bottom in `RLRun.run`.

async: the engine generates continuously; the trainer takes `prompts_per_step` finished groups,
steps, publishes version v+1 and the engine applies it inflight (requests keep running). At most
`max_inflight_groups` groups are generating or waiting for the trainer, which bounds staleness;
groups whose oldest token is more than `max_lag` versions behind are dropped and counted.
sync: generate a batch, train on it, update, repeat (no overlap; for debugging).

Each step is the same phases, each a method: take a batch, train on it, publish the new weights,
evaluate (every `train.eval_every` steps), log, checkpoint. Where the engine and the trainer run (one
process, or Ray actors) is the backend's business (`parityrl.backend`). The phases share one run's
state, so they stay one class in one file (~470 lines, a third of them the docstrings that say what
each phase guarantees).

A run either finishes or stops with one message and a resumable checkpoint:
- the engine is supervised (`engines.supervisor`): every call has a deadline, a dead or hung engine
  is restarted with the current weights and its in-flight groups are generated again;
- rewards run in worker processes with a timeout (`reward_pool.RewardPool`); a failing reward scores 0
  and is counted, more than `MAX_REWARD_ERROR_FRAC` failures in one step stop the run;
- a step with a NaN/inf logprob, loss or gradient is skipped; `MAX_SKIPPED_IN_A_ROW` in a row stop it;
- a failure in any background task reaches this loop; SIGINT/SIGTERM stop at the next step boundary;
- checkpoints (`train.checkpoint`) let `parityrl train --resume RUN_DIR` continue with each step once.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from parityrl.assets import prepare_model
from parityrl.backend import Backend, make_backend
from parityrl.config import RunConfig
from parityrl.engines.orphan_guard import recorded_shared_memory, unlink_unmapped
from parityrl.engines.supervisor import EngineGaveUp
from parityrl.episodes import ChatCodec, EpisodeLimits, TemplateRewritesHistory, episode_metrics, episode_record, play_greedy
from parityrl.errors import UserError
from parityrl.evaluate import EVAL_SPLITS, engine_greedy_completions, evaluation_metrics, evaluation_records
from parityrl.hardware import allowed_cpus, slow_bf16_warning, trainer_threads, with_torch_threads
from parityrl.memory import check_trainer_fits, engine_memory, estimate_trainer_memory
from parityrl.metrics import MetricsLogger, truncate_metrics, write_json_atomic, write_jsonl_atomic
from parityrl.policy import load_tokenizer
from parityrl.preflight import model_context, read_hf_config
from parityrl.progress import progress_bar
from parityrl.reward_pool import EnvironmentPool, RewardPool
from parityrl.rewards import RewardItem
from parityrl.rollouts import Group, Rollouts, RunStopped, StopSignals, batch_tensors
from parityrl.tasks import Problem, check_prompt_lengths, load_task, task_prompt_ids
from parityrl.train.checkpoint import RunState, latest_checkpoint, load_run_state

MAX_REWARD_ERROR_FRAC = 0.10
"""More failed rewards than this in one step's batch stop the run: the reward itself is broken."""
MAX_SKIPPED_IN_A_ROW = 3
"""Consecutive non-finite steps that stop the run (one is noise, three is a diverged model or bad data)."""


async def run_training(
    config: RunConfig, run_dir: Path, console: Console | None = None, resume: bool = False, plots: Callable[[], list[str]] | None = None
) -> dict:
    """Full run: assets, engine, RL loop, metrics, checkpoints. Returns the summary dict.

    resume: continue from RUN_DIR's newest intact checkpoint (model, optimizer, step, version, RNG,
    sampler, groups drawn but not trained on); metrics.jsonl is cut back to that step so each step is
    logged once. plots: draws the finished run's metrics and returns the files, in a thread while the
    engine shuts down (~4.5 s of vLLM waiting on its processes); they land in `summary["plots"]`. Not
    run when the loop fails; a failure to draw is reported and does not fail the run."""
    return await RLRun(config, Path(run_dir), console or Console(), resume, plots).run()


def refuse_unmatched_head(config: RunConfig, settings: dict) -> None:
    """The head dtype the engine runs, against the trainer's: the one-sided fp32 head `RunConfig` refuses in
    the config, found in force. A release without fp32 heads (vLLM 0.18.1, V0 0.8.5) runs a bf16 model's head
    in bf16 whatever is asked; a head in fp32 on one side only worsens the mismatch (on the showcase, fp32 on
    the engine only: `parity/kl` 4.7x that of both in fp32, docs/parity-toolkit.md)."""
    in_force = settings.get("head_dtype")
    trainer = "float32" if config.model.lm_head_fp32 else config.model.dtype
    if in_force is None or in_force == trainer or config.engine.force_one_sided_head:
        return
    raise UserError(
        f"the engine runs the lm_head in {in_force} ({settings.get('vllm_version', 'this release')} cannot run it in "
        f"{trainer}), while the trainer's is {trainer} (model.lm_head_fp32={config.model.lm_head_fp32}): a one-sided "
        "head makes the engine/trainer mismatch worse. Set engine.lm_head_fp32=false and model.lm_head_fp32=false "
        "(both heads in the model dtype), or use a vLLM release with fp32 heads (0.31 on)."
    )


class RLRun:
    """One run's state between the phases of `run`."""

    def __init__(self, config: RunConfig, run_dir: Path, console: Console, resume: bool, plots: Callable[[], list[str]] | None):
        self.config, self.run_dir, self.console, self.resume, self.plots = config, run_dir, console, resume, plots
        self.began = time.perf_counter()
        self.startup: dict[str, float] = {}
        """Seconds of each phase before the first RL step: what a user waits for (summary.json `startup_s`)."""
        self.logger: MetricsLogger | None = None
        self.backend: Backend | None = None
        self.rewards: RewardPool | None = None
        self.envs: EnvironmentPool | None = None
        self.episodes: tuple[EnvironmentPool, ChatCodec, EpisodeLimits] | None = None
        self.summary: dict = {}
        self.rollouts: Rollouts | None = None
        self.producer: asyncio.Task | None = None
        self.probe_task: asyncio.Task | None = None
        self.publishing: asyncio.Task | None = None
        """The last weight publication, in the background while the next step computes."""
        self.start_evaluation: asyncio.Task | None = None
        self.drawing: asyncio.Future | None = None
        self.finished_step = 0
        """The last step trained and logged: what a stop checkpoints."""
        self.eval_success: float | None = None
        self.eval_metrics: dict[str, float] = {}
        """The last evaluation's `eval/*` metrics (summary.json's `eval_end`)."""
        self.skipped_in_a_row = 0

    async def run(self) -> dict:
        try:
            self.prepare()
            await self.start()
            with StopSignals() as signals, progress_bar() as progress, self.backend.split_cores(self.settings, lambda: self.rollouts.generating > 0):
                bar = progress.add_task("RL", total=self.config.train.steps, completed=self.finished_step, info="")
                for step in range(self.finished_step + 1, self.config.train.steps + 1):
                    groups, dropped, waited = await self.take_batch()
                    await self.finish_start_evaluation(groups)
                    metrics = await self.train(groups)
                    failure = await self.publish(metrics)
                    metrics |= self.batch_metrics(groups, dropped, waited)
                    failure = await self.evaluate_if_due(step, metrics) or failure
                    self.log(step, metrics)
                    await self.stop_if_failed(failure, metrics)
                    checkpointed = await self.checkpoint_if_due(step, progress, bar)
                    self.show(progress, bar, metrics, checkpointed)
                    if signals.received is not None and step < self.config.train.steps:
                        raise await self.stop(f"{signals.received} received", fix_first=False)
            self.finish()
        finally:
            await self.close()
        write_json_atomic(self.run_dir / "summary.json", self.summary)
        return self.summary

    # -- before the loop ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Assets, the checks that refuse a run before anything heavy starts, the backend (trainer and
        engine, not started), and the state of a resumed run."""
        config, console = self.config, self.console
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.task = load_task(config.task)
        self.model_dir = prepare_model(config, self.task)  # SFT warm-up if not cached (one thread, deterministic)
        self.startup["assets"] = time.perf_counter() - self.began
        # from here on the engine and the trainer share the cores: the split is explicit
        torch.set_num_threads(trainer_threads(config.train, len(allowed_cpus()), config.engine.omp_threads))
        self.tokenizer = load_tokenizer(self.model_dir)
        hf_config = read_hf_config(self.model_dir)
        context = model_context(hf_config) or 1 << 40
        longest_prompt = check_prompt_lengths(
            self.task, self.tokenizer, lambda tok, prompt: task_prompt_ids(tok, self.task, prompt), context, config.sampling.max_new_tokens,
        )  # fmt: skip
        if self.task.environment is not None:
            # the environment's class and arguments, and the template rule, refuse a run before any engine starts
            codec = ChatCodec(self.tokenizer, self.task.system_prompt)
            codec.preflight([{"role": "user", "content": "1"}], self.tokenizer.eos_token_id)
            self.envs = EnvironmentPool.from_config(config.task)
            limits = EpisodeLimits(config.task.max_turns, min(config.task.max_episode_tokens or context, context))
            self.episodes = (self.envs, codec, limits)
            # what the trainer must fit: an episode of max_turns turns whose environment messages are each no
            # longer than the first prompt (an estimate: the environment's messages are not known before it runs)
            turns = config.task.max_turns
            longest_prompt = min(limits.max_tokens, turns * (longest_prompt + config.sampling.max_new_tokens)) - config.sampling.max_new_tokens
        self.summary["trainer_memory_estimate_gib"] = round(check_memory(config, hf_config, longest_prompt, console) / 2**30, 3)
        if (warning := slow_bf16_warning(config.model.dtype)) is not None:
            self.warn(warning)
        if self.resume:
            self._unlink_queues_of_the_killed_run()
        checkpoint = latest_checkpoint(self.run_dir, report=self.warn) if self.resume else None
        if self.resume and checkpoint is None:
            self.warn(f"{self.run_dir} has no complete checkpoint yet: starting from step 0")
        self.backend = make_backend(config, self.model_dir, checkpoint or self.model_dir, self.tokenizer.pad_token_id or 0, self.warn)
        if hasattr(self.backend, "ray_info"):
            console.print(f"[bold]ray[/bold]: {self.backend.ray_info['nodes']} node(s), {self.backend.ray_info['resources']}")
        self.trainer, self.engine = self.backend.trainer, self.backend.engine
        self.state = None
        if checkpoint is not None:
            self.trainer.load_checkpoint(checkpoint)
            self.state = load_run_state(checkpoint)
            self.trainer.version = self.state.version
            self.finished_step = self.state.step
            self.eval_success, self.eval_metrics = self.state.eval_success, dict(self.state.eval_metrics)
            console.print(f"[bold]resuming[/bold] {self.run_dir} at step {self.state.step} (policy v{self.state.version}) from {checkpoint.name}")
        self.counters: dict[str, float] = dict(self.state.counters) if self.state is not None else {}
        # no checkpoint to go on from (a fresh run, or a resume killed before its first one finished): from step 0
        truncate_metrics(self.run_dir, self.finished_step if self.state is not None else -1)
        if self.trainer.version > 0:
            self.engine.publish(self.trainer.state_dict_for_engines(), self.trainer.version)
        self.rewards = RewardPool.from_config(config.task)
        self.summary |= {"engine": config.engine.kind, "model_dir": str(self.model_dir)}
        self.startup["trainer"] = time.perf_counter() - self.began - self.startup["assets"]

    async def start(self) -> None:
        """The engine, the metrics sinks, the rollouts, the start evaluation (beside the first rollouts)
        and the clocks of the loop."""
        config, state = self.config, self.state
        self.console.print(f"[bold]engine[/bold] {config.engine.kind}: starting …")
        engine_began = time.perf_counter()
        await self.engine.start()
        self.startup["engine"] = time.perf_counter() - engine_began
        self.settings = self.record_engine_settings()
        refuse_unmatched_head(config, self.settings)
        for finding in self.settings.get("release_findings", []):
            self.console.print(f"[yellow]engine finding[/yellow]: {finding}")
        # a restarted engine has other shared-memory queues: recorded at once, so that a resume after the run
        # is killed finds them (the first engine's were unlinked when it was closed)
        for supervised in getattr(self.engine, "replicas", [self.engine]):
            supervised.on_start = self.record_restarted_engine
        self.console.print(f"[bold]engine settings in force[/bold]: {self.settings}")
        wandb_config = config.model_dump() if config.logging.wandb else None
        purge_step = self.finished_step + 1 if state is not None else 0  # TensorBoard drops what the stopped session logged after it
        self.logger = MetricsLogger(self.run_dir, tensorboard=config.logging.tensorboard, wandb_config=wandb_config, purge_step=purge_step)
        self.rollouts = Rollouts(
            self.engine, config, self.task, self.tokenizer, self.rewards, log=self.warn,
            sampler_state=state.sampler_state if state is not None else None,
            requeue=state.pending_prompts if state is not None else None,
            group_counter=int(self.counters.get("group_counter", 0)), episodes=self.episodes,
        )  # fmt: skip
        if state is None:
            # decoded by the engine beside the first batch's rollouts rather than before them (44 s of a
            # SmolLM2 start); the first publication waits for it, so it sees version 0 only
            self.start_evaluation = asyncio.create_task(self.evaluate({}))
        self.summary["eval_success_start"] = self.counters.get("eval_success_start")
        self.summary["eval_start"] = self.counters.get("eval_start")  # every eval/* metric of the start
        self.startup["total"] = time.perf_counter() - self.began
        self.summary["startup_s"] = {phase: round(seconds, 1) for phase, seconds in self.startup.items()}
        self.console.print(
            f"ready to train {self.startup['total']:.0f} s after the start ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in self.startup.items() if k != "total") + ")"
            + (": the held-out evaluation runs beside the first rollouts" if self.start_evaluation is not None else "")
        )
        if config.overlaps_generation:
            self.producer = self.rollouts.start()
        # everything alive now (torch, transformers, vLLM's frontend, the model) stays alive for the run:
        # frozen, the collector stops rescanning it, and a full collection no longer stalls a step every
        # ~20 steps (0.35 s each in the demo)
        gc.collect()
        gc.freeze()
        self.rollouts.reset_idle_clock()
        self.rl_start = self.last_time = time.perf_counter()
        self.rl_seconds_before = self.counters.get("rl_seconds", 0.0)
        self.totals_before = dict(self.counters)  # run totals up to the checkpoint; this session's counts add to them
        self.last_tokens, self.last_idle, self.trainer_wait_s = 0, 0.0, 0.0
        self.restarts_seen, self.requeued_seen = self.engine.restarts, self.engine.requeued_groups
        self.probe_count = config.pipeline.parity_probe_prompts if self.producer is not None else 0
        self.probe_task = asyncio.create_task(self.rollouts.probe(self.probe_count)) if self.probe_count else None

    # -- the phases of a step -----------------------------------------------------------------------

    async def take_batch(self) -> tuple[list[Group], int, float]:
        """`prompts_per_step` groups (async: the finished ones, stale ones dropped; sync: generated now).
        Returns the groups, how many were dropped, and the seconds waited. Too many failed rewards stop the run."""
        began = time.perf_counter()
        count = self.config.train.prompts_per_step
        try:
            if self.producer is not None:
                groups, dropped = await self.rollouts.take(count, self.trainer.version)
            else:
                groups, dropped = await self.rollouts.sync_batch(count), 0
        except (EngineGaveUp, TemplateRewritesHistory) as error:  # the latter: an episode broke the template rule
            raise await self.stop(str(error)) from None
        waited = time.perf_counter() - began
        self.trainer_wait_s += waited
        reward_errors = sum(len(g.reward_errors) for g in groups)
        sample_count = sum(len(g.samples) for g in groups)
        if reward_errors > MAX_REWARD_ERROR_FRAC * sample_count:
            first = next(g for g in groups if g.reward_errors)
            if self.task.environment is not None:
                what = f"environment {self.task.environment} failed on {reward_errors} of {sample_count} episodes"
                where = f"problem {first.problem.record()!r}; fix the environment (task.environment)"
            else:
                what, where = f"{reward_errors} of {sample_count} rewards failed", f"prompt {first.problem.prompt!r}"
            raise await self.stop(
                f"{what} in one batch (more than {MAX_REWARD_ERROR_FRAC:.0%}); first: {first.reward_errors[0]} ({where})",
                [g.problem for g in groups],
            ) from None
        return groups, dropped, waited

    async def finish_start_evaluation(self, groups: list[Group]) -> None:
        """The start's held-out success, logged as step 0 once its decoding (beside the first rollouts) is
        done: before the first step and its publication. A failure keeps the batch for `--resume`."""
        if self.start_evaluation is None:
            return
        began = time.perf_counter()
        try:
            evaluated = await self.start_evaluation
        except EngineGaveUp as error:
            raise await self.stop(str(error), [g.problem for g in groups]) from None
        finally:
            self.start_evaluation = None
        self.record_evaluation(evaluated)
        success = self.counters["eval_success_start"] = self.summary["eval_success_start"] = evaluated["eval/success"]
        self.summary["eval_start"] = self.counters["eval_start"] = evaluated
        self.logger.log(0, evaluated)
        ood = f", on task.eval_path {evaluated['eval/ood_success']:.3f}" if "eval/ood_success" in evaluated else ""
        self.console.print(
            f"held-out success before RL: [bold]{success:.3f}[/bold]{ood} (the trainer waited {time.perf_counter() - began:.0f} s for it)"
        )

    def record_evaluation(self, evaluated: dict[str, float]) -> None:
        self.eval_metrics = evaluated
        self.eval_success = evaluated["eval/success"]

    async def train(self, groups: list[Group]) -> dict:
        """One optimiser step on the batch (in a worker thread, with the thread count the core split set)."""
        self.samples, advantages, self.rewards_tensor = batch_tensors(groups, self.config.train.advantage)
        try:
            probe = await self.backend.probe_for_step(self.probe_task, self.config.batch_deadline_s)
            self.step_threads = torch.get_num_threads()  # this thread's count is the one the core split sets
            metrics = await asyncio.to_thread(with_torch_threads, self.step_threads, self.trainer.step, self.samples, advantages, probe)
        except EngineGaveUp as error:  # the probe's engine; the batch is not trained on, so it is kept
            raise await self.stop(str(error), [g.problem for g in groups]) from None
        except TimeoutError:
            reason = f"the parity probe's samples did not arrive within {self.config.batch_deadline_s:.0f} s"
            raise await self.stop(reason, [g.problem for g in groups]) from None
        metrics["perf/trainer_threads"] = self.step_threads
        return metrics

    async def publish(self, metrics: dict) -> EngineGaveUp | None:
        """Wait for the previous publication (it landed while this step computed), then publish this
        step's weights in the background. Returns an engine failure to stop on after logging."""
        failure = await self.landed_publication(metrics)  # this step is done: logged, then the run stops
        if metrics.get("train/skipped_steps"):
            self.skipped_in_a_row += 1
            self.counters["skipped_steps"] = self.counters.get("skipped_steps", 0) + 1
            self.warn(f"step {self.finished_step + 1} skipped: {metrics.get('train/skip_reason')}")
        else:
            self.skipped_in_a_row = 0
            # new groups and the probe wait for these weights (`Rollouts.publishing`), so they are not stale
            self.publishing = asyncio.create_task(timed(self.engine.update_weights(self.trainer.state_dict_for_engines(), self.trainer.version)))
            self.rollouts.publishing = self.publishing
            if self.producer is None:  # sync mode: nothing to overlap with
                failure = await self.landed_publication(metrics)
            # the next probe samples the new weights; a skipped step's probe (same weights) is kept for the next step
            if self.probe_count:
                self.probe_task = asyncio.create_task(self.rollouts.probe(self.probe_count))
        return failure

    async def landed_publication(self, metrics: dict) -> EngineGaveUp | None:
        """Wait for the weight publication in flight, if any (its seconds: `perf/weight_sync_s`); an engine
        that gave up on it is returned, for the caller to stop on once the step is logged."""
        publishing, self.publishing = self.publishing, None
        if publishing is None:
            return None
        try:
            metrics["perf/weight_sync_s"] = await publishing
        except EngineGaveUp as error:
            return error
        return None

    def batch_metrics(self, groups: list[Group], dropped: int, waited: float) -> dict:
        """What the batch and the pipeline looked like this step; advances the rate clocks."""
        now = time.perf_counter()
        rollouts, engine = self.rollouts, self.engine
        lengths = [s.sampled_tokens for s in self.samples]
        reward_errors = sum(len(g.reward_errors) for g in groups)
        self.counters["reward_errors"] = self.counters.get("reward_errors", 0) + reward_errors
        metrics = {
            "rl/reward": float(self.rewards_tensor.mean()),
            "rl/success": float((self.rewards_tensor >= 1).float().mean()),
            "rl/completion_len": sum(lengths) / max(len(lengths), 1),
            "rl/completion_lens": lengths,
            "pipeline/aborted_frac": sum(s.finish_reason == "abort" for s in self.samples) / max(len(self.samples), 1),
            "pipeline/dropped_groups": dropped,
            "pipeline/group_ids": [g.group_id for g in groups],
            "pipeline/reward_errors": reward_errors,
            "pipeline/requeued_groups": engine.requeued_groups - self.requeued_seen,
            "pipeline/engine_restarts": engine.restarts - self.restarts_seen,
            "perf/rollout_tok_s": (rollouts.generated_tokens - self.last_tokens) / max(now - self.last_time, 1e-9),
            "perf/prefix_cache_hit_frac": prefix_cache_hit_frac(self.samples),
            "perf/engine_idle_frac": rollouts.idle_seconds() / max(now - self.rl_start, 1e-9),
            "perf/trainer_idle_frac": self.trainer_wait_s / max(now - self.rl_start, 1e-9),
            "perf/batch_wait_s": waited,
            "version": self.trainer.version,
            "time_s": self.rl_seconds_before + now - self.rl_start,
        }
        if groups and groups[0].episodes is not None:
            metrics |= episode_metrics([e for g in groups for e in g.episodes])
        metrics |= self.backend.step_metrics(now - self.last_time)
        self.restarts_seen, self.requeued_seen = engine.restarts, engine.requeued_groups
        idle_now = rollouts.idle_seconds()
        self.backend.after_step((idle_now - self.last_idle) / max(now - self.last_time, 1e-9), now - self.last_time)  # the next step's split
        self.last_time, self.last_tokens, self.last_idle = now, rollouts.generated_tokens, idle_now
        self.step_done_at = now
        return metrics

    async def evaluate_if_due(self, step: int, metrics: dict) -> EngineGaveUp | None:
        """Held-out success every `train.eval_every` steps and at the last; an engine failure is returned
        (the step is logged, then the run stops)."""
        if not (step % self.config.train.eval_every == 0 or step == self.config.train.steps):
            return None
        try:
            evaluated = await self.evaluate(metrics)
        except EngineGaveUp as error:  # the evaluating engine, or its last update
            return error
        self.record_evaluation(evaluated)
        metrics |= evaluated
        return None

    async def evaluate(self, metrics: dict) -> dict[str, float]:
        """Greedy evaluation with the trainer's current weights, decoded by the engine in one batch: the held-out
        split and the `task.eval_path` set. Every completion (or episode) is kept in
        `RUN_DIR/eval_episodes/v<version>.jsonl`, tagged with its split; returns the `eval/*` metrics."""
        failure = await self.landed_publication(metrics)  # the engine must hold the trainer's version before it is evaluated
        if failure is not None:
            raise failure
        task, version = self.task, self.trainer.version
        splits = [(split, problems) for split, problems in (("held_out", task.eval), ("ood", task.eval_ood)) if problems]
        problems = [problem for _, split_problems in splits for problem in split_problems]
        request_id, max_new = f"eval-v{version}", self.config.sampling.max_new_tokens
        if self.episodes is not None:
            envs, codec, limits = self.episodes
            episodes = await play_greedy(self.engine.greedy, envs, codec, problems, limits, max_new, self.tokenizer.eos_token_id, request_id)
            records = [episode_record(episode) for episode in episodes]
        else:
            completions = await engine_greedy_completions(self.engine, self.tokenizer, task, problems, max_new, request_id)
            results = await asyncio.to_thread(self.rewards.score_sync, [RewardItem(c, p.answer, p.prompt) for c, p in zip(completions, problems)])
            records = evaluation_records(problems, completions, results, task.reward_kind)
        eval_metrics, tagged = {}, []
        for split, split_problems in splits:
            split_records = [{"split": split, **record} for record in records[len(tagged) : len(tagged) + len(split_problems)]]
            eval_metrics |= evaluation_metrics(split_records, EVAL_SPLITS[split])
            tagged += split_records
        records = tagged
        await asyncio.to_thread(write_jsonl_atomic, self.run_dir / "eval_episodes" / f"v{version:06d}.jsonl", records)
        return eval_metrics

    def log(self, step: int, metrics: dict) -> None:
        """Run totals (carried across resumes) and the step's line in metrics.jsonl and the sinks."""
        before, engine, rollouts = self.totals_before, self.engine, self.rollouts
        self.counters |= {
            "engine_restarts": before.get("engine_restarts", 0) + engine.restarts,
            "requeued_groups": before.get("requeued_groups", 0) + engine.requeued_groups,
            "rollout_tokens": before.get("rollout_tokens", 0) + rollouts.generated_tokens,
            "engine_idle_s": before.get("engine_idle_s", 0.0) + rollouts.idle_seconds(),
            "rl_seconds": self.rl_seconds_before + self.step_done_at - self.rl_start,
            "group_counter": rollouts.group_counter,
        }
        self.logger.log(step, metrics)
        self.finished_step = step

    async def stop_if_failed(self, failure: EngineGaveUp | None, metrics: dict) -> None:
        if failure is not None:
            raise await self.stop(str(failure)) from None
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise await self.stop(f"{self.skipped_in_a_row} steps in a row were skipped (last: {metrics.get('train/skip_reason')})") from None

    async def checkpoint_if_due(self, step: int, progress, bar) -> str:
        """Every `train.checkpoint_every` steps and at the last; returns the progress note."""
        every = self.config.train.checkpoint_every
        if not (step == self.config.train.steps or (every and step % every == 0)):
            return ""
        progress.update(bar, info=f"writing checkpoint step_{step} …")
        await asyncio.to_thread(self.checkpoint)
        return f" · checkpoint step_{step}"

    def show(self, progress, bar, metrics: dict, checkpointed: str) -> None:
        """Advance the progress bar. The next step's rates (tokens/s, engine idle, the core split's step
        time) leave out this step's evaluation and checkpoint: the engine idles through them, which is no
        reason to hand the trainer its core."""
        if "eval/success" in metrics or time.perf_counter() - self.step_done_at > 0.05:
            self.last_time, self.last_tokens, self.last_idle = time.perf_counter(), self.rollouts.generated_tokens, self.rollouts.idle_seconds()
        eval_text = f"{self.eval_success:.2f}" if self.eval_success is not None else "–"
        clip = metrics.get("rl/clip_rate") or 0
        progress.update(bar, advance=1, info=f"reward {metrics['rl/reward']:.2f} · eval {eval_text} · clip {clip:.3f}{checkpointed}")

    # -- stopping and finishing ---------------------------------------------------------------------

    def checkpoint(self, extra_pending: list[Problem] = ()) -> RunState:
        state = RunState(
            step=self.finished_step,
            version=self.trainer.version,
            sampler_state=self.rollouts.rng.getstate(),
            pending_prompts=list(extra_pending) + self.rollouts.undrained(),
            counters=dict(self.counters),
            eval_success=self.eval_success,
            eval_metrics=dict(self.eval_metrics),
        )
        self.trainer.save_checkpoint(self.run_dir, state)
        return state

    async def stop(self, reason: str, extra_pending: list[Problem] = (), fix_first: bool = True) -> RunStopped:
        """Checkpoint the last finished step; the error that ends the run says why and how to go on."""
        try:
            await asyncio.to_thread(self.checkpoint, extra_pending)
        except UserError as error:  # the stop's reason first: it is what the user must fix
            return RunStopped(f"the run stopped at step {self.finished_step}: {reason.rstrip('.')}. Then {error.message}")
        step, run_dir = self.finished_step, self.run_dir
        return RunStopped(
            f"the run stopped at step {step}: {reason.rstrip('.')}. A checkpoint of step {step} is in {run_dir}/checkpoints; "
            f"{'fix the cause, then ' if fix_first else ''}continue with `parityrl train --resume {run_dir}`."
        )

    def finish(self) -> None:
        self.summary |= _summary(self.counters, self.eval_success, self.config.train.steps, self.run_dir)
        self.summary["eval_end"] = self.eval_metrics
        if self.plots is not None:  # metrics.jsonl is complete and fsynced: draw it while the engine closes
            self.drawing = asyncio.get_running_loop().run_in_executor(None, self.plots)
        self.summary |= self.backend.summary()

    def record_engine_settings(self) -> dict:
        """The running engine's settings, as it reports them, in engine_settings.json."""
        settings = self.engine.settings()
        write_json_atomic(self.run_dir / "engine_settings.json", settings)
        return settings

    def record_restarted_engine(self) -> None:
        try:
            self.record_engine_settings()
        except Exception as error:  # the restarted engine serves either way; only a later resume's cleanup misses it
            self.warn(f"the restarted engine's settings could not be recorded ({type(error).__name__}: {error})")

    async def close(self) -> None:
        """Whatever the run reached: background tasks, rollouts, engine, reward workers, trainer, sinks."""
        gc.unfreeze()  # frozen objects are never freed: at exit, triton's bindings reported them as leaks
        for background in (self.producer, self.probe_task, self.publishing, self.start_evaluation):
            if background is not None:
                background.cancel()
                await asyncio.gather(background, return_exceptions=True)
        if self.rollouts is not None:
            await self.rollouts.stop()
        try:
            if self.backend is not None:
                self.summary["engine_failures"] = self.engine.failures
                await self.engine.close()
        finally:
            if self.rewards is not None:
                self.rewards.close()
            if self.envs is not None:
                self.envs.close()
            if self.backend is not None:
                self.backend.close()
            if self.logger is not None:
                self.logger.close()
        if self.drawing is not None:
            try:
                self.summary["plots"] = await self.drawing
            except Exception as error:  # the run itself is complete: its checkpoint and metrics are written
                self.warn(f"the plots could not be drawn ({type(error).__name__}: {error}); retry with `parityrl plot {self.run_dir}`")

    def warn(self, line: str) -> None:
        self.console.print(f"[yellow]{line}[/yellow]")

    def _unlink_queues_of_the_killed_run(self) -> None:
        """A run killed with its whole process group (SIGKILL) leaves its engine's queues in /dev/shm,
        ~420 MB of RAM per engine, with nobody left to unlink them; its engine_settings.json names them."""
        try:
            settings = json.loads((self.run_dir / "engine_settings.json").read_text())
        except (OSError, json.JSONDecodeError):
            return
        if unlinked := unlink_unmapped(recorded_shared_memory(settings)):
            self.warn(f"unlinked {len(unlinked)} shared-memory queue(s) the stopped run's engine left in /dev/shm")


def check_memory(config: RunConfig, hf_config: dict, longest_prompt: int, console: Console) -> int:
    """Refuse, before the engine starts, a trainer that would not fit beside a local engine (`parityrl.memory`);
    returns the estimate (bytes), which summary.json keeps beside the measured peaks."""
    import psutil

    estimate = estimate_trainer_memory(config, hf_config, longest_prompt)
    # a local engine starts after this check and takes its share; Ray places engines and ranks itself
    engine_share = engine_memory(config, hf_config) if config.pipeline.backend == "local" and config.engine.kind == "vllm" else 0
    console.print(f"[bold]trainer memory (estimate)[/bold]: {estimate.total / 2**30:.1f} GiB ({estimate.describe()})")
    check_trainer_fits(estimate, psutil.virtual_memory().available - engine_share, config)
    return estimate.total


async def timed(awaitable) -> float:
    """Seconds `awaitable` took (what a background weight publication reports as perf/weight_sync_s)."""
    began = time.perf_counter()
    await awaitable
    return time.perf_counter() - began


def prefix_cache_hit_frac(samples: list) -> float | None:
    """Prompt tokens served from vLLM's prefix cache over all prompt tokens (None: the engine does not say)."""
    counted = [s for s in samples if s.cached_prompt_tokens is not None]
    if not counted:
        return None
    submitted = sum(s.turn_prompt_tokens if s.turn_prompt_tokens is not None else len(s.prompt_token_ids) for s in counted)
    return sum(s.cached_prompt_tokens for s in counted) / max(submitted, 1)


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
