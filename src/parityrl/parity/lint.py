"""`parityrl lint CONFIG`: flag the known backend-parity pitfalls of a run config before it runs.

Each finding has a stable `code`, a `severity` (`error`: the run's importance ratios, clip rate or KL
will be wrong or unbounded; `warning`: legal but risky, version-dependent, or an ablation setting), the
config `key` path, what goes wrong, and the exact fix. Pitfalls checked:

| code | severity | key | what goes wrong |
|------|----------|-----|-----------------|
| `dtype-auto` | error | model.dtype | vLLM's `dtype: auto` silently downcasts an fp32 checkpoint to bf16 on CPU, so engine and trainer run different precisions. parityrl's config only accepts explicit dtypes; `lint_file` inspects the *raw* YAML first so a config migrated from another framework gets this actionable message instead of a bare validation error (the rest of the config is then linted as if `model.dtype` were unset). |
| `raw-logprobs` | error with temperature != 1, active top-k/top-p/min-p or a penalty, else warning | engine.logprobs_mode | `raw_logprobs` reports log-softmax of the unscaled logits, before penalties, temperature and truncation, not the logprob under the distribution sampled from; the trainer's processed logprob differs by far more than numerical noise. At T=1 with every other sampling transform off the two coincide, but the first sampling change silently breaks parity. |
| `trainer-sampling-mismatch` | error | train.logprob_temperature / _top_k / _top_p / _min_p / _repetition_penalty / _presence_penalty / _frequency_penalty | the trainer recomputes logprobs under different sampling transforms than the engine sampled with; every ratio is biased. |
| `prefix-caching-off` | warning | engine.prefix_caching | `off`: every sample prefills its whole prompt again (n times per group; the whole history at every turn), work `versioned` saves without reusing KV across policy versions. |
| `async-scheduling-default` | warning | engine.async_scheduling | `null` leaves it to the installed vLLM's default; the run does not record what was in force. |
| `prefix-caching-stale-kv` | error | engine.prefix_caching | `on` (unsalted, vLLM's default; also the old `enable_prefix_caching: true` or `null`) in a run with weight updates (train.steps > 0): new samples of a prompt reuse KV blocks computed by older weights, mixing policy versions inside one "fresh" sample (fix 2). `versioned` reuses KV within a policy version only. |
| `update-abort` | warning | engine.update_mode | every weight update aborts in-flight requests and clears caches: work is lost and long completions are under-represented, biasing the sample mix toward short ones. |
| `one-sided-fp32-head` | warning | engine.force_one_sided_head | fp32 lm_head on one side only makes the engine/trainer mismatch worse; config validation refuses it unless forced, so a config that reaches lint is an ablation. |
| `bf16-head` | error if vocab >= 32000, else warning | model.lm_head_fp32 / engine.lm_head_fp32 | with a bf16 model and the head in bf16, logits carry ~3 significant digits and engine and trainer GEMMs round them differently; the log-sum-exp over a large vocabulary turns that into a per-token logprob mismatch that dominates the KL. |
| `is-correction-unchecked` | warning | train.is_correction | TIS/MIS on before `parityrl check` has shown the backend is at parity: the correction hides backend bugs as "small clipping". Silenced by `parity_checked=True`. |
| `unbounded-lag` | error (async mode), warning (sync mode, where it is unused) | pipeline.max_lag | `null` = unbounded staleness: samples from arbitrarily old policies enter the batch and the ratios explode as the run goes on. |
| `config-invalid` | error | (varies) | `lint_file` only: the file is missing, a directory, binary, empty, not YAML (reported with its line) or fails validation; nothing else can be linted. |

Exit codes of `lint_file` (and the CLI): 0 = clean or warnings only, 1 = at least one error finding,
2 = the config could not be loaded at all (`config-invalid`).

Every sampling transform of `sampling.*` (temperature, top-k, top-p, min-p, repetition/presence/frequency
penalties, alone or combined) is replayed exactly by the trainer (`policy.apply_penalties`,
`policy.processed_logprobs`, in vLLM V1's order), so no combination of them is a finding by itself.

vLLM-only knobs (logprobs_mode, prefix caching, async scheduling, update_mode) are not checked when
`engine.kind` is `reference`: the reference engine ignores them (it is processed, cache-free and
keeps KV across updates by construction).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from parityrl.config import (
    REPLAYED_SAMPLING_FIELDS,
    ConfigError,
    RunConfig,
    SamplingConfig,
    deep_merge,
    format_validation_error,
    load_config,
    parse_overrides,
    read_config_mapping,
)

Severity = Literal["error", "warning"]

# A vocabulary this large (Llama-2 size and up) makes a bf16 head's rounding error dominate the KL.
LARGE_VOCAB = 32000

EXIT_CLEAN = 0
EXIT_ERRORS = 1
EXIT_UNLOADABLE = 2


@dataclass(frozen=True)
class Finding:
    code: str
    """Stable identifier of the pitfall (see the module docstring's table)."""
    severity: Severity
    key: str
    """Config key path the finding is about."""
    problem: str
    """What goes wrong if the config runs as is."""
    fix: str
    """The exact change that removes the finding."""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# --------------------------------------------------------------------------- raw-mapping checks


def lint_raw(mapping: dict[str, Any]) -> list[Finding]:
    """Pitfalls visible only in the raw YAML mapping, because validation would reject them outright."""
    findings: list[Finding] = []
    model = mapping.get("model")
    if isinstance(model, dict) and str(model.get("dtype", "")).lower() == "auto":
        findings.append(
            Finding(
                code="dtype-auto",
                severity="error",
                key="model.dtype",
                problem="`auto` lets vLLM pick the dtype: it downcasts an fp32 checkpoint to bf16 on CPU, so the "
                "engine samples from a bf16 model while the trainer computes fp32 logprobs.",
                fix="set model.dtype: float32 (or bfloat16, explicitly, on both sides)",
            )
        )
    return findings


def _without_raw_pitfalls(mapping: dict[str, Any]) -> dict[str, Any]:
    """Copy of the mapping with raw-only pitfalls removed, so the rest of the config can still be linted."""
    cleaned = copy.deepcopy(mapping)
    model = cleaned.get("model")
    if isinstance(model, dict) and str(model.get("dtype", "")).lower() == "auto":
        del model["dtype"]  # lint the rest as if the key were unset (the explicit default)
    return cleaned


# --------------------------------------------------------------------------- validated-config checks


def _sampling_is_trivial(config: RunConfig) -> bool:
    """True when raw and processed logprobs coincide: T=1, no top-k/top-p/min-p truncation, no penalty."""
    s = config.sampling
    no_penalty = s.repetition_penalty == 1.0 and s.presence_penalty == 0.0 and s.frequency_penalty == 0.0
    return s.temperature == 1.0 and s.top_k <= 0 and s.top_p >= 1.0 and s.min_p == 0.0 and no_penalty


def _check_logprobs_mode(config: RunConfig) -> list[Finding]:
    if config.engine.logprobs_mode != "raw_logprobs":
        return []
    fix = "set engine.logprobs_mode: processed_logprobs"
    if _sampling_is_trivial(config):
        return [
            Finding(
                "raw-logprobs",
                "warning",
                "engine.logprobs_mode",
                "raw_logprobs equals processed only at temperature 1 without top-k/top-p/min-p or penalties; any sampling change "
                "silently makes the engine's logprobs disagree with the trainer's.",
                fix,
            )
        ]
    s = config.sampling
    shaping = ", ".join(
        f"{name}={getattr(s, name)}" for name in REPLAYED_SAMPLING_FIELDS if getattr(s, name) != SamplingConfig.model_fields[name].default
    )
    return [
        Finding(
            "raw-logprobs",
            "error",
            "engine.logprobs_mode",
            f"raw_logprobs reports log-softmax of the unscaled, unpenalised logits, but tokens are sampled with "
            f"{shaping}: every importance ratio, the clip rate and the KL measure this mismatch instead of the "
            "policy change.",
            fix,
        )
    ]


def _check_trainer_sampling(config: RunConfig) -> list[Finding]:
    findings = []
    trainer, engine = config.trainer_sampling(), config.sampling
    for name in REPLAYED_SAMPLING_FIELDS:
        if getattr(trainer, name) != getattr(engine, name):
            findings.append(
                Finding(
                    "trainer-sampling-mismatch",
                    "error",
                    f"train.logprob_{name}",
                    f"the trainer recomputes logprobs with {name}={getattr(trainer, name)} but the engine samples "
                    f"with sampling.{name}={getattr(engine, name)}: the ratios compare two different distributions.",
                    f"remove train.logprob_{name} (null = sampling.{name})",
                )
            )
    return findings


def _check_runtime_defaults(config: RunConfig) -> list[Finding]:
    engine = config.engine
    findings = []
    if engine.prefix_caching == "on" and config.train.steps > 0:
        findings.append(
            Finding(
                "prefix-caching-stale-kv",
                "error",
                "engine.prefix_caching",
                "prefix caching is on and unsalted in a run with weight updates (fix 2 off): a new sample of a prompt "
                "reuses KV blocks computed by old weights, so a 'fresh' sample silently mixes policy versions.",
                "set engine.prefix_caching: versioned (KV reused within a policy version only) or off",
            )
        )
    if engine.prefix_caching == "off":
        repeated = "the whole history at every turn" if config.task.kind == "environment" else f"each prompt {config.sampling.n} times per group"
        findings.append(
            Finding(
                "prefix-caching-off",
                "warning",
                "engine.prefix_caching",
                f"prefix caching is off: the engine prefills {repeated}, and none of it is reused.",
                "set engine.prefix_caching: versioned (the default: KV reused within a policy version, never across one)",
            )
        )
    if engine.async_scheduling is None:
        findings.append(
            Finding(
                "async-scheduling-default",
                "warning",
                "engine.async_scheduling",
                "null leaves async scheduling to the installed vLLM's default: the numerics-relevant setting "
                "changes with the version and is not what the config says.",
                "set engine.async_scheduling: false",
            )
        )
    return findings


def _check_update_mode(config: RunConfig) -> list[Finding]:
    if config.engine.update_mode != "abort":
        return []
    return [
        Finding(
            "update-abort",
            "warning",
            "engine.update_mode",
            "every weight update aborts in-flight requests and clears the caches: their work is lost and long "
            "completions are under-represented, biasing the sample mix toward short ones.",
            "set engine.update_mode: keep",
        )
    ]


def _check_one_sided_head(config: RunConfig) -> list[Finding]:
    # Validation refuses a one-sided head unless forced, so reaching here means it was forced.
    if config.model.lm_head_fp32 == config.engine.lm_head_fp32:
        return []
    return [
        Finding(
            "one-sided-fp32-head",
            "warning",
            "engine.force_one_sided_head",
            f"fp32 lm_head on one side only (model.lm_head_fp32={config.model.lm_head_fp32}, "
            f"engine.lm_head_fp32={config.engine.lm_head_fp32}): the mismatch is worse than with the head in "
            "bf16 on both sides. Allowed only as an ablation setting.",
            "set model.lm_head_fp32: true, engine.lm_head_fp32: true and remove engine.force_one_sided_head",
        )
    ]


def _check_bf16_head(config: RunConfig, vocab: int | None) -> list[Finding]:
    if config.model.dtype != "bfloat16":
        return []
    heads = {"model.lm_head_fp32": config.model.lm_head_fp32, "engine.lm_head_fp32": config.engine.lm_head_fp32}
    sides = [key for key, fp32 in heads.items() if not fp32]
    if not sides:
        return []
    large = vocab is not None and vocab >= LARGE_VOCAB
    vocab_text = f"vocabulary of {vocab}" if vocab is not None else "vocabulary of unknown size"
    return [
        Finding(
            "bf16-head",
            "error" if large else "warning",
            ", ".join(sides),
            f"bf16 model with the lm_head in bf16 ({vocab_text}): logits keep ~3 significant digits and engine "
            "and trainer kernels round them differently; the log-sum-exp over the vocabulary turns this into a "
            "per-token logprob mismatch" + (" that dominates the KL at this vocabulary size." if large else "."),
            "set model.lm_head_fp32: true and engine.lm_head_fp32: true",
        )
    ]


def _check_is_correction(config: RunConfig, parity_checked: bool) -> list[Finding]:
    if config.train.is_correction == "none" or parity_checked:
        return []
    return [
        Finding(
            "is-correction-unchecked",
            "warning",
            "train.is_correction",
            f"{config.train.is_correction.upper()} is on but engine/trainer parity has not been checked: the "
            "correction down-weights exactly the tokens a backend bug corrupts, hiding the bug as 'small clipping'.",
            "run `parityrl check CONFIG` first (then lint with --parity-checked), or set train.is_correction: none",
        )
    ]


def _check_max_lag(config: RunConfig) -> list[Finding]:
    if config.pipeline.max_lag is not None:
        return []
    # In sync mode the pipeline never reads max_lag, so it is only a trap for a later switch to async.
    is_async = config.pipeline.mode == "async"
    return [
        Finding(
            "unbounded-lag",
            "error" if is_async else "warning",
            "pipeline.max_lag",
            "null = unbounded staleness: samples from arbitrarily old policy versions enter the batch and the "
            "importance ratios grow with the run" + ("." if is_async else " (unused in sync mode, a trap for async)."),
            "set pipeline.max_lag: 1",
        )
    ]


def lint_config(config: RunConfig, model_vocab_size: int | None = None, parity_checked: bool = False) -> list[Finding]:
    """All pitfalls of a validated config, errors first. `model_vocab_size` sharpens the bf16-head check."""
    findings: list[Finding] = []
    if config.engine.kind == "vllm":
        findings += _check_logprobs_mode(config)
        findings += _check_runtime_defaults(config)
        findings += _check_update_mode(config)
    findings += _check_trainer_sampling(config)
    findings += _check_one_sided_head(config)
    findings += _check_bf16_head(config, model_vocab_size)
    findings += _check_is_correction(config, parity_checked)
    findings += _check_max_lag(config)
    return sorted(findings, key=lambda f: f.severity != "error")  # stable: errors first, order kept


# --------------------------------------------------------------------------- files


def read_vocab_size(config: RunConfig) -> int | None:
    """Vocabulary of the configured model: model.path/config.json, else the built tiny model's."""
    if config.model.path is None:
        return config.model.vocab_size
    from parityrl.preflight import model_vocab_size, read_hf_config

    try:
        return model_vocab_size(read_hf_config(Path(config.model.path)))
    except (OSError, ValueError):
        return None  # unknown: the bf16-head check stays a warning


def _invalid(message: str) -> tuple[list[Finding], int]:
    finding = Finding("config-invalid", "error", "<config>", message, "fix the config as the message says")
    return [finding], EXIT_UNLOADABLE


def _read_raw(path: Path, overrides: list[str]) -> dict[str, Any]:
    # the same reader as load_config: a missing, binary, empty or malformed file gets the same message
    loaded = read_config_mapping(path)
    return deep_merge(loaded, parse_overrides(overrides)) if overrides else loaded


def lint_file(
    path: str | Path,
    overrides: list[str] | None = None,
    parity_checked: bool = False,
    model_vocab_size: int | None = None,
) -> tuple[list[Finding], int]:
    """Lint a YAML config file: (findings, exit code 0 clean/warnings, 1 errors, 2 unloadable)."""
    path = Path(path)
    overrides = list(overrides or [])
    try:
        raw = _read_raw(path, overrides)
        raw_findings = lint_raw(raw)
        if raw_findings:
            # validate the remainder ourselves (load_config would stop at the raw pitfall)
            try:
                config = RunConfig.model_validate(_without_raw_pitfalls(raw))
            except ValidationError as error:
                raise ConfigError(format_validation_error(error, RunConfig, str(path))) from None
        else:
            config = load_config(path, overrides)
    except ConfigError as error:
        return _invalid(str(error))
    vocab = model_vocab_size if model_vocab_size is not None else read_vocab_size(config)
    findings = raw_findings + lint_config(config, model_vocab_size=vocab, parity_checked=parity_checked)
    findings = sorted(findings, key=lambda f: f.severity != "error")
    return findings, exit_code(findings)


def exit_code(findings: list[Finding]) -> int:
    if any(f.code == "config-invalid" for f in findings):
        return EXIT_UNLOADABLE
    return EXIT_ERRORS if any(f.severity == "error" for f in findings) else EXIT_CLEAN


# --------------------------------------------------------------------------- rendering


def render_findings(findings: list[Finding], console: Any) -> None:
    """Print findings as a rich table (or a one-line all-clear) on a `rich.console.Console`."""
    from rich.table import Table

    if not findings:
        console.print("[green]no parity pitfalls found[/green]")
        return
    table = Table(title="parityrl lint", show_lines=True)
    table.add_column("severity")
    table.add_column("code", style="bold")
    table.add_column("key")
    table.add_column("problem", ratio=3)
    table.add_column("fix", ratio=2)
    for f in findings:
        colour = "red" if f.severity == "error" else "yellow"
        table.add_row(f"[{colour}]{f.severity}[/{colour}]", f.code, f.key, f.problem, f.fix)
    console.print(table)
    errors = sum(f.severity == "error" for f in findings)
    console.print(f"{errors} error(s), {len(findings) - errors} warning(s)")
