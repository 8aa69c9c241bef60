"""Where bf16 parity/kl comes from on a real model: the same engine samples scored by three trainers.

    .venv/bin/python scripts/bf16_floor.py [CONFIG] [--prompts 8] [--out docs/smollm2/bf16_floor.json]

The engine (CONFIG's, default configs/smollm2_math.yaml: SmolLM2 in bf16 with the fp32 head) samples
`--prompts` held-out prompts x sampling.n, once compiled and once with enforce_eager (one engine at a
time, each in a child process). Each sample's processed logprobs are then recomputed by:

  a_fp32_master_autocast  the trainer as it trains: fp32 master weights, bf16 autocast (residual fp32)
  b_bf16_weights          the HF model stored in bf16 (its residual stream bf16, as vLLM runs it)
  c_fp32                  the checkpoint's own (fp32) weights in fp32 compute
  d_bf16_weights_fp32     the engine's weights (the checkpoint rounded to bf16 as vLLM loads it), upcast,
                          in fp32 compute: the exact model the engine holds

d's distance from the engine is the engine's own bf16 arithmetic: no trainer that does not reproduce
vLLM's kernels bit for bit can get closer. c adds the rounding of the weights to it (`parityrl check`
reports c as parity_fp32/kl); a - d is what the trainer's own bf16 rounding adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

VARIANTS = [
    # (name, dtype the weights are loaded in, compute dtype): fp32 compute upcasts the loaded weights
    ("a_fp32_master_autocast", "float32", "bfloat16"),
    ("b_bf16_weights", "bfloat16", "bfloat16"),
    ("c_fp32", "float32", "float32"),
    ("d_bf16_weights_fp32", "bfloat16", "float32"),
]


def generate(config_path: str, eager: bool, prompts: int, out: Path) -> None:
    from parityrl.assets import prepare_model
    from parityrl.config import load_config
    from parityrl.engines import make_engine
    from parityrl.parity.check import generate_all
    from parityrl.policy import load_tokenizer
    from parityrl.tasks import load_task, task_prompt_ids

    config = load_config(config_path, [f"engine.enforce_eager={str(eager).lower()}"])
    task = load_task(config.task)
    model_dir = prepare_model(config, task)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = [task_prompt_ids(tokenizer, task, p.prompt) for p in task.eval[:prompts]]

    async def run():
        engine = make_engine(config, model_dir)
        await engine.start()
        try:
            return await asyncio.wait_for(generate_all(engine, prompt_ids, config.sampling, "floor"), 900), engine.settings()
        finally:
            await engine.close()

    samples, settings = asyncio.run(run())
    out.write_bytes(pickle.dumps({"samples": samples, "model_dir": str(model_dir), "settings": settings}))


def score(config_path: str, samples_file: Path) -> dict:
    from parityrl.config import load_config
    from parityrl.parity.check import compare, trainer_logprobs
    from parityrl.policy import load_policy

    config = load_config(config_path)
    data = pickle.loads(samples_file.read_bytes())
    samples, sampling = data["samples"], config.trainer_sampling()
    rows = {"tokens": sum(len(s.completion_token_ids) for s in samples)}
    for name, weights_dtype, compute_dtype in VARIANTS:
        model = load_policy(data["model_dir"], weights_dtype, config.model.lm_head_fp32).eval()
        if compute_dtype == "float32":
            model = model.float()
        recomputed = [lp for i in range(0, len(samples), 8) for lp in trainer_logprobs(model, samples[i : i + 8], sampling, compute_dtype)]
        rows[name] = compare(samples, recomputed).summary("parity")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/smollm2_math.yaml")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("docs/smollm2/bf16_floor.json"))
    parser.add_argument("--generate", choices=["compiled", "eager"], help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:  # the child process: one engine, then exit (its processes go with it)
        generate(args.config, args.generate == "eager", args.prompts, args.samples)
        return
    torch.set_num_threads(2)
    from parityrl.hardware import cpu_description

    results = {"command": " ".join(["scripts/bf16_floor.py", *sys.argv[1:]]), "config": args.config, "cpu": cpu_description()}
    with tempfile.TemporaryDirectory() as work:
        for engine in ("compiled", "eager"):
            samples_file = Path(work) / f"{engine}.pkl"
            subprocess.run([sys.executable, __file__, args.config, "--prompts", str(args.prompts), "--generate", engine,
                            "--samples", str(samples_file)], check=True)
            results[engine] = score(args.config, samples_file)
            print(engine, {name: row["parity/kl"] for name, row in results[engine].items() if isinstance(row, dict)}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
