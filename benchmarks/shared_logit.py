"""Fix 4 against where the logits sit: `assets.shared_logit` swept on configs/showcase.yaml.

    .venv/bin/python benchmarks/shared_logit.py                          # 0, 24, 32, 48 on 32 prompts
    .venv/bin/python benchmarks/shared_logit.py --values 0 32 --prompts 8

For each value the config's asset is built (or read from the cache: only `shared_logit` differs, so
the warm-up is the same) and `parityrl check`'s static measurement runs twice, all fixes on and with
fix 4 off (the head in bf16 on both sides), one engine at a time. The two are compared on the sampled
tokens both rows drew (`parity_common/kl`, as `check --attribute` judges fix 4), with the asset's median
top logit over the positions of training problems (`assets.median_top_logit`). Results go to
benchmarks/results/shared_logit.json with the environment and the CPU (bf16 kernels differ between
CPUs, and the ratio with them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, environment, write_results  # noqa: E402

FIX4_OFF = "fix4 off (bf16/model-dtype head, both sides)"


def measure(config_path: Path, shared_logit: float, prompts: int) -> dict:
    """Configured vs fix 4 off at one `shared_logit`, on the samples both rows drew."""
    from parityrl.assets import median_top_logit, prepare_model
    from parityrl.config import load_config
    from parityrl.parity.check import common_samples, run_check, with_fix_off
    from parityrl.tasks import load_task

    configured = load_config(config_path, [f"assets.shared_logit={shared_logit}"])
    task = load_task(configured.task)
    model_dir = prepare_model(configured, task)
    fix4_off = with_fix_off(configured, FIX4_OFF)
    kept: dict[str, dict] = {}
    own: dict[str, float] = {}
    for name, config in (("configured", configured), (FIX4_OFF, fix4_off)):
        kept[name] = {}
        own[name] = asyncio.run(run_check(config, prompts, inflight=False, kept=kept[name]))["parity/kl"]
    common = common_samples(kept)
    on, off = common["configured"]["parity_common/kl"], common[FIX4_OFF]["parity_common/kl"]
    return {
        "shared_logit": shared_logit,
        "median_top_logit": median_top_logit(model_dir, task),
        "common_tokens": common["configured"]["parity_common/tokens"],
        "same_samples_frac": common["configured"]["parity/same_samples_frac"],
        "configured_kl": on,
        "fix4_off_kl": off,
        "ratio": off / on,
        "own_samples_kl": own,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "showcase.yaml")
    parser.add_argument("--values", type=float, nargs="+", default=[0, 24, 32, 48])
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts, each x sampling.n samples")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "shared_logit.json")
    args = parser.parse_args(argv)
    from parityrl.hardware import cpu_description

    env = environment(cpu=cpu_description(), config=str(args.config), prompts=args.prompts)
    rows = []
    for value in args.values:
        start = time.time()
        rows.append(measure(args.config, value, args.prompts) | {"seconds": round(time.time() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    write_results(args.out, {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
