"""Run configuration: pydantic models loaded from YAML.

Defaults live here and nowhere else. Unknown keys are errors that name the key path
and the closest valid key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    """Base for every config section: unknown keys rejected, field docstrings kept."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(Strict):
    path: str | None = None
    """Local HF causal-LM directory (Qwen2/Llama). None builds the tiny embedded model."""
    hidden_size: int = 256
    """Hidden width of the built tiny model (ignored when `path` is set)."""
    num_layers: int = 4
    """Transformer layers of the built tiny model."""
    num_heads: int = 4
    """Attention heads of the built tiny model."""
    intermediate_size: int = 512
    """MLP width of the built tiny model."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype on both trainer and engine. Always explicit: vLLM's `auto` downcasts fp32 to bf16 on CPU."""
    lm_head_fp32: bool = True
    """Trainer side of fix 4: compute the final projection (hidden -> logits) in fp32."""


class SFTConfig(Strict):
    steps: int = 3000
    """Supervised warm-up steps on the task's training split (0 disables the warm-up)."""
    batch_size: int = 64
    """Examples per SFT step."""
    lr: float = 1e-3
    """Peak AdamW learning rate of the warm-up (linear warm-up, then cosine decay to 0)."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up steps."""
    target_success: float | None = 0.35
    """Stop the warm-up once greedy success on 256 training prompts reaches this (checked every 50
    steps), so RL starts from a policy that is sometimes right but far from perfect. None: run all steps."""


class AssetsConfig(Strict):
    cache_dir: str = "runs/assets"
    """Where built tokenizer/model/SFT checkpoints are cached, keyed by a hash of their config."""
    seed: int = 0
    """Seed of the built model's initialisation and SFT data order (independent of the RL seed)."""
    sft: SFTConfig = Field(default_factory=SFTConfig)
    """SFT warm-up that takes the built model from random to 'sometimes right'."""


class TaskConfig(Strict):
    kind: Literal["addition", "jsonl", "hf_dataset"] = "addition"
    """`addition`: embedded a+b= task; `jsonl`: {"prompt","answer"} lines; `hf_dataset`: `datasets.load_from_disk`."""
    max_operand: int = 100
    """Addition: operands are drawn from [0, max_operand)."""
    path: str | None = None
    """File (jsonl) or directory (hf_dataset) holding prompts and answers."""
    prompt_field: str = "prompt"
    """Column/key holding the prompt text."""
    answer_field: str = "answer"
    """Column/key holding the reference answer."""
    reward: Literal["exact", "math_verify"] = "exact"
    """`exact`: stripped completion equals the answer; `math_verify`: math-verify equivalence."""
    eval_size: int = 256
    """Held-out prompts used for the success rate (never trained on)."""
    prompt_prefix: str = ""
    """Text put in front of every prompt (a shared template prefix; SFT sees it too)."""


class SamplingConfig(Strict):
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature. The trainer computes logprobs under the same temperature."""
    top_k: int = -1
    """Keep logits >= the k-th largest; -1 disables."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass; 1.0 disables."""
    max_new_tokens: int = 8
    """Maximum completion length."""
    n: int = 8
    """Samples per prompt (the group used for advantages)."""
    ignore_eos: bool = False
    """Keep generating past EOS up to max_new_tokens (used by checks and benchmarks for fixed lengths)."""


