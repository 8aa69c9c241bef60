"""Rollout throughput on a variable-length workload, four backends measured in one run.

    .venv/bin/python benchmarks/engine_throughput.py            # 256 requests, 8-64 new tokens, fp32

Workload: `--requests` prompts of the embedded addition task ("a+b=" with the chat template), each with
its own number of new tokens drawn uniformly from [--min-tokens, --max-tokens]. Every request samples
at temperature 1 with `ignore_eos`, so its length is exactly the requested one, and the logprob of
every sampled token is returned as a *processed* logprob (fix 1), with the lm_head in fp32 (fix 4).

Backends (each: one untimed warm-up pass over the whole workload, then `--repeats` timed passes):

  (a) raw_llm      vLLM's offline `vllm.LLM.generate`, all requests in one call, with exactly the engine
                   arguments `VLLMEngine` would use (minus its worker extension). Runs in a child
                   process, so its EngineCore is gone before the next engine starts.
  (b) vllm_engine  parityrl's `VLLMEngine` (AsyncLLM, streaming DELTA outputs, per-token version tags),
                   one `generate` call per request, all concurrent. Also in a child process.
  (c) hf_generate  HF `model.generate` on the same weights (`load_policy`), left-padded batches of
                   `--hf-batch-size` rows; a batch runs every row to its longest request, so tokens past
                   a row's own length are computed and thrown away (counted as generated, not useful).
  (d) reference    parityrl's `ReferenceEngine` (KV-cached torch sampler, the parity ground truth). It
                   schedules requests with identical sampling settings together, so each distinct
                   length is its own wave.

Reported: useful tokens/s (sum of requested lengths / wall time of a pass; median over repeats) and the
ratios vllm_engine/raw_llm (target >= 0.9: the wrapper's overhead), vllm_engine/hf_generate and
vllm_engine/reference. Absolute numbers depend on the machine and its load; the ratios are what the
project reports (DESIGN.md "Acceptance figures"). Only one vLLM engine is alive at any time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import REPO, default_model_dir, environment, write_results  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "engine_throughput.json"
LOG_DIR = REPO / "runs" / "benchmarks"
WRAPPER_TARGET = 0.9
CHILD_TIMEOUT_S = 1800


# ---------------------------------------------------------------------------------------------------
# Workload and results
# ---------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    prompts: list[list[int]]
    lengths: list[int]
    dtype: str
    model_dir: str
    repeats: int
    seed: int = 0

    @property
    def useful_tokens(self) -> int:
        return sum(self.lengths)


@dataclass
class BackendResult:
    name: str
    useful_tokens: int
    generated_tokens: int
    seconds: list[float]
    start_s: float | None = None
    loadavg_before: list[float] = field(default_factory=list)
    loadavg_after: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tok_s(self) -> float:
        """Useful tokens per second of the median pass."""
        return self.useful_tokens / self.median_s

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "median_s": self.median_s,
            "useful_tok_s": self.tok_s,
            "useful_tok_s_per_pass": [self.useful_tokens / s for s in self.seconds],
            "wasted_frac": 1.0 - self.useful_tokens / self.generated_tokens if self.generated_tokens else 0.0,
        }


def build_workload(model_dir: Path, args: argparse.Namespace) -> Workload:
    from parityrl.policy import load_tokenizer
    from parityrl.tasks import encode_prompt

    tokenizer = load_tokenizer(model_dir)
    rng = random.Random(args.seed)
    prompts = [encode_prompt(tokenizer, f"{rng.randrange(100)}+{rng.randrange(100)}=") for _ in range(args.requests)]
    lengths = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(args.requests)]
    return Workload(prompts, lengths, args.dtype, str(model_dir), args.repeats, args.seed)


# ---------------------------------------------------------------------------------------------------
# (a) raw vllm.LLM and (b) VLLMEngine: each in its own child process
# ---------------------------------------------------------------------------------------------------


def vllm_engine_args(workload: Workload) -> dict[str, Any]:
    """The engine arguments VLLMEngine passes to vLLM (and the env vars it sets), reused for raw LLM."""
    from parityrl.config import EngineConfig
    from parityrl.engines.vllm import VLLMEngine

    prototype = VLLMEngine(workload.model_dir, workload.dtype, EngineConfig(), seed=workload.seed)
    prototype._configure_environment()
    engine_args = prototype._build_engine_args()
    engine_args.pop("worker_extension_cls")  # raw vLLM: no parityrl code in the worker
    return engine_args


def child_raw_llm(workload: Workload) -> BackendResult:
    engine_args = vllm_engine_args(workload)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    began = time.perf_counter()
    llm = LLM(**engine_args)
    start_s = time.perf_counter() - began
    prompts = [TokensPrompt(prompt_token_ids=p) for p in workload.prompts]

    def one_pass(seed_base: int) -> tuple[float, int]:
        params = [
            SamplingParams(temperature=1.0, max_tokens=length, logprobs=0, seed=seed_base + i, ignore_eos=True, detokenize=False)
            for i, length in enumerate(workload.lengths)
        ]
        began = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - began
        for output in outputs:  # logprobs came back for every token
            assert len(output.outputs[0].logprobs or []) == len(output.outputs[0].token_ids)
        return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)

    one_pass(10**6)  # warm-up
    passes = [one_pass(1000 * k) for k in range(workload.repeats)]
    generated = passes[0][1]
    assert generated == workload.useful_tokens, (generated, workload.useful_tokens)
    return BackendResult(
        "raw_llm", workload.useful_tokens, generated, [s for s, _ in passes], start_s,
        settings={
            "api": "vllm.LLM.generate",
            "engine_args": {k: repr(v) for k, v in engine_args.items()},
            "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU_")},
        },
    )


async def timed_engine_passes(engine, workload: Workload) -> tuple[float, list[float], dict]:
    """Start a `RolloutEngine`, run a warm-up pass and `repeats` timed passes of the workload, close it.

    Returns (start-up seconds, seconds per timed pass, engine settings). Every pass must produce all
    requested tokens, each with a logprob and a version tag.
    """
    from parityrl.config import SamplingConfig

    began = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - began

    async def one_pass(tag: str) -> float:
        jobs = [
            engine.generate(prompt, SamplingConfig(temperature=1.0, max_new_tokens=length, n=1, ignore_eos=True), f"{tag}-{i}")
            for i, (prompt, length) in enumerate(zip(workload.prompts, workload.lengths))
        ]
        began = time.perf_counter()
        samples = [group[0] for group in await asyncio.gather(*jobs)]
        seconds = time.perf_counter() - began
        for sample in samples:
            assert len(sample.logprobs_old) == len(sample.version_per_token) == len(sample.completion_token_ids)
        generated = sum(len(s.completion_token_ids) for s in samples)
        assert generated == workload.useful_tokens, (generated, workload.useful_tokens)
        return seconds

    try:
        await one_pass("warmup")
        passes = [await one_pass(f"pass{k}") for k in range(workload.repeats)]
        settings = engine.settings()
    finally:
        await engine.close()
    return start_s, passes, settings


def child_vllm_engine(workload: Workload) -> BackendResult:
    from parityrl.config import EngineConfig
    from parityrl.engines.vllm import VLLMEngine

    engine = VLLMEngine(workload.model_dir, workload.dtype, EngineConfig(), seed=workload.seed, stream=True)
    start_s, passes, settings = asyncio.run(timed_engine_passes(engine, workload))
    return BackendResult("vllm_engine", workload.useful_tokens, workload.useful_tokens, passes, start_s, settings=settings)


CHILDREN = {"raw_llm": child_raw_llm, "vllm_engine": child_vllm_engine}


def run_child(name: str, workload: Workload) -> BackendResult:
    """Run one vLLM backend in a fresh Python process and wait for it (and its engine) to exit."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"engine_throughput.{name}.log"
    with tempfile.TemporaryDirectory(prefix="parityrl-bench-") as tmp:
        spec, out = Path(tmp) / "workload.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(asdict(workload)))
        loadavg_before = list(os.getloadavg())
        with log_path.open("w") as log:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name, "--child-spec", str(spec), "--child-out", str(out)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, timeout=CHILD_TIMEOUT_S, check=False,
            )
        if proc.returncode != 0 or not out.is_file():
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
            raise RuntimeError(f"{name} child failed (exit {proc.returncode}); log {log_path}:\n{tail}")
        data = json.loads(out.read_text())
    result = BackendResult(**data)
    result.loadavg_before, result.loadavg_after = loadavg_before, list(os.getloadavg())
    return result


