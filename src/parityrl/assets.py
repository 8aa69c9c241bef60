"""Offline assets: a character-level tokenizer, a tiny Qwen2 model, and an SFT warm-up.

Everything is deterministic from `assets.seed` and cached under `assets.cache_dir/<hash>` where the
hash covers every input that changes the result, so a second run (or another seed of RL) reuses it.
Nothing is downloaded: `model.path` replaces the built model with any local HF directory.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from parityrl.config import RunConfig, TaskConfig, config_hash, load_config
from parityrl.errors import InputError
from parityrl.hardware import torch_threads
from parityrl.policy import load_policy, load_tokenizer, sequence_logits
from parityrl.preflight import check_model_dir
from parityrl.progress import progress_bar
from parityrl.tasks import Task, encode_prompt, load_task

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# BOS in every prompt, SFT and RL alike: the tiny model needs an anchor for position 0. A system
# message ends with a newline, so the ids equal those of chat_template=none (system + "\n" + prompt).
# An assistant turn ends with EOS, the token the model stops on: a multi-turn episode's ids then equal
# the template's rendering of the conversation (`episodes.ChatCodec.check`).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'system' %}{{ '\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)
MODEL_VOCAB = 128  # 4 specials + 96 printable characters, padded to a multiple of 64 (model.vocab_size's default)


def build_tokenizer(out_dir: Path):
    """Character-level PreTrainedTokenizerFast over printable ASCII + newline, with a prompt template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [chr(code) for code in range(32, 127)] + ["\n"]
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + characters)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_model(config: RunConfig, tokenizer, out_dir: Path) -> None:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(config.assets.seed)
    model_config = Qwen2Config(
        vocab_size=config.model.vocab_size,
        hidden_size=config.model.hidden_size,
        intermediate_size=config.model.intermediate_size,
        num_hidden_layers=config.model.num_layers,
        num_attention_heads=config.model.num_heads,
        num_key_value_heads=config.model.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,  # an untied head: the fp32-head fix acts on a real separate matrix
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",  # built and warmed up in fp32; runs cast to model.dtype when they load it
    )
    model = Qwen2ForCausalLM(model_config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(str(out_dir))


SHAPE_FIELDS = {"hidden_size", "num_layers", "num_heads", "intermediate_size"}


def base_config(config: RunConfig) -> RunConfig | None:
    """The config named by `assets.init_from` (its asset cached next to this one's), or None when unset."""
    if config.assets.init_from is None:
        return None
    base = load_config(config.assets.init_from)  # a ConfigError names the file and the key
    source = f"assets.init_from ({config.assets.init_from})"
    if base.model.path is not None or base.model.pretrained is not None or base.assets.init_from is not None:
        raise InputError(
            f"{source} must build its model from scratch (model.path, model.pretrained and assets.init_from unset there); point init_from at a config that does"
        )
    ours, theirs = config.model.model_dump(include=SHAPE_FIELDS), base.model.model_dump(include=SHAPE_FIELDS)
    if ours != theirs:
        raise InputError(f"{source} builds a model of another shape ({theirs}) than this config ({ours}); set the same model sizes in both files")
    if base.model.vocab_size > config.model.vocab_size:
        raise InputError(
            f"{source} has model.vocab_size {base.model.vocab_size}, more than this config's {config.model.vocab_size}; a head can be grown, not cut"
        )
    return base.model_copy(update={"assets": base.assets.model_copy(update={"cache_dir": config.assets.cache_dir})})


def grow_model(config: RunConfig, base_dir: Path, out_dir: Path) -> None:
    """Save the model of `base_dir` in `out_dir` with its embedding and head grown to `model.vocab_size` rows.

    The new rows are drawn as in a freshly built model (normal, std `initializer_range`, seeded by
    `assets.seed`) rather than at the old rows' mean: at the mean, every unused token would start
    as likely as an average used one. The warm-up that follows pushes them down."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
    torch.manual_seed(config.assets.seed)
    model.resize_token_embeddings(config.model.vocab_size, mean_resizing=False)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    GenerationConfig.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))


def sft_batch(
    tokenizer, problems, eos_id: int, pad_id: int, *, chat_template: str = "auto", system_prompt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, loss_mask) [batch, seq]; loss on answer + EOS only."""
    rows, masks = [], []
    for problem in problems:
        prompt_ids = encode_prompt(tokenizer, problem.prompt, chat_template=chat_template, system_prompt=system_prompt)
        answer_ids = tokenizer(problem.answer, add_special_tokens=False)["input_ids"] + [eos_id]
        rows.append(prompt_ids + answer_ids)
        masks.append([0] * len(prompt_ids) + [1] * len(answer_ids))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        loss_mask[i, : len(row)] = torch.tensor(mask, dtype=torch.float32)
    return input_ids, attention, loss_mask


SUCCESS_CHECK_EVERY = 50
"""SFT steps between greedy-success probes: finer checks land the start closer to `target_success`."""


def sft_warmup(config: RunConfig, task: Task, model_dir: Path) -> dict:
    """Teacher-forced warm-up on the task's training split; returns a summary written next to the model."""
    from parityrl.evaluate import greedy_success  # evaluation sits above assets (it uses the prompt template)

    sft = config.assets.sft
    tokenizer = load_tokenizer(model_dir)
    model = load_policy(model_dir, "float32", lm_head_fp32=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=sft.lr, weight_decay=0.0)
    # linear warm-up then cosine decay: at constant 2e-3 the tiny model plateaus far lower
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / sft.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / sft.steps))
    )
    rng = random.Random(config.assets.seed)
    torch.manual_seed(config.assets.seed)
    start = time.time()
    loss_value = float("nan")
    probe = task.train[:: max(1, len(task.train) // 256)][:256]
    success = None
    steps_done = 0
    # Float reduction order depends on torch's thread count, and 500 chaotic SFT steps turn a
    # last-bit difference into a 10-point difference in start success. One thread makes the
    # asset bit-identical across core counts and load (same CPU type and torch build).
    with torch_threads(1), progress_bar() as progress:
        bar = progress.add_task("SFT warm-up", total=sft.steps, info="")
        for step in range(sft.steps):
            input_ids, attention, loss_mask = sft_batch(
                tokenizer,
                task.sample_train(rng, sft.batch_size),
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                chat_template=task.chat_template,
                system_prompt=task.system_prompt,
            )
            logits = sequence_logits(model, input_ids, attention)[:, :-1]
            targets = input_ids[:, 1:]
            token_loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view_as(targets)
            mask = loss_mask[:, 1:]
            loss = (token_loss * mask).sum() / mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_value = 0.9 * loss_value + 0.1 * loss.item() if step else loss.item()
            steps_done = step + 1
            if sft.target_success is not None and steps_done % SUCCESS_CHECK_EVERY == 0:
                success = greedy_success(model, tokenizer, task, probe)
                model.train()
                if success >= sft.target_success:
                    progress.update(bar, completed=steps_done, info=f"loss {loss_value:.3f} · success {success:.2f} (target reached)")
                    break
            progress.update(bar, completed=steps_done, info=f"loss {loss_value:.3f} · success {success if success is not None else float('nan'):.2f}")
    model.eval()
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return {
        "sft_steps": steps_done,
        "final_loss": loss_value,
        "train_probe_success": success,
        "seconds": round(time.time() - start, 1),
    }


SHARED_LOGIT_PROBE = 256
"""Training problems whose positions (prompt and answer) fix the shared logit's direction and scale."""


@torch.no_grad()
def final_hidden_states(model, tokenizer, task: Task) -> torch.Tensor:
    """[positions, hidden]: the final hidden states (after the final norm) at every position of the first
    SHARED_LOGIT_PROBE training problems, prompt and answer."""
    input_ids, attention, _ = sft_batch(
        tokenizer, task.train[:SHARED_LOGIT_PROBE], tokenizer.eos_token_id, tokenizer.pad_token_id,
        chat_template=task.chat_template, system_prompt=task.system_prompt,
    )
    position_ids = (attention.cumsum(dim=-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention, position_ids=position_ids).last_hidden_state
    return hidden[attention.bool()]


@torch.no_grad()
def median_top_logit(model_dir: Path, task: Task) -> float:
    """The median over `final_hidden_states`' positions of the largest logit: where bf16 rounds the logits."""
    model = load_policy(model_dir, "float32", lm_head_fp32=False).eval()
    return _median_top_logit(final_hidden_states(model, load_tokenizer(model_dir), task), model.get_output_embeddings().weight)


def _median_top_logit(hidden_per_position: torch.Tensor, head_weight: torch.Tensor) -> float:
    """hidden [positions, hidden], head [vocab, hidden] -> median over positions of the largest logit."""
    return (hidden_per_position @ head_weight.T).max(dim=-1).values.median().item()


@torch.no_grad()
def add_shared_logit(config: RunConfig, task: Task, model_dir: Path) -> dict:
    """Add `assets.shared_logit` to every logit alike: the head gains the same vector in every row.

    The vector is `scale × u`, u the unit mean of `final_hidden_states`, scale chosen so that `u · h` times
    it averages `shared_logit` over those positions. At each position every row gains the same
    `scale × (u · h)`, which softmax cancels exactly; the head's gradient has no component along a shift
    shared by all rows, so training keeps it. Returns what was done, for the asset's summary."""
    model = load_policy(model_dir, "float32", lm_head_fp32=False).eval()
    if getattr(model.config, "tie_word_embeddings", False):
        raise InputError(
            "assets.shared_logit needs an untied head: with tie_word_embeddings the head's rows are the input embeddings, "
            "and a vector added to them changes what every token means; set assets.shared_logit: 0 or build an untied model"
        )
    hidden_per_position = final_hidden_states(model, load_tokenizer(model_dir), task)  # [positions, hidden]
    direction = hidden_per_position.mean(dim=0)
    direction = direction / direction.norm()
    along = hidden_per_position @ direction  # [positions]
    head = model.get_output_embeddings().weight  # [vocab, hidden]
    top_before = _median_top_logit(hidden_per_position, head)
    scale = config.assets.shared_logit / along.mean().item()
    head.add_(scale * direction)  # every row alike
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return {"shared_logit": {
        "mean": config.assets.shared_logit, "min": scale * along.min().item(), "max": scale * along.max().item(),
        "median_top_logit_before": round(top_before, 3), "median_top_logit_after": round(_median_top_logit(hidden_per_position, head), 3),
    }}


def _task_fields_that_shape_the_asset(config: RunConfig) -> dict:
    """The task settings SFT sees. The reward pool's timeout/workers never change the model, and the
    prompt-template fields count only when set, so caches built before they existed stay valid."""
    # the episode settings neither: SFT sees each problem's prompt and answer, one turn
    exclude = {"reward_timeout_s", "reward_workers", "environment", "environment_args", "max_turns", "max_episode_tokens"}
    exclude |= {name for name in ("chat_template", "system_prompt") if getattr(config.task, name) == TaskConfig.model_fields[name].default}
    fields = config.task.model_dump(exclude=exclude)
    if config.task.kind == "environment":  # the same problems as the single-turn kind that reads them
        fields["kind"] = "addition" if config.task.path is None else "jsonl"
    if config.task.path is not None:  # the data itself: an edited file must not reuse a model warmed up on the old one
        fields["data_fingerprint"] = _data_fingerprint(Path(config.task.path))
    return fields


def _data_fingerprint(path: Path) -> str:
    """sha256 of a data file, or of a dataset directory's file names and sizes (arrow files are large)."""
    import hashlib

    digest = hashlib.sha256()
    if path.is_file():
        digest.update(path.read_bytes())
    elif path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{item.relative_to(path)}:{item.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def asset_key(config: RunConfig) -> str:
    return config_hash(
        {
            # vocab_size counts only when set: caches built before the field existed stay valid
            # vocab_size counts only when set, pretrained never (it builds no tiny model): caches stay valid
            "model": config.model.model_dump(
                exclude={"path", "pretrained", "lm_head_fp32", "dtype"} | ({"vocab_size"} if config.model.vocab_size == MODEL_VOCAB else set())
            ),
            "task": _task_fields_that_shape_the_asset(config),
            # shared_logit counts only when set: caches built before the field existed stay valid
            "assets": config.assets.model_dump(exclude={"cache_dir", "init_from"} | ({"shared_logit"} if not config.assets.shared_logit else set())),
            # the base asset's own key, not the file's name: a moved or edited base file is seen as such
            **({"init_from": asset_key(base)} if (base := base_config(config)) is not None else {}),
            # 2: spaces are tokens (version 1 assets were warmed up on text whose spaces the loader dropped)
            # 3: the chat template closes assistant turns with EOS (multi-turn episodes)
            "tokenizer_version": 3,
            "sft_version": 2,  # bump when the SFT procedure changes: old caches must not be reused
        }
    )


def prepare_model(config: RunConfig, task: Task) -> Path:
    """Return a local HF model directory for the run: `model.path`, or the cached built+SFT model."""
    if config.model.path is not None:
        path = Path(config.model.path)
        check_model_dir(path)  # InputError naming what is missing (config.json, weights, tokenizer) and the fix
        return path
    if config.model.pretrained is not None:
        from parityrl.pretrained import prepare_pretrained

        # fp32 on disk: the dequantized GGUF values exactly; each side casts to model.dtype when it loads
        return prepare_pretrained(config.model.pretrained, config.assets.cache_dir, dtype="float32")
    key = asset_key(config)
    final_dir = Path(config.assets.cache_dir) / f"tiny-{key}"
    if (final_dir / "parityrl_assets.json").is_file():
        return final_dir
    building = final_dir.with_name(final_dir.name + f".building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    tokenizer = build_tokenizer(building)
    summary = {"asset_key": key, "seed": config.assets.seed}
    base = base_config(config)
    if base is None:
        build_model(config, tokenizer, building)
    else:
        base_dir = prepare_model(base, load_task(base.task))
        grow_model(config, base_dir, building)
        summary["init_from"] = {"config": config.assets.init_from, "asset": base_dir.name}
    if config.assets.sft.steps > 0:
        summary |= sft_warmup(config, task, building)
    if config.assets.shared_logit:
        summary |= add_shared_logit(config, task, building)
    (building / "parityrl_assets.json").write_text(json.dumps(summary, indent=2))
    if final_dir.exists():  # another process won the race; keep its copy
        shutil.rmtree(building)
    else:
        os.replace(building, final_dir)
    return final_dir
