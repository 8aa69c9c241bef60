"""`parityrl ablate`: short RL runs that separate backend effects from objective effects.

What runs is defined in `configs/ablation.yaml` (the configurations reference, naive-v1, fixN-only,
fixed-v1 and, optionally, fixed-v1 with one fix off, settings for every run, and the presets, each
setting with why it is there); `--spec FILE` reads another copy. This module turns it into the matrix of runs (configuration x seed) and runs them.

Each run is a separate `parityrl train` process writing OUT/<config>/seed<N>/; a run whose
summary.json exists is skipped and an interrupted one continues from its checkpoint (`train --resume`),
so an interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from parityrl.config import ConfigError, load_config, read_config_mapping
from parityrl.parity.compare_stats import DEFAULT_REFERENCE, NAIVE
from parityrl.progress import progress_bar

# configs/ at the repository root: parents[3] of src/parityrl/parity/ablate.py
ABLATION_SPEC = Path(__file__).resolve().parents[3] / "configs" / "ablation.yaml"
FIXED = "fixed-v1"
SETTINGS_SECTIONS = ("reference", "naive", "fixed", "every_run")
SECTIONS = (*SETTINGS_SECTIONS, "fixes", "presets")
OPTIONAL_SECTIONS = ("without", "releases")
"""`without:` leave-one-out configurations: fixed-v1 with one fix switched off (what tells whether each fix is needed).
`releases:` configurations run by another vLLM release (`engine.vllm_release`), each on a `base` configuration;
they run only when named with `--only`, since each needs that release's virtualenv."""
RELEASE_KEY = "engine.vllm_release"


@dataclass(frozen=True)
class AblationSpec:
    """configs/ablation.yaml, as `--set` overrides."""

    source: Path
    configurations: dict[str, list[str]]
    """Configuration name -> its overrides, in matrix order: reference, naive-v1, each fix alone, fixed-v1,
    fixed-v1 with each fix off."""
    every_run: list[str]
    presets: dict[str, list[str]]
    on_request: frozenset[str] = frozenset()
    """Configurations that run only when named (`releases:`)."""


def _override_value(value: Any) -> str:
    """`value` as `--set` parses it back (a YAML scalar): plain where that reads back the same, else quoted as JSON."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)  # JSON scalars are YAML scalars: null, true, 0.7, "Add two numbers: "


def _as_overrides(settings: Any, where: str) -> list[str]:
    """A mapping of dotted config keys to scalar values as `key=value` overrides (the value as a YAML scalar)."""
    if settings is None:
        return []
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: expected a mapping of dotted config keys to values (e.g. 'engine.kind: vllm'), got {type(settings).__name__}.")
    overrides = []
    for key, value in settings.items():
        if not isinstance(key, str) or isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: '{key}' must be a dotted config key with a single value (e.g. 'sampling.top_p: 0.9').")
        overrides.append(f"{key}={_override_value(value)}")
    return overrides


def _named_sections(tree: Any, where: str) -> dict[str, list[str]]:
    """`fixes:` / `presets:`: name -> settings mapping."""
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{where}: expected a mapping of names to settings (e.g. 'fix1-only:' with settings below it).")
    return {str(name): _as_overrides(settings, f"{where}.{name}") for name, settings in tree.items()}


def load_ablation_spec(path: Path | None = None) -> AblationSpec:
    """Read and check the ablation definitions (default: configs/ablation.yaml of this checkout)."""
    source = Path(path) if path is not None else ABLATION_SPEC
    if not source.is_file():
        raise ConfigError(
            f"ablation definitions not found: {source}. `parityrl ablate` reads configs/ablation.yaml of the parityrl "
            "source checkout (installed with `pip install -e .`); pass --spec FILE to use another copy."
        )
    tree = read_config_mapping(source)
    missing = [s for s in SECTIONS if s not in tree]
    unknown = [str(s) for s in tree if s not in SECTIONS + OPTIONAL_SECTIONS]
    if missing or unknown:
        found = "; ".join(f"{what}: {', '.join(names)}" for what, names in (("missing", missing), ("unknown", unknown)) if names)
        raise ConfigError(f"{source}: the sections are {', '.join(SECTIONS)}, optionally {', '.join(OPTIONAL_SECTIONS)} ({found}).")
    settings = {s: _as_overrides(tree[s], f"{source}: {s}") for s in SETTINGS_SECTIONS}
    naive = settings["naive"]
    fixes = _named_sections(tree["fixes"], f"{source}: fixes")
    without = _named_sections(tree["without"], f"{source}: without") if "without" in tree else {}
    for section, names in (("fixes", set(fixes)), ("without", set(without))):
        reserved = sorted(names & ({DEFAULT_REFERENCE, NAIVE, FIXED} | (set(fixes) if section == "without" else set())))
        if reserved:
            raise ConfigError(f"{source}: {section}: {', '.join(reserved)} is the name of another configuration; name each differently.")
    configurations = {DEFAULT_REFERENCE: settings["reference"], NAIVE: naive}
    configurations |= {name: naive + fix for name, fix in fixes.items()}
    configurations[FIXED] = settings["fixed"]
    configurations |= {name: settings["fixed"] + off for name, off in without.items()}
    releases = _release_configurations(tree.get("releases"), configurations, f"{source}: releases")
    configurations |= releases
    presets = _named_sections(tree["presets"], f"{source}: presets")
    return AblationSpec(source, configurations, settings["every_run"], presets, frozenset(releases))


def _release_configurations(tree: Any, configurations: dict[str, list[str]], where: str) -> dict[str, list[str]]:
    """`releases:` name -> {base: a configuration above, engine.vllm_release: RELEASE, other settings}: the base's
    settings, then these."""
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of configuration names to settings with `base:` and `{RELEASE_KEY}:`.")
    releases = {}
    for name, entry in tree.items():
        entry = dict(entry) if isinstance(entry, dict) else entry
        base = entry.pop("base", None) if isinstance(entry, dict) else None
        if base not in configurations or name in configurations:
            raise ConfigError(
                f"{where}.{name}: `base:` must name one of {', '.join(configurations)} (got {base!r}), and the name must be new."
            )
        if not isinstance(entry, dict) or RELEASE_KEY not in entry:
            raise ConfigError(f"{where}.{name}: set `{RELEASE_KEY}:` (the vLLM release whose virtualenv runs it).")
        releases[str(name)] = configurations[base] + _as_overrides(entry, f"{where}.{name}")
    return releases


@dataclass
class AblationRun:
    name: str
    seed: int
    overrides: list[str]

    def run_dir(self, out_dir: Path) -> Path:
        return out_dir / self.name / f"seed{self.seed}"


def ablation_matrix(spec: AblationSpec, preset: str, seeds: int, only: list[str] | None = None) -> list[AblationRun]:
    """Every (configuration, seed) run: preset, then the configuration's settings, then every_run, then the seed."""
    if preset not in spec.presets:
        raise ConfigError(f"unknown preset {preset!r}; {spec.source} defines {', '.join(spec.presets)}.")
    configs = spec.configurations
    if only:
        unknown = sorted(set(only) - set(configs))
        if unknown:
            raise ConfigError(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(configs)}.")
        configs = {name: overrides for name, overrides in configs.items() if name in only}
    else:
        configs = {name: overrides for name, overrides in configs.items() if name not in spec.on_request}
    return [
        AblationRun(name, seed, spec.presets[preset] + overrides + spec.every_run + [f"seed={seed}"])
        for seed in range(seeds)
        for name, overrides in configs.items()
    ]