def child_main(name: str, spec: Path, out: Path) -> None:
    workload = Workload(**json.loads(spec.read_text()))
    result = CHILDREN[name](workload)
    out.write_text(json.dumps(asdict(result), default=str))


# ---------------------------------------------------------------------------------------------------
# (c) HF generate and (d) ReferenceEngine: in this process, after the vLLM children have exited
# ---------------------------------------------------------------------------------------------------


def bench_hf_generate(workload: Workload, threads: int, batch_size: int) -> BackendResult:
    import torch
    from transformers import GenerationConfig

    from parityrl.decoding import left_pad
    from parityrl.policy import load_policy, processed_logprobs

    torch.set_num_threads(threads)
    loadavg_before = list(os.getloadavg())
    began = time.perf_counter()
    model = load_policy(workload.model_dir, workload.dtype, lm_head_fp32=True).eval()
    model.generation_config.eos_token_id = None  # ignore_eos: never stop early
    start_s = time.perf_counter() - began
    batch_size = batch_size or len(workload.prompts)
    batches = [
        (workload.prompts[i : i + batch_size], workload.lengths[i : i + batch_size])
        for i in range(0, len(workload.prompts), batch_size)
    ]

    @torch.no_grad()
    def one_pass(seed: int) -> tuple[float, int]:
        torch.manual_seed(seed)
        generated = 0
        began = time.perf_counter()
        for prompts, lengths in batches:
            input_ids, attention = left_pad(prompts, pad_id=0)
            config = GenerationConfig(
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max(lengths), eos_token_id=None,
                pad_token_id=0, output_logits=True, return_dict_in_generate=True,
            )
            out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
            new_tokens = out.sequences[:, input_ids.shape[1] :]
            logprobs = processed_logprobs(torch.stack(out.logits, dim=1), new_tokens, 1.0)  # fix 1, as the others
            assert new_tokens.shape[1] == max(lengths) and logprobs.shape == new_tokens.shape
            generated += new_tokens.numel()
        return time.perf_counter() - began, generated

    one_pass(10**6)
    passes = [one_pass(k) for k in range(workload.repeats)]
    return BackendResult(
        "hf_generate", workload.useful_tokens, passes[0][1], [s for s, _ in passes], start_s, loadavg_before, list(os.getloadavg()),
        settings={"torch_threads": threads, "batch_size": batch_size, "attn_implementation": "eager (load_policy)"},
    )


