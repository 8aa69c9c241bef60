"""Offline assets: a character-level tokenizer, a tiny Qwen2 model, and an SFT warm-up.

Everything is deterministic from `assets.seed` and cached under `assets.cache_dir/<hash>` where the
hash covers every input that changes the result, so a second run (or another seed of RL) reuses it.
Nothing is downloaded: `model.path` replaces the built model with any local HF directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from parityrl.config import RunConfig, config_hash
from parityrl.policy import load_policy, sequence_logits
from parityrl.tasks import Task

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# BOS in every prompt, SFT and RL alike: the tiny model needs an anchor for position 0.
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
MODEL_VOCAB = 128  # 4 specials + 96 printable characters, padded to a multiple of 64


class LoggedProgress(Progress):
    """A rich progress bar that also works in logs: when the output is not a terminal (CI, the run
    logs `ablate` writes), rich draws nothing until the end, so print a plain line every `every_s`."""

    def __init__(self, *columns, every_s: float = 30.0, **kwargs):
        super().__init__(*columns, **kwargs)
        self.every_s = every_s
        self._last_line = time.monotonic()

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log_line(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log_line(task_id)

    def _log_line(self, task_id) -> None:
        if self.console.is_terminal or time.monotonic() - self._last_line < self.every_s:
            return
        self._last_line = time.monotonic()
        task = self._tasks[task_id]
        elapsed = f"{task.elapsed:.0f}s" if task.elapsed is not None else ""
        line = f"{time.strftime('%H:%M:%S')} {task.description} {task.completed:g}/{task.total:g} {task.fields.get('info', '')} {elapsed}"
        self.console.print(line, highlight=False)


def progress_bar(transient: bool = False, console=None) -> Progress:
    return LoggedProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
        console=console,
    )


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
        vocab_size=MODEL_VOCAB,
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


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt with the template applied (BOS, chat markup); used by SFT, RL and eval."""
    if tokenizer.chat_template:
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True, return_dict=False
            )
        )
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def sft_batch(tokenizer, problems, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, loss_mask) [batch, seq]; loss on answer + EOS only."""
    rows, masks = [], []
    for problem in problems:
        prompt_ids = encode_prompt(tokenizer, problem.prompt)
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


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the enclosed code on `count` torch intra-op threads; the caller's count is restored, also on error."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


SUCCESS_CHECK_EVERY = 50
"""SFT steps between greedy-success probes: finer checks land the start closer to `target_success`."""


def sft_warmup(config: RunConfig, task: Task, model_dir: Path) -> dict:
    """Teacher-forced warm-up on the task's training split; returns a summary written next to the model."""
    from transformers import AutoTokenizer

    sft = config.assets.sft
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
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
                tokenizer, task.sample_train(rng, sft.batch_size), tokenizer.eos_token_id, tokenizer.pad_token_id
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


@torch.no_grad()
def greedy_success(model, tokenizer, task: Task, problems) -> float:
    """Greedy exact-answer rate on `problems` (KV-cached batched decoding)."""
    from parityrl.engines.reference import decode_batch, greedy_picker

    model.eval()
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    max_new = max(len(tokenizer(p.answer, add_special_tokens=False)["input_ids"]) for p in problems) + 2
    tokens, _, _ = decode_batch(model, prompts, max_new, tokenizer.eos_token_id, greedy_picker)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return sum(task.reward(text, p.answer) for text, p in zip(texts, problems)) / len(problems)


def asset_key(config: RunConfig) -> str:
    return config_hash(
        {
            "model": config.model.model_dump(exclude={"path", "lm_head_fp32", "dtype"}),
            "task": config.task.model_dump(),
            "assets": config.assets.model_dump(exclude={"cache_dir"}),
            "tokenizer_version": 1,
            "sft_version": 2,  # bump when the SFT procedure changes: old caches must not be reused
        }
    )


def prepare_model(config: RunConfig, task: Task) -> Path:
    """Return a local HF model directory for the run: `model.path`, or the cached built+SFT model."""
    if config.model.path is not None:
        path = Path(config.model.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path={path} is not an HF model directory (no config.json)")
        return path
    final_dir = Path(config.assets.cache_dir) / f"tiny-{asset_key(config)}"
    if (final_dir / "parityrl_assets.json").is_file():
        return final_dir
    building = final_dir.with_name(final_dir.name + f".building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    tokenizer = build_tokenizer(building)
    build_model(config, tokenizer, building)
    summary = {"asset_key": asset_key(config), "seed": config.assets.seed}
    if config.assets.sft.steps > 0:
        summary |= sft_warmup(config, task, building)
    (building / "parityrl_assets.json").write_text(json.dumps(summary, indent=2))
    if final_dir.exists():  # another process won the race; keep its copy
        shutil.rmtree(building)
    else:
        os.replace(building, final_dir)
    return final_dir


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)

