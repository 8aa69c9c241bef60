"""The online RL loop (PipelineRL-style, local mode).

async: the engine generates continuously; the trainer takes `prompts_per_step` finished groups,
steps, publishes version v+1 and the engine applies it inflight (requests keep running). At most
`max_inflight_groups` groups are generating or waiting for the trainer, which bounds staleness;
groups whose oldest token is more than `max_lag` versions behind are dropped and counted.
sync: generate a batch, train on it, update, repeat (no overlap; for debugging).

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
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from parityrl.assets import prepare_model
from parityrl.config import RunConfig
from parityrl.engines import make_engine
from parityrl.engines.ray_replicas import ReplicaSet
from parityrl.engines.supervisor import EngineGaveUp, SupervisedEngine
from parityrl.evaluate import engine_greedy_completions, success_rate
from parityrl.hardware import CoreSplit, allowed_cpus, trainer_threads, with_torch_threads
from parityrl.memory import check_trainer_fits, engine_memory, estimate_trainer_memory
from parityrl.metrics import MetricsLogger, truncate_metrics, write_json_atomic
from parityrl.policy import load_tokenizer
from parityrl.preflight import model_context, read_hf_config
from parityrl.progress import progress_bar
from parityrl.reward_pool import RewardPool
from parityrl.rollouts import Rollouts, RunStopped, StopSignals, batch_tensors
from parityrl.tasks import Problem, check_prompt_lengths, load_task, task_prompt_ids
from parityrl.train.checkpoint import RunState, latest_checkpoint, load_run_state
from parityrl.train.trainer import Trainer

MAX_REWARD_ERROR_FRAC = 0.10
"""More failed rewards than this in one step's batch stop the run: the reward itself is broken."""
MAX_SKIPPED_IN_A_ROW = 3
"""Consecutive non-finite steps that stop the run (one is noise, three is a diverged model or bad data)."""