def bench_reference(workload: Workload, threads: int) -> BackendResult:
    from parityrl.engines.reference import ReferenceEngine

    engine = ReferenceEngine(Path(workload.model_dir), workload.dtype, lm_head_fp32=True, seed=workload.seed, threads=threads)
    loadavg_before = list(os.getloadavg())
    start_s, passes, settings = asyncio.run(timed_engine_passes(engine, workload))
    return BackendResult(
        "reference", workload.useful_tokens, workload.useful_tokens, passes, start_s, loadavg_before, list(os.getloadavg()),
        settings={**settings, "torch_threads": threads, "max_batch": engine.max_batch},
    )


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def ratios(results: dict[str, BackendResult]) -> dict[str, float | None]:
    def ratio(a: str, b: str) -> float | None:
        return results[a].tok_s / results[b].tok_s if a in results and b in results else None

    return {
        "vllm_engine_over_raw_llm": ratio("vllm_engine", "raw_llm"),
        "vllm_engine_over_hf_generate": ratio("vllm_engine", "hf_generate"),
        "vllm_engine_over_reference": ratio("vllm_engine", "reference"),
        "raw_llm_over_hf_generate": ratio("raw_llm", "hf_generate"),
    }


def print_report(results: dict[str, BackendResult], summary: dict[str, float | None], workload: Workload) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 100))  # never squeeze columns when piped to a file
    table = Table(
        title=f"{len(workload.prompts)} requests, {min(workload.lengths)}-{max(workload.lengths)} new tokens "
        f"({workload.useful_tokens} useful), {workload.dtype}, fp32 head, processed logprobs; "
        f"pass s = median of {workload.repeats} timed passes"
    )
    for column in ("backend", "start s", "gen tok", "wasted", "pass s", "useful tok/s", "passes min-max"):
        table.add_column(column, justify="left" if column == "backend" else "right", no_wrap=True)
    for result in results.values():
        data = result.to_json()
        table.add_row(
            result.name,
            f"{result.start_s:.1f}" if result.start_s is not None else "-",
            str(result.generated_tokens),
            f"{data['wasted_frac']:.0%}",
            f"{result.median_s:.2f}",
            f"{result.tok_s:,.0f}",
            f"{min(data['useful_tok_s_per_pass']):,.0f}-{max(data['useful_tok_s_per_pass']):,.0f}",
        )
    console.print(table)
    ratio_table = Table(title="ratios (useful tok/s, median passes)")
    ratio_table.add_column("ratio", no_wrap=True)
    ratio_table.add_column("value", justify="right")
    ratio_table.add_column("note")
    notes = {"vllm_engine_over_raw_llm": f"target >= {WRAPPER_TARGET}"}
    for key, value in summary.items():
        note = notes.get(key, "")
        if key == "vllm_engine_over_raw_llm" and value is not None:
            note += " [green]met[/]" if value >= WRAPPER_TARGET else " [red]NOT met[/]"
        ratio_table.add_row(key, "-" if value is None else f"{value:.2f}", note)
    console.print(ratio_table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256, help="number of requests (prompts, one sample each)")
    parser.add_argument("--min-tokens", type=int, default=8, help="shortest new-token length (inclusive)")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest new-token length (inclusive)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype (head stays fp32)")
    parser.add_argument("--model-dir", type=Path, default=None, help="local HF model dir (default: build the tiny model under runs/bench-assets)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per backend (after one warm-up pass)")
    parser.add_argument("--seed", type=int, default=0, help="workload and sampling seed")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads of hf_generate/reference (vLLM's worker uses EngineConfig.omp_threads=1)")
    parser.add_argument("--hf-batch-size", type=int, default=0, help="rows per HF generate batch (0: all requests in one batch)")
    parser.add_argument(
        "--backends", default="raw_llm,vllm_engine,hf_generate,reference", help="comma-separated subset of the four backends"
    )
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--child-spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.child_spec, args.child_out)
        return
    if not 1 <= args.min_tokens <= args.max_tokens:
        raise SystemExit("--min-tokens must be >= 1 and <= --max-tokens")
    env = environment()
    model_dir = args.model_dir or default_model_dir()
    workload = build_workload(model_dir, args)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results: dict[str, BackendResult] = {}
    for name in backends:  # sequential: at most one engine alive
        print(f"[engine_throughput] {name} ...", flush=True)
        if name in CHILDREN:
            results[name] = run_child(name, workload)
        elif name == "hf_generate":
            results[name] = bench_hf_generate(workload, args.torch_threads, args.hf_batch_size)
        elif name == "reference":
            results[name] = bench_reference(workload, args.torch_threads)
        else:
            raise SystemExit(f"unknown backend {name!r}")
        print(f"[engine_throughput] {name}: {results[name].tok_s:,.0f} useful tok/s", flush=True)
    summary = ratios(results)
    env["loadavg_at_end"] = list(os.getloadavg())
    print_report(results, summary, workload)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "engine_throughput",
        "environment": env,
        "workload": {
            "requests": len(workload.prompts), "min_tokens": args.min_tokens, "max_tokens": args.max_tokens,
            "useful_tokens": workload.useful_tokens, "dtype": workload.dtype, "model_dir": workload.model_dir,
            "repeats": workload.repeats, "seed": workload.seed, "temperature": 1.0, "ignore_eos": True,
            "logprobs": "processed, sampled token only", "lm_head": "float32",
            "torch_threads": args.torch_threads, "hf_batch_size": args.hf_batch_size or len(workload.prompts),
        },
        "results": {name: result.to_json() for name, result in results.items()},
        "ratios": summary,
        "wrapper_target": WRAPPER_TARGET,
        "wrapper_target_met": None if summary["vllm_engine_over_raw_llm"] is None else summary["vllm_engine_over_raw_llm"] >= WRAPPER_TARGET,
    }
    write_results(args.out, payload)
    print(f"[engine_throughput] wrote {args.out}")


if __name__ == "__main__":
    main()
