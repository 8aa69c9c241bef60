"""Per-rank memory of the trainer: one process, two DDP ranks, two FSDP2 ranks, in one invocation.

    .venv/bin/python benchmarks/fsdp_memory.py                      # SmolLM2-135M, 3 steps per layout
    .venv/bin/python benchmarks/fsdp_memory.py --steps 2 --tiny      # smoke run on the tiny model

Each layout runs in fresh processes (gloo ranks on this machine, no engine, no Ray: the trainer alone),
on the same synthetic batch: `--samples` sequences of `--prompt` + `--completion` random tokens with
made-up engine logprobs, GRPO, the config's micro-batching. Measured on every rank:

- `local_state_gib`: the bytes of the weights, gradients and AdamW state this rank holds (its shards
  under FSDP), counted from the tensors after the last step;
- `peak_rss_gib`: the rank's high-water mark (the kernel's `ru_maxrss`), including loading the whole
  model before sharding it;
- `step_s`: the median step after the first;
- `publish_s` / `publish_extra_gib`: gathering the weights for the engines, layer by layer, as a
  publication does (`policy.export_chunks`; each chunk dropped before the next, where a run puts it
  in Ray's object store, whose copy is the publication itself and is not counted here), and the most
  this rank's RSS rose above where it stood before (sampled every 10 ms);
- `publish_whole_s` / `publish_whole_extra_gib`: the same gathered into one dict
  (`export_state_dict`), as publication did before it streamed: the whole copy it held.

Results go to benchmarks/results/fsdp_memory.json with the environment.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import REPO, default_model_dir, environment, write_results  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "smollm2_math.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "fsdp_memory.json"
GIB = 2**30


def rss_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


class PeakSampler:
    """The highest RSS of this process while the block runs (sampled every 10 ms)."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._running = rss_gib(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss_gib())
            time.sleep(0.01)

    def __exit__(self, *_: object) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_gib())


def local_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def synthetic_batch(samples: int, prompt: int, completion: int, vocab: int):
    from parityrl.batch import Sample

    generator = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(samples):
        prompt_ids = torch.randint(10, vocab, (prompt,), generator=generator).tolist()
        completion_ids = torch.randint(10, vocab, (completion,), generator=generator).tolist()
        old = (-torch.rand(completion, generator=generator) * 5).tolist()
        batch.append(Sample(prompt_ids, completion_ids, old, [0] * completion))
    return batch, torch.linspace(-1, 1, samples)


