"""Prompt templating: task.chat_template auto|none and task.system_prompt, on the built tokenizer."""

from __future__ import annotations

import pytest

from parityrl.assets import build_tokenizer
from parityrl.config import load_config
from parityrl.errors import InputError
from parityrl.tasks import Task, encode_prompt, load_task, task_prompt_ids

# Role markers make it visible whether the template ran and which roles it saw.
MARKED_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{{ message['content'] }}{% endfor %}"
)


@pytest.fixture
def tokenizer(tmp_path):
    return build_tokenizer(tmp_path)


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_defaults_keep_the_built_template_bos_then_prompt(tokenizer):
    ids = encode_prompt(tokenizer, "12+34=")
    assert ids[0] == tokenizer.bos_token_id and _text(tokenizer, ids) == "<bos>12+34="


def test_none_gives_the_same_ids_as_the_built_template(tokenizer):
    """The built template is BOS + contents with a newline after a system message, so a model
    warmed up with one setting reads the other identically."""
    for system_prompt in (None, "Be brief."):
        auto = encode_prompt(tokenizer, "12+34=", chat_template="auto", system_prompt=system_prompt)
        none = encode_prompt(tokenizer, "12+34=", chat_template="none", system_prompt=system_prompt)
        assert auto == none
    assert _text(tokenizer, none) == "<bos>Be brief.\n12+34="


def test_auto_uses_the_chat_template_with_a_system_turn_and_none_bypasses_it(tokenizer):
    tokenizer.chat_template = MARKED_TEMPLATE
    auto = encode_prompt(tokenizer, "2+2=", chat_template="auto", system_prompt="Be brief.")
    assert _text(tokenizer, auto) == "<system>Be brief.<user>2+2=<assistant>"
    assert _text(tokenizer, encode_prompt(tokenizer, "2+2=", chat_template="auto")) == "<user>2+2=<assistant>"
    none = encode_prompt(tokenizer, "2+2=", chat_template="none", system_prompt="Be brief.")
    assert _text(tokenizer, none) == "<bos>Be brief.\n2+2="


def test_auto_without_a_chat_template_is_plain_text_with_bos(tokenizer):
    tokenizer.chat_template = None
    assert _text(tokenizer, encode_prompt(tokenizer, "2+2=", chat_template="auto")) == "<bos>2+2="


def test_a_template_that_refuses_the_system_prompt_says_what_to_change(tokenizer):
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    with pytest.raises(InputError, match="task.system_prompt to null or set task.chat_template to none"):
        encode_prompt(tokenizer, "2+2=", system_prompt="Be brief.")


def test_an_unknown_chat_template_mode_is_refused(tokenizer):
    with pytest.raises(ValueError, match="'auto' or 'none'"):
        encode_prompt(tokenizer, "2+2=", chat_template="chatml")


def test_load_task_carries_the_template_settings_to_task_prompt_ids(tokenizer):
    config = load_config(None, ["task.chat_template=none", "task.system_prompt=Add the numbers.", "task.max_operand=10", "task.eval_size=10"])
    task = load_task(config.task)
    assert (task.chat_template, task.system_prompt) == ("none", "Add the numbers.")
    tokenizer.chat_template = MARKED_TEMPLATE  # ignored: the task says none
    problem = task.eval[0]
    assert _text(tokenizer, task_prompt_ids(tokenizer, task, problem.prompt)) == f"<bos>Add the numbers.\n{problem.prompt}"
    default_task = Task("t", [], [], reward_kind="exact")
    assert task_prompt_ids(tokenizer, default_task, "1+1=") == encode_prompt(tokenizer, "1+1=")