async def run_training(
    config: RunConfig, run_dir: Path, console: Console | None = None, resume: bool = False, plots: Callable[[], list[str]] | None = None
) -> dict:
    """Full run: assets, engine, RL loop, metrics, checkpoints. Returns the summary dict.

    resume: continue from RUN_DIR's newest checkpoint (model, optimizer, step, version, RNG, sampler,
    groups drawn but not trained on); metrics.jsonl is cut back to that step so each step is logged once.
    plots: draws the finished run's metrics and returns the files, in a thread while the engine shuts
    down (~4.5 s of vLLM waiting on its processes); they land in `summary["plots"]`. Not run when the
    loop fails; a failure to draw is reported and does not fail the run."""
    console = console or Console()
    began = time.perf_counter()
    startup: dict[str, float] = {}
    """Seconds of each phase before the first RL step: what a user waits for (summary.json `startup_s`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = load_task(config.task)
    model_dir = prepare_model(config, task)  # SFT warm-up if not cached (one thread, deterministic)
    startup["assets"] = time.perf_counter() - began
    # from here on the engine and the trainer share the cores: the split is explicit
    torch.set_num_threads(trainer_threads(config.train, len(allowed_cpus()), config.engine.omp_threads))
    tokenizer = load_tokenizer(model_dir)
    hf_config = read_hf_config(model_dir)
    context = model_context(hf_config) or 1 << 40
    longest_prompt = check_prompt_lengths(task, tokenizer, lambda tok, prompt: task_prompt_ids(tok, task, prompt), context, config.sampling.max_new_tokens)
    check_memory(config, hf_config, longest_prompt, console)
    checkpoint = latest_checkpoint(run_dir, report=lambda line: console.print(f"[yellow]{line}[/yellow]")) if resume else None
    if resume and checkpoint is None:
        console.print(f"[yellow]{run_dir} has no complete checkpoint yet: starting from step 0[/yellow]")
    log = lambda line: console.print(f"[yellow]{line}[/yellow]")  # noqa: E731
    pad_id = tokenizer.pad_token_id or 0
    if config.pipeline.backend == "ray":
        from parityrl import cluster

        summary_ray = cluster.start_ray(config)
        console.print(f"[bold]ray[/bold]: {summary_ray['nodes']} node(s), {summary_ray['resources']}")
        trainer = cluster.trainer_ranks(config, checkpoint or model_dir, pad_id)
        engine = cluster.engine_replicas(config, model_dir, log)
    else:
        trainer = Trainer(config, checkpoint or model_dir, pad_id)
        engine = SupervisedEngine(lambda: make_engine(config, model_dir), config.engine, log=log)
    state = None
    if checkpoint is not None:
        trainer.load_checkpoint(checkpoint)
        state = load_run_state(checkpoint)
    start_step = state.step if state is not None else 0
    counters: dict[str, float] = dict(state.counters) if state is not None else {}
    if state is not None:
        trainer.version = state.version
        console.print(f"[bold]resuming[/bold] {run_dir} at step {start_step} (policy v{state.version}) from {checkpoint.name}")
    truncate_metrics(run_dir, start_step if resume else -1)
    if trainer.version > 0:
        engine.publish(trainer.state_dict_for_engines(), trainer.version)
    rewards = RewardPool.from_config(config.task)
    console.print(f"[bold]engine[/bold] {config.engine.kind}: starting …")
    wandb_config = config.model_dump() if config.logging.wandb else None
    logger: MetricsLogger | None = None
    rollouts: Rollouts | None = None
    producer: asyncio.Task | None = None
    probe_task: asyncio.Task | None = None
    publishing: asyncio.Task | None = None
    """The last weight publication, in the background while the next step computes."""
    drawing: asyncio.Future | None = None
    summary: dict = {"engine": config.engine.kind, "model_dir": str(model_dir)}
    step = start_step
    startup["trainer"] = time.perf_counter() - began - startup["assets"]
    try:
        engine_began = time.perf_counter()
        await engine.start()
        startup["engine"] = time.perf_counter() - engine_began
        settings = engine.settings()
        write_json_atomic(run_dir / "engine_settings.json", settings)
        console.print(f"[bold]engine settings in force[/bold]: {settings}")
        logger = MetricsLogger(run_dir, tensorboard=config.logging.tensorboard, wandb_config=wandb_config, purge_step=start_step + 1)
        rollouts = Rollouts(
            engine, config, task, tokenizer, rewards, log=log,
            sampler_state=state.sampler_state if state is not None else None,
            requeue=state.pending_prompts if state is not None else None,
            group_counter=int(counters.get("group_counter", 0)),
        )

        async def held_out_success() -> float:
            """Greedy success on the held-out problems, decoded by the engine with the trainer's current weights."""
            nonlocal publishing
            if publishing is not None:  # the engine must hold the trainer's version before it is evaluated
                metrics["perf/weight_sync_s"] = await publishing
                publishing = None
            completions = await engine_greedy_completions(engine, tokenizer, task, task.eval, config.sampling.max_new_tokens, f"eval-v{trainer.version}")
            return await asyncio.to_thread(success_rate, completions, task.eval, rewards.score_sync)

        def checkpoint_now(extra_pending: list[Problem] = ()) -> RunState:
            run_state = RunState(
                step=step,
                version=trainer.version,
                sampler_state=rollouts.rng.getstate(),
                pending_prompts=list(extra_pending) + rollouts.undrained(),
                counters=dict(counters),
                eval_success=eval_success,
            )
            trainer.save_checkpoint(run_dir, run_state)
            return run_state

        async def stop_run(reason: str, extra_pending: list[Problem] = (), fix_first: bool = True) -> RunStopped:
            await asyncio.to_thread(checkpoint_now, extra_pending)
            return RunStopped(
                f"the run stopped at step {step}: {reason.rstrip('.')}. A checkpoint of step {step} is in {run_dir}/checkpoints; "
                f"{'fix the cause, then ' if fix_first else ''}continue with `parityrl train --resume {run_dir}`."
            )

        async def finish_start_evaluation(evaluation: asyncio.Task) -> float:
            """The start's held-out success, logged as step 0 once its decoding (beside the first rollouts) is done."""
            eval_began = time.perf_counter()
            success = await evaluation
            counters["eval_success_start"] = summary["eval_success_start"] = success
            logger.log(0, {"eval/success": success})
            console.print(f"held-out success before RL: [bold]{success:.3f}[/bold] (the trainer waited {time.perf_counter() - eval_began:.0f} s for it)")
            return success

        metrics: dict = {}
        start_evaluation: asyncio.Task | None = None
        if state is None:
            # decoded by the engine beside the first batch's rollouts rather than before them (44 s of a
            # SmolLM2 start); the first publication waits for it, so it sees version 0 only
            start_evaluation = asyncio.create_task(held_out_success())
            eval_success = None
        else:
            eval_success = state.eval_success
        summary["eval_success_start"] = counters.get("eval_success_start")
        startup["total"] = time.perf_counter() - began
        summary["startup_s"] = {phase: round(seconds, 1) for phase, seconds in startup.items()}
        console.print(
            f"ready to train {startup['total']:.0f} s after the start (" + ", ".join(f"{k} {v:.0f} s" for k, v in startup.items() if k != "total") + ")"
            + (": the held-out evaluation runs beside the first rollouts" if start_evaluation is not None else "")
        )
        # max_lag 0 admits only samples of the current version: that is the synchronous loop
        max_lag = config.pipeline.max_lag if config.pipeline.max_lag is not None else 1 << 40
        if config.pipeline.mode == "async" and max_lag > 0:
            producer = rollouts.start()
        # a batch can take several group deadlines (queued behind others, an engine restart or two)
        take_deadline_s = config.engine.request_timeout_s * (config.engine.max_restarts + 2)
        # everything alive now (torch, transformers, vLLM's frontend, the model) stays alive for the run:
        # frozen, the collector stops rescanning it, and a full collection no longer stalls a step every
        # ~20 steps (0.35 s each in the demo)
        gc.collect()
        gc.freeze()
        rollouts.reset_idle_clock()
        rl_start = last_time = time.perf_counter()
        rl_seconds_before = counters.get("rl_seconds", 0.0)
        totals_before = dict(counters)  # run totals up to the checkpoint; this session's counts add to them
        last_tokens, last_idle, trainer_wait_s, skipped_in_a_row = 0, 0.0, 0.0, 0
        restarts_seen, requeued_seen = engine.restarts, engine.requeued_groups
        replicated = isinstance(engine, ReplicaSet)
        last_replica_tokens = list(engine.tokens_per_replica) if replicated else []
        probe_count = config.pipeline.parity_probe_prompts if producer is not None else 0
        probe_task = asyncio.create_task(rollouts.probe(probe_count)) if probe_count else None
        loop = asyncio.get_running_loop()

        def probe_waiter(task: asyncio.Task):
            """For the trainer's thread: blocks until the probe samples are there (with a deadline)."""
            return lambda: asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(task), take_deadline_s), loop).result()
        binding = settings.get("env", {}).get("VLLM_CPU_OMP_THREADS_BIND") if not replicated else None
        engine_pids = list(getattr(getattr(engine, "engine", None), "process_ids", []))
        cores_split = CoreSplit(binding, engine_pids, torch.get_num_threads(), adaptive=config.train.threads == "auto")
        if cores_split.adaptive and not replicated:
            trainer.follow_thread_count(lambda: cores_split.threads_now(engine_generating=rollouts.generating > 0))
        with StopSignals() as signals, progress_bar() as progress, cores_split:
            bar = progress.add_task("RL", total=config.train.steps, completed=start_step, info="")
            for step in range(start_step + 1, config.train.steps + 1):
                wait_start = time.perf_counter()
                try:
                    if producer is not None:
                        groups, dropped = await rollouts.take(config.train.prompts_per_step, trainer.version, max_lag, take_deadline_s)
                    else:
                        groups, dropped = await rollouts.sync_batch(config.train.prompts_per_step), 0
                    # the local trainer waits for the probe only after its backward passes (the engine
                    # generates it meanwhile); the Ray ranks take samples, not a function of this loop
                    probe = probe_waiter(probe_task) if probe_task is not None and not replicated else None
                    if probe_task is not None and replicated:
                        probe = await probe_task
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
                if start_evaluation is not None:  # usually done by now; before the first step and its publication
                    try:
                        eval_success = await finish_start_evaluation(start_evaluation)
                    except EngineGaveUp as error:  # the batch taken is trained on after --resume
                        step -= 1
                        raise await stop_run(str(error), [g.problem for g in groups]) from None
                    start_evaluation = None
                samples, advantages, rewards_tensor = batch_tensors(groups, config.train.advantage)
                try:
                    step_threads = torch.get_num_threads()  # this thread's count is the one `cores_split` sets
                    metrics = await asyncio.to_thread(with_torch_threads, step_threads, trainer.step, samples, advantages, probe)
                except EngineGaveUp as error:  # the probe's engine
                    step -= 1
                    raise await stop_run(str(error)) from None
                publish_failure: EngineGaveUp | None = None
                if publishing is not None:  # the previous step's weights: landed while this step computed
                    try:
                        metrics["perf/weight_sync_s"] = await publishing
                    except EngineGaveUp as error:  # this step is done: logged, then the run stops
                        publish_failure = error
                publishing = None
                if metrics.get("train/skipped_steps"):
                    skipped_in_a_row += 1
                    counters["skipped_steps"] = counters.get("skipped_steps", 0) + 1
                    console.print(f"[yellow]step {step} skipped: {metrics.get('train/skip_reason')}[/yellow]")
                else:
                    skipped_in_a_row = 0
                    # published in the background: the next batch is (mostly) generated already, and new
                    # groups and the probe wait for these weights (`Rollouts.publishing`), so they are not stale
                    publishing = asyncio.create_task(timed(engine.update_weights(trainer.state_dict_for_engines(), trainer.version)))
                    rollouts.publishing = publishing
                    if producer is None:  # sync mode: nothing to overlap with
                        try:
                            metrics["perf/weight_sync_s"] = await publishing
                        except EngineGaveUp as error:
                            raise await stop_run(str(error)) from None
                        publishing = None
                if probe_count:
                    probe_task = asyncio.create_task(rollouts.probe(probe_count))
                now = time.perf_counter()
                lengths = [len(s.completion_token_ids) for s in samples]
                counters["reward_errors"] = counters.get("reward_errors", 0) + reward_errors
                metrics |= {
                    "rl/reward": float(rewards_tensor.mean()),
                    "rl/success": float((rewards_tensor >= 1).float().mean()),
                    "rl/completion_len": sum(lengths) / max(len(lengths), 1),
                    "rl/completion_lens": lengths,
                    "pipeline/aborted_frac": sum(s.finish_reason == "abort" for s in samples) / max(len(samples), 1),
                    "pipeline/dropped_groups": dropped,
                    "pipeline/group_ids": [g.group_id for g in groups],
                    "pipeline/reward_errors": reward_errors,
                    "pipeline/requeued_groups": engine.requeued_groups - requeued_seen,
                    "pipeline/engine_restarts": engine.restarts - restarts_seen,
                    "perf/rollout_tok_s": (rollouts.generated_tokens - last_tokens) / max(now - last_time, 1e-9),
                    "perf/engine_idle_frac": rollouts.idle_seconds() / max(now - rl_start, 1e-9),
                    "perf/trainer_idle_frac": trainer_wait_s / max(now - rl_start, 1e-9),
                    "perf/batch_wait_s": waited,
                    "version": trainer.version,
                    "time_s": rl_seconds_before + now - rl_start,
                }
                if replicated:  # tokens per replica since the last step, as a rate
                    metrics["perf/rollout_tok_s_per_replica"] = [
                        (tokens - before) / max(now - last_time, 1e-9) for tokens, before in zip(engine.tokens_per_replica, last_replica_tokens)
                    ]
                    last_replica_tokens = list(engine.tokens_per_replica)
                restarts_seen, requeued_seen = engine.restarts, engine.requeued_groups
                idle_now = rollouts.idle_seconds()
                metrics["perf/trainer_threads"] = step_threads
                cores_split.update((idle_now - last_idle) / max(now - last_time, 1e-9), now - last_time)  # the next step's
                last_time, last_tokens, last_idle = now, rollouts.generated_tokens, idle_now
                if step % config.train.eval_every == 0 or step == config.train.steps:
                    try:
                        eval_success = await held_out_success()
                        metrics["eval/success"] = eval_success
                    except EngineGaveUp as error:  # the evaluating engine, or its last update: logged, then the run stops
                        publish_failure = error
                counters |= {
                    "engine_restarts": totals_before.get("engine_restarts", 0) + engine.restarts,
                    "requeued_groups": totals_before.get("requeued_groups", 0) + engine.requeued_groups,
                    "rollout_tokens": totals_before.get("rollout_tokens", 0) + rollouts.generated_tokens,
                    "engine_idle_s": totals_before.get("engine_idle_s", 0.0) + rollouts.idle_seconds(),
                    "rl_seconds": rl_seconds_before + now - rl_start,
                    "group_counter": rollouts.group_counter,
                }
                logger.log(step, metrics)
                if publish_failure is not None:
                    raise await stop_run(str(publish_failure)) from None
                if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise await stop_run(f"{skipped_in_a_row} steps in a row were skipped (last: {metrics.get('train/skip_reason')})") from None
                checkpointed = ""
                if step == config.train.steps or (config.train.checkpoint_every and step % config.train.checkpoint_every == 0):
                    progress.update(bar, info=f"writing checkpoint step_{step} …")
                    await asyncio.to_thread(checkpoint_now)
                    checkpointed = f" · checkpoint step_{step}"
                if "eval/success" in metrics or time.perf_counter() - now > 0.05:
                    # the next step's rates (tokens/s, engine idle, the core split's step time) leave out
                    # this evaluation and checkpoint: the engine idles through them, which is no reason to
                    # hand the trainer its core
                    last_time, last_tokens, last_idle = time.perf_counter(), rollouts.generated_tokens, rollouts.idle_seconds()
                progress.update(
                    bar,
                    advance=1,
                    info=f"reward {metrics['rl/reward']:.2f} · eval {eval_success:.2f} · clip {metrics.get('rl/clip_rate') or 0:.3f}{checkpointed}",
                )
                if signals.received is not None and step < config.train.steps:
                    raise await stop_run(f"{signals.received} received", fix_first=False)
        summary |= _summary(counters, eval_success, config.train.steps, run_dir)
        if plots is not None:  # metrics.jsonl is complete and fsynced: draw it while the engine closes
            drawing = asyncio.get_running_loop().run_in_executor(None, plots)
        if replicated:
            summary["samples_per_replica"] = dict(enumerate(engine.samples_per_replica))
            summary["last_version_per_replica"] = engine.last_version_per_replica()
            summary["actor_nodes"] = cluster.node_of_each_actor(engine, trainer)
    finally:
        gc.unfreeze()  # frozen objects are never freed: at exit, triton's bindings reported them as leaks
        if isinstance(trainer, Trainer):
            trainer.follow_thread_count(None)
        for background in (producer, probe_task, publishing, start_evaluation):
            if background is not None:
                background.cancel()
                await asyncio.gather(background, return_exceptions=True)
        if rollouts is not None:
            await rollouts.stop()
        summary["engine_failures"] = engine.failures
        await engine.close()
        rewards.close()
        trainer.close()
        if logger is not None:
            logger.close()
        if config.pipeline.backend == "ray":
            import ray

            ray.shutdown()  # stops the Ray instance this run started; only disconnects from a cluster it joined
        if drawing is not None:
            try:
                summary["plots"] = await drawing
            except Exception as error:  # the run itself is complete: its checkpoint and metrics are written
                console.print(f"[yellow]the plots could not be drawn ({type(error).__name__}: {error}); retry with `parityrl plot {run_dir}`[/yellow]")
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def check_memory(config: RunConfig, hf_config: dict, longest_prompt: int, console: Console) -> None:
    """Refuse, before the engine starts, a trainer that would not fit beside a local engine (`parityrl.memory`)."""
    import psutil

    estimate = estimate_trainer_memory(config, hf_config, longest_prompt)
    # a local engine starts after this check and takes its share; Ray places engines and ranks itself
    engine_share = engine_memory(config, hf_config) if config.pipeline.backend == "local" and config.engine.kind == "vllm" else 0
    console.print(f"[bold]trainer memory (estimate)[/bold]: {estimate.total / 2**30:.1f} GiB ({estimate.describe()})")
    check_trainer_fits(estimate, psutil.virtual_memory().available - engine_share, config)


async def timed(awaitable) -> float:
    """Seconds `awaitable` took (what a background weight publication reports as perf/weight_sync_s)."""
    began = time.perf_counter()
    await awaitable
    return time.perf_counter() - began


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