def rank_main(rank: int, world_size: int, port: int, layout: str, args: dict, results: dict) -> None:
    import torch.distributed as dist

    from parityrl.config import load_config
    from parityrl.policy import export_chunks, export_state_dict
    from parityrl.train.trainer import Trainer, global_normaliser

    torch.set_num_threads(args["threads"])
    distributed = layout != "1 process"
    if distributed:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    sets = [*args["sets"], f"train.world_size={world_size}", f"train.fsdp={layout.endswith('FSDP2')}"]
    sets += ["pipeline.backend=ray"] if distributed else []
    config = load_config(args["config"], sets)
    trainer = Trainer(config, Path(args["model_dir"]), pad_id=0, distributed=distributed)
    samples, advantages = synthetic_batch(args["samples"], args["prompt"], args["completion"], trainer.model.config.vocab_size)
    shard = len(samples) // world_size
    mine, my_advantages = samples[rank * shard : (rank + 1) * shard], advantages[rank * shard : (rank + 1) * shard]
    normaliser = global_normaliser(samples, config.train.objective)
    step_s = []
    for _ in range(args["steps"]):
        began = time.perf_counter()
        trainer.step_stats(mine, my_advantages, None, normaliser)
        step_s.append(time.perf_counter() - began)
    parameters = list(trainer.model.parameters())
    weights = sum(local_bytes(p) for p in parameters)
    gradients = sum(local_bytes(p.grad) for p in parameters)
    optimizer = sum(local_bytes(v) for state in trainer.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))
    before = rss_gib()
    with PeakSampler() as streamed:
        began = time.perf_counter()
        for chunk in export_chunks(trainer.model, keep=rank == 0):
            del chunk  # sent on
        publish_s = time.perf_counter() - began
    with PeakSampler() as whole:
        began = time.perf_counter()
        exported = export_state_dict(trainer.model, keep=rank == 0)
        publish_whole_s = time.perf_counter() - began
    del exported
    results[f"{layout}/{rank}"] = {
        "layout": layout,
        "rank": rank,
        "weights_gib": weights / GIB,
        "gradients_gib": gradients / GIB,
        "optimizer_gib": optimizer / GIB,
        "local_state_gib": (weights + gradients + optimizer) / GIB,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_steps_gib": before,
        "step_s": statistics.median(step_s[1:] or step_s),
        "publish_s": publish_s,
        "publish_extra_gib": streamed.peak - before,
        "publish_whole_s": publish_whole_s,
        "publish_whole_extra_gib": whole.peak - before,
    }
    if distributed:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_layout(layout: str, world_size: int, args: dict) -> list[dict]:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(world_size, free_port(), layout, args, results), nprocs=world_size, join=True)
        return [dict(results[key]) for key in sorted(results.keys())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny model instead of the config's")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16, help="sequences per step (split over the ranks)")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--set", dest="sets", action="append", default=["model.dtype=float32"],
                        help="config override (repeatable); model.dtype=float32 by default: bf16 is emulated on CPUs without AVX512-BF16")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    options = parser.parse_args()

    from parityrl.assets import prepare_model
    from parityrl.config import load_config
    from parityrl.tasks import load_task

    if options.tiny:
        model_dir, config_path = default_model_dir(), None
    else:
        config = load_config(options.config, options.sets)
        model_dir, config_path = prepare_model(config, load_task(config.task)), options.config
    args = {"config": config_path, "model_dir": str(model_dir), "steps": options.steps, "samples": options.samples,
            "prompt": options.prompt, "completion": options.completion, "threads": options.threads, "sets": options.sets}
    rows = []
    for layout, world_size in (("1 process", 1), ("2 ranks DDP", 2), ("2 ranks FSDP2", 2)):
        print(f"{layout} ...", flush=True)
        rows += run_layout(layout, world_size, args)
        print(f"  {rows[-1]}", flush=True)
    ddp = [r for r in rows if r["layout"] == "2 ranks DDP"]
    fsdp = [r for r in rows if r["layout"] == "2 ranks FSDP2"]
    ratios = {
        "fsdp_over_ddp_local_state": max(r["local_state_gib"] for r in fsdp) / max(r["local_state_gib"] for r in ddp),
        "fsdp_over_ddp_peak_rss": max(r["peak_rss_gib"] for r in fsdp) / max(r["peak_rss_gib"] for r in ddp),
        "fsdp_over_ddp_step_s": max(r["step_s"] for r in fsdp) / max(r["step_s"] for r in ddp),
        "streamed_over_whole_publish_extra": max(r["publish_extra_gib"] for r in fsdp) / max(r["publish_whole_extra_gib"] for r in fsdp),
    }
    write_results(options.out, {"environment": environment(), "settings": {**args, "argv": sys.argv}, "ratios": ratios, "ranks": rows})
    for row in rows:
        print(f"{row['layout']:>14} rank {row['rank']}: state {row['local_state_gib']:.3f} GiB, peak RSS {row['peak_rss_gib']:.2f} GiB, "
              f"step {row['step_s']:.2f} s, publish {row['publish_s']:.2f} s (+{row['publish_extra_gib']:.2f} GiB; "
              f"whole: +{row['publish_whole_extra_gib']:.2f} GiB)")
    print(ratios)


if __name__ == "__main__":
    main()
