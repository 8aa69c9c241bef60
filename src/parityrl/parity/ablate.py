"""`parityrl ablate`: short RL runs that separate backend effects from objective effects.

Configurations (same seeds for all):
- `reference`: the torch engine, the ground truth;
- `naive-v1`: vLLM V1 with the four fixes off — raw logprobs, prefix caching and async scheduling
  left to the installed vLLM's defaults, `pause_generation()` with its defaults (abort in-flight
  requests, clear caches), bf16 lm_head on both sides;
- `fix1-only` … `fix4-only`: naive-v1 with one fix switched on;
- `fixed-v1`: every fix on (parityrl's defaults).

The `demo` preset makes the fixes observable: token-level PPO-clip (GRPO, so that clip rate
measures the engine's bias rather than GSPO's tight trust region), temperature 0.7 / top-p 0.9 (at T=1 without truncation
raw and processed logprobs coincide), a bf16 model (so the fp32 head matters), and a shared prompt
prefix (so prefix caching across weight updates has something to reuse — on GPU; on CPU vLLM's
smallest KV block, 32 tokens, is longer than these prompts, so no block is ever reused).

Each run is a separate `parityrl train` process writing OUT/<config>/seed<N>/; a run whose
summary.json exists is skipped and an interrupted one continues from its checkpoint (`train --resume`),
so an interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from parityrl.assets import progress_bar

NAIVE = [
    "engine.kind=vllm",
    "engine.logprobs_mode=raw_logprobs",
    "engine.enable_prefix_caching=null",
    "engine.async_scheduling=null",
    "engine.update_mode=abort",
    "engine.lm_head_fp32=false",
    "model.lm_head_fp32=false",
]
FIXES = {
    "fix1-only": ["engine.logprobs_mode=processed_logprobs"],
    "fix2-only": ["engine.enable_prefix_caching=false", "engine.async_scheduling=false"],
    "fix3-only": ["engine.update_mode=keep"],
    "fix4-only": ["engine.lm_head_fp32=true", "model.lm_head_fp32=true"],
}
PRESETS: dict[str, list[str]] = {
    "demo": [
        "model.dtype=bfloat16",
        "sampling.temperature=0.7",
        "sampling.top_p=0.9",
        # a shared template prefix; prefix caching reuses whole KV blocks only, and on CPU the smallest
        # block is 32 tokens, longer than these prompts (~25 tokens): fix 2 has nothing to act on here
        # on CPU (GPU blocks are 16 tokens)
        "task.prompt_prefix='Add two numbers: '",
        "engine.block_size=32",  # the smallest the CPU attention backend accepts (multiples of 32)
        "engine.enforce_eager=true",  # 30-step runs: a fast engine start beats compiled steps
        # token-level PPO-clip (eps 0.2): the policy's own step clips ~1% of tokens, so a biased
        # logprobs_old shows as extra clipping; GSPO's 3e-4 trust region clips ~25% of sequences in
        # every configuration and hides it
        "train.objective=grpo",
        "train.steps=30",
        "train.eval_every=15",
        "task.eval_size=128",
        "logging.tensorboard=false",
    ],
    # a few steps per run: checks that the whole matrix works end to end
    "smoke": ["train.steps=3", "train.eval_every=3", "task.eval_size=16", "logging.tensorboard=false"],
}


@dataclass
class AblationRun:
    name: str
    seed: int
    overrides: list[str]

    def run_dir(self, out_dir: Path) -> Path:
        return out_dir / self.name / f"seed{self.seed}"


def ablation_matrix(preset: str, seeds: int, only: list[str] | None = None) -> list[AblationRun]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    configs: dict[str, list[str]] = {"reference": ["engine.kind=reference"], "naive-v1": NAIVE}
    for name, fix in FIXES.items():
        configs[name] = NAIVE + fix
    configs["fixed-v1"] = ["engine.kind=vllm"]
    if only:
        unknown = sorted(set(only) - set(configs))
        if unknown:
            raise ValueError(f"unknown configuration(s) {unknown}; choose from {list(configs)}")
        configs = {k: v for k, v in configs.items() if k in only}
    force = ["engine.force_one_sided_head=true"]  # naive sets both sides false; keeps validation simple
    return [
        AblationRun(name, seed, PRESETS[preset] + overrides + force + [f"seed={seed}"])
        for seed in range(seeds)
        for name, overrides in configs.items()
    ]


def run_ablation(
    config_path: Path | None, out_dir: Path, preset: str, seeds: int, only: list[str] | None, console: Console
) -> list[Path]:
    runs = ablation_matrix(preset, seeds, only)
    pending = [r for r in runs if not (r.run_dir(out_dir) / "summary.json").is_file()]
    console.print(f"ablation: {len(runs)} runs ({len(runs) - len(pending)} already done) → {out_dir}")
    durations: list[float] = []
    with progress_bar() as progress:
        bar = progress.add_task("ablate", total=len(runs), info="", completed=len(runs) - len(pending))
        for run in pending:
            progress.update(bar, info=f"{run.name} seed {run.seed}")
            run_dir = run.run_dir(out_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "parityrl.cli", "train"]
            if (run_dir / "config.yaml").is_file():  # interrupted earlier: continue from its checkpoint
                command += ["--resume", str(run_dir)]
            else:
                if config_path is not None:
                    command.append(str(config_path))
                for override in run.overrides:
                    command += ["--set", override]
                command += ["--run-dir", str(run_dir)]
            command += ["--no-plot", "--force"]
            start = time.perf_counter()
            with open(run_dir / "train.log", "a") as log:
                result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
            durations.append(time.perf_counter() - start)
            if result.returncode != 0:
                raise RuntimeError(f"{run.name} seed {run.seed} failed (exit {result.returncode}); see {run_dir / 'train.log'}")
            progress.update(bar, advance=1)
    return [r.run_dir(out_dir) for r in runs]