class EngineConfig(Strict):
    kind: Literal["vllm", "reference"] = "vllm"
    """Rollout engine: `vllm` (vLLM V1 AsyncLLM) or `reference` (plain torch sampler, ground truth)."""
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs"
    """Fix 1. `processed_logprobs`: logprob under the distribution sampled from. `raw_logprobs` (naive V1
    default): log-softmax of the unscaled logits, before temperature/top-k/top-p."""
    enable_prefix_caching: bool | None = False
    """Fix 2. Prefix caching lets new requests reuse KV computed by older weights (vLLM 0.32 default: on).
    None leaves it to the installed vLLM's default (lint warns)."""
    async_scheduling: bool | None = False
    """Fix 2. Async scheduling overlaps scheduling with execution. None leaves it to the vLLM default (lint warns)."""
    update_mode: Literal["keep", "abort"] = "keep"
    """Fix 3. `keep`: pause(mode=keep, clear_cache=False) -> load -> resume, in-flight requests continue.
    `abort` (naive default of pause_generation): in-flight requests are aborted and caches cleared."""
    lm_head_fp32: bool = True
    """Fix 4, engine side: run the lm_head in fp32 (vLLM `hf_overrides.head_dtype`)."""
    gpu_memory_utilization: float = 0.2
    """Fraction of device memory vLLM reserves (on CPU: of one NUMA node). 0.92 (vLLM default) fails here."""
    kv_cache_space_gib: float = 1.0
    """VLLM_CPU_KVCACHE_SPACE on CPU: KV cache size in GiB."""
    omp_threads: int = 1
    """CPU only: OpenMP threads for the vLLM worker; the trainer gets the remaining cores."""
    block_size: int | None = None
    """KV-cache block size; None = the vLLM default (128 on CPU, 16 on GPU). Prefix caching reuses whole
    blocks only, so a shared prompt prefix shorter than a block is never reused."""
    max_num_seqs: int = 256
    """Maximum sequences the engine batches at once."""
    enforce_eager: bool = False
    """Skip torch.compile / graph capture: the engine starts in ~20-30 s instead of ~40-70 s on CPU, at some
    cost per step. Worth it for short runs (ablations, checks)."""
    force_one_sided_head: bool = False
    """Allow fp32 lm_head on one side only (engine xor trainer). Refused otherwise: it worsens the mismatch."""


class TrainConfig(Strict):
    steps: int = 120
    """Optimiser steps of RL (one step = one batch of `prompts_per_step` groups)."""
    prompts_per_step: int = 8
    """Prompt groups per optimiser step."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (<= 0 disables)."""
    micro_batch_size: int = 64
    """Sequences per forward/backward; gradients are accumulated over micro-batches."""
    objective: Literal["gspo", "grpo", "reinforce"] = "gspo"
    """`gspo`: sequence ratio exp(mean token log-ratio), clipped; `grpo`: token-level PPO-clip; `reinforce`."""
    advantage: Literal["group_norm", "leave_one_out"] = "group_norm"
    """`group_norm`: (r - mean) / (std + eps) per group; `leave_one_out`: r - mean of the others."""
    clip_low: float | None = None
    """Lower clip epsilon; None picks the objective's usual value (GSPO 3e-4, GRPO 0.2)."""
    clip_high: float | None = None
    """Upper clip epsilon; None picks the objective's usual value (GSPO 4e-4, GRPO 0.2)."""
    is_correction: Literal["none", "tis", "mis"] = "none"
    """Objective-side correction for engine/trainer mismatch: truncated or masked importance sampling.
    Off by default: fix the backend first."""
    is_cap: float = 2.0
    """TIS: cap of the truncated ratio; MIS: tokens whose ratio exceeds it are masked."""
    eval_every: int = 20
    """Evaluate held-out success every this many steps (and at start and end)."""
    checkpoint_every: int = 0
    """Write an HF checkpoint every this many steps (0: only at the end)."""
    threads: int = 1
    """torch threads of the trainer (the engine gets the rest of the cores)."""
    logprob_temperature: float | None = None
    """Temperature the trainer uses to recompute logprobs; None = sampling.temperature (the only consistent
    choice; other values exist to reproduce the pitfall, lint flags them)."""
    logprob_top_k: int | None = None
    """Trainer-side top-k; None = sampling.top_k."""
    logprob_top_p: float | None = None
    """Trainer-side top-p; None = sampling.top_p."""