def check_runs(spec: AblationSpec, config_path: Path | None, runs: list[AblationRun]) -> None:
    """Load each configuration's config as its run will, so that a misspelt key or a bad value in the spec stops
    the ablation before any run starts (the seed is the only difference between a configuration's runs)."""
    checked: set[str] = set()
    for run in runs:
        if run.name in checked:
            continue
        checked.add(run.name)
        try:
            load_config(config_path, run.overrides)
        except ConfigError as error:
            raise ConfigError(f"{spec.source}, configuration {run.name}: {error.message}") from None


def interpreter_for(run: AblationRun, config_path: Path | None = None) -> Path:
    """The Python that runs `run`: this one, or where its config names a vLLM release (its overrides on
    `config_path`), that release's virtualenv beside this one (`.venv-vllm-RELEASE`, as
    `scripts/setup.sh --vllm RELEASE` makes it)."""
    release = load_config(config_path, run.overrides).engine.vllm_release
    if release is None:
        return Path(sys.executable)
    python = Path(sys.prefix).parent / f".venv-vllm-{release}" / "bin" / "python"
    if not python.is_file():
        raise ConfigError(
            f"{run.name} runs on vLLM {release} ({RELEASE_KEY}), and there is no {python.parent.parent.name} beside "
            f"{Path(sys.prefix).name}: make it with `bash scripts/setup.sh --vllm {release}`."
        )
    return python


def run_ablation(
    config_path: Path | None, out_dir: Path, preset: str, seeds: int, only: list[str] | None, console: Console, spec_path: Path | None = None
) -> list[Path]:
    spec = load_ablation_spec(spec_path)
    runs = ablation_matrix(spec, preset, seeds, only)
    check_runs(spec, config_path, runs)
    pending = [r for r in runs if not (r.run_dir(out_dir) / "summary.json").is_file()]
    console.print(f"ablation: {len(runs)} runs ({len(runs) - len(pending)} already done) → {out_dir}")
    durations: list[float] = []
    with progress_bar() as progress:
        bar = progress.add_task("ablate", total=len(runs), info="", completed=len(runs) - len(pending))
        for run in pending:
            progress.update(bar, info=f"{run.name} seed {run.seed}")
            run_dir = run.run_dir(out_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            command = [str(interpreter_for(run, config_path)), "-m", "parityrl.cli", "train"]
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