class PipelineConfig(Strict):
    mode: Literal["async", "sync"] = "async"
    """`async`: PipelineRL-style overlap with inflight weight updates; `sync`: generate, then train."""
    max_lag: int | None = 1
    """Samples whose oldest token is more than this many versions behind the trainer are dropped.
    0 = synchronous on-policy loop; None = unbounded (lint error: staleness grows without limit)."""
    parity_probe_prompts: int = 1
    """Async mode: prompt groups generated right after each weight update and scored by the trainer
    before its next step (not trained on), so `parity/*` has lag-0 tokens even when every training
    sequence is one version behind. 0 disables; sync mode never needs it."""
    max_inflight_groups: int | None = None
    """Prompt groups being generated at once; None = prompts_per_step * max(1, max_lag)."""


class LoggingConfig(Strict):
    tensorboard: bool = True
    """Also write TensorBoard event files into RUN_DIR/tb."""
    wandb: bool = False
    """Also log to Weights & Biases (requires `wandb` installed and configured)."""


class RunConfig(Strict):
    """A whole run. Every section below has its own documented fields."""

    seed: int = 0
    """RL seed: prompt order, sampling."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Policy model."""
    assets: AssetsConfig = Field(default_factory=AssetsConfig)
    """Offline asset building (tiny model, tokenizer, SFT warm-up)."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    """Verifiable task: prompts and reward."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Sampling parameters shared by the engine and the trainer's logprob computation."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    """Rollout engine and the four backend fixes."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Trainer."""
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    """Generation/training overlap."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Metric sinks besides RUN_DIR/metrics.jsonl."""

    def trainer_sampling(self) -> SamplingConfig:
        """Sampling parameters the trainer recomputes logprobs with (train.logprob_* overrides)."""
        return self.sampling.model_copy(
            update={
                "temperature": self.train.logprob_temperature or self.sampling.temperature,
                "top_k": self.train.logprob_top_k if self.train.logprob_top_k is not None else self.sampling.top_k,
                "top_p": self.train.logprob_top_p or self.sampling.top_p,
            }
        )

    @model_validator(mode="after")
    def _refuse_one_sided_fp32_head(self) -> RunConfig:
        if self.model.lm_head_fp32 != self.engine.lm_head_fp32 and not self.engine.force_one_sided_head:
            raise ValueError(
                "fp32 lm_head is on for one side only (model.lm_head_fp32="
                f"{self.model.lm_head_fp32}, engine.lm_head_fp32={self.engine.lm_head_fp32}); this makes the "
                "engine/trainer mismatch worse. Set both to the same value, or engine.force_one_sided_head=true "
                "for an ablation."
            )
        return self


class ConfigError(ValueError):
    """A config that cannot be used, with a message that says where and how to fix it."""


def _section_fields(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the config section reached by `loc` (the path up to the bad key)."""
    cls: Any = model_cls
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return list(cls.model_fields)


def format_validation_error(error: ValidationError, model_cls: type[BaseModel], source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        loc = tuple(item["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        if item["type"] == "extra_forbidden":
            candidates = _section_fields(model_cls, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), candidates, n=1, cutoff=0.5)
            hint = f" Did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            valid = ", ".join(candidates)
            lines.append(f"  unknown key '{path}'.{hint} Valid keys here: {valid}")
        else:
            lines.append(f"  {path}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['train.lr=1e-4', ...] into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got '{item}'")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (None = all defaults) and apply `key.path=value` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data, source = loaded, str(path)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, RunConfig, source)) from None


def config_hash(payload: Any) -> str:
    """Stable short hash of a JSON-able payload (used to key cached assets)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_fields(model_cls: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, docstring) for every leaf field: the README's config reference."""
    rows: list[tuple[str, str, str]] = []
    instance = model_cls()
    for name, field in model_cls.model_fields.items():
        annotation = field.annotation
        key = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.append((key, "(section)", field.description or ""))
            rows.extend(describe_fields(annotation, prefix=f"{key}."))
        else:
            rows.append((key, repr(getattr(instance, name)), " ".join((field.description or "").split())))
    return rows


def reference_markdown() -> str:
    """The README's configuration reference table, generated from the models (a test keeps it in sync)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in describe_fields(RunConfig):
        if default == "(section)":
            lines.append(f"| **`{key}`** | | {doc} |")
        else:
            lines.append(f"| `{key}` | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)
