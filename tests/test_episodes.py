"""Multi-turn episodes: token-in-token-out on three templates (the tiny model's, SmolLM2's ChatML, one
that rewrites history), environment failures, the episode as one forward pass, and whole runs with a
user's environment on the reference engine (stop on a broken environment, resume with episodes in flight)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from parityrl.assets import build_tokenizer
from parityrl.batch import Sample, pack_samples
from parityrl.config import load_config
from parityrl.environments import EnvStep, resolve_environment
from parityrl.episodes import ChatCodec, Episode, EpisodeLimits, TemplateRewritesHistory, take_environment_turn
from parityrl.errors import InputError
from parityrl.metrics import read_metrics
from parityrl.pipeline import RunStopped, run_training
from parityrl.policy import load_policy, load_tokenizer
from parityrl.reward_pool import CallResult, EnvironmentPool
from parityrl.scoring import score
from parityrl.tasks import Problem
from parityrl.train.checkpoint import load_run_state

TESTS = Path(__file__).resolve().parent

# SmolLM2-135M-Instruct's template, as its tokenizer_config.json ships it
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a "
    "helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] "
    "+ '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# ChatML that drops the reasoning of every assistant turn but the last, as Qwen3's template does
DROPS_REASONING = CHATML.replace(
    "message['content'] + '<|im_end|>'",
    "(message['content'].split('</think>')[-1] if message['role'] == 'assistant' and not loop.last else message['content']) + '<|im_end|>'",
)
# the tiny model's template before assistant turns ended with EOS
NO_EOS_AFTER_ASSISTANT = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def tokenizer_with(template: str | None, tmp_path: Path):
    tokenizer = build_tokenizer(tmp_path)
    if template is not None and "im_start" in template:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.eos_token = "<|im_end|>"
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def play_text_episode(codec: ChatCodec, replies: list[str], feedback: list[str]) -> tuple[list[int], list[dict]]:
    """Running ids and messages of an episode whose turns sampled exactly `replies` (each + EOS)."""
    eos = codec.tokenizer.eos_token_id
    messages = codec.opening([{"role": "user", "content": "12+34="}])
    running = codec.first(messages)
    for reply, answer in zip(replies, feedback):
        running += codec.encode(reply) + [eos]
        messages = messages + [{"role": "assistant", "content": reply}]
        new = [{"role": "user", "content": answer}]
        running += codec.appended(messages, new, eos)
        messages = messages + new
        codec.check(running, messages)
    return running, messages


@pytest.mark.parametrize("template", [None, CHATML], ids=["tiny", "chatml"])
def test_turns_append_exactly_what_the_template_renders(template, tmp_path):
    codec = ChatCodec(tokenizer_with(template, tmp_path))
    running, messages = play_text_episode(codec, ["45", "47"], ["higher\n12+34=", "lower"])
    # the running ids are the template's rendering of the whole conversation, token for token
    assert running == codec.first(messages)
    text = codec.tokenizer.decode(running)
    if template == CHATML:
        # the newline the template puts after <|im_end|> is kept (verl #6501 dropped it at every turn boundary)
        assert "47<|im_end|>\n<|im_start|>user\nlower<|im_end|>\n<|im_start|>assistant\n" in text
    else:
        assert text == "<bos>12+34=45<eos>higher\n12+34=47<eos>lower"


@pytest.mark.parametrize(
    ("template", "reply", "where"),
    [
        (DROPS_REASONING, "<think>carry the 1</think>46", "renders the conversation's earlier turns differently"),
        (NO_EOS_AFTER_ASSISTANT, "45", "special tokens"),
    ],
    ids=["drops-reasoning", "no-eos-after-assistant"],
)
def test_a_template_that_rewrites_history_is_refused_with_the_rule(template, reply, where, tmp_path):
    codec = ChatCodec(tokenizer_with(template, tmp_path))
    with pytest.raises(TemplateRewritesHistory, match=where) as refused:
        play_text_episode(codec, [reply, "46"], ["wrong", "wrong"])
    assert "the template rule" in refused.value.message
    if template == NO_EOS_AFTER_ASSISTANT:  # refused before any engine starts, too
        with pytest.raises(TemplateRewritesHistory, match="<eos>"):
            codec.preflight([{"role": "user", "content": "1"}], codec.tokenizer.eos_token_id)


def test_environment_that_raises_hangs_or_returns_the_wrong_type_costs_only_its_call(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    problem = {"prompt": "1+1=", "answer": "2"}
    messages = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "3"}]
    failures = [("Raises", "ValueError: the game crashed"), ("HangsOnFirstStep", "timed out after 1 s"), ("ReturnsText", "TypeError: step() returned str")]
    for name, error in failures:
        with EnvironmentPool(f"environments_for_tests:{name}", workers=1, timeout_s=1.0) as pool:
            [opening] = pool.submit([(problem, None)]).result()
            assert opening == CallResult([{"role": "user", "content": "1+1="}], None)
            [result] = pool.submit([(problem, messages)]).result()
            assert result.value is None and result.error.startswith(error), (name, result)
            # the pool goes on: the next call is answered (a hung worker was replaced)
            assert pool.submit([(problem, None)]).result()[0].error is None
    with EnvironmentPool("parityrl.environments.addition:AdditionFeedback", workers=1) as pool:
        [step] = pool.submit([(problem, messages)]).result()
        assert step == CallResult(EnvStep([{"role": "user", "content": "lower\n1+1="}], 0.0, False), None)


@pytest.mark.parametrize(
    ("spec", "args", "says"),
    [
        ("no_such_module_anywhere:Env", {}, "cannot import module 'no_such_module_anywhere'"),
        ("environments_for_tests:Missing", {}, "has no class 'Missing'"),
        ("environments_for_tests:NoStep", {}, "has no method step(self, messages)"),
        ("environments_for_tests:Countdown", {"start": 3}, "got an unexpected keyword argument 'start'"),
    ],
)
def test_a_wrong_environment_is_named_before_anything_starts(spec, args, says, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    with pytest.raises(InputError, match=says.replace("(", r"\(").replace(")", r"\)")):
        resolve_environment(spec, args)


def test_an_environment_turn_that_leaves_no_room_ends_the_episode_cleanly(tmp_path):
    codec = ChatCodec(tokenizer_with(None, tmp_path))
    problem = Problem("12+34=", "46")
    messages = [{"role": "user", "content": "12+34="}]
    episode = Episode(problem, messages, codec.first(messages))
    eos = codec.tokenizer.eos_token_id
    episode.add_turn(Sample(episode.prompt_ids, codec.encode("45") + [eos], [-0.5, -0.5, -0.1], [3, 3, 3], "stop"), "45")
    wrong = CallResult(EnvStep([{"role": "user", "content": "higher\n12+34="}], 0.0, False))
    # 7 prompt + 3 sampled + 13 appended tokens: a 23-token budget has no room for another turn
    assert not take_environment_turn(episode, wrong, codec, EpisodeLimits(max_turns=3, max_tokens=23))
    assert episode.finish_reason == "length" and episode.env_tokens == 0 and episode.turns == 1
    episode.finish_reason = "stop"  # the same turn again, with one token more of budget
    assert take_environment_turn(episode, wrong, codec, EpisodeLimits(max_turns=3, max_tokens=24))
    assert episode.env_tokens == 13 and episode.versions[-13:] == [3] * 13 and episode.logprobs_old[-13:] == [0.0] * 13
    # a second turn sampled two versions later: the episode spans updates, and is as stale as its oldest turn
    episode.add_turn(Sample(episode.running_ids, [eos], [-0.2], [5], "stop"), "")
    sample = episode.to_sample()
    assert sample.mixed_version and sample.oldest_version == 3 and sample.sampled_versions() == [3, 3, 3, 5]
    failed = CallResult(None, "ValueError: boom")
    assert not take_environment_turn(episode, failed, codec, EpisodeLimits(3, 100))
    assert episode.reward == 0.0 and episode.error == "step (turn 2): ValueError: boom"


@pytest.mark.tiny_model
def test_an_episode_is_scored_in_one_pass_as_each_turn_on_its_own_prefix(tiny_model_dir):
    """The trainer's logprobs of an episode's sampled tokens equal those of each turn scored as its own
    sample (prompt = the running ids before it): one forward pass, environment tokens as context only."""
    config = load_config(None, [f"model.path={tiny_model_dir}"])
    model = load_policy(tiny_model_dir, "float32", lm_head_fp32=True)
    codec = ChatCodec(load_tokenizer(tiny_model_dir))
    eos = codec.tokenizer.eos_token_id
    problem = Problem("12+34=", "46")
    messages = [{"role": "user", "content": "12+34="}]
    episode = Episode(problem, messages, codec.first(messages))
    turns = []
    for reply, feedback in [("45", "higher\n12+34="), ("47", "lower\n12+34="), ("46", None)]:
        ids = codec.encode(reply) + [eos]
        turns.append(Sample(episode.running_ids, ids, [0.0] * len(ids), [0] * len(ids), "stop"))
        episode.add_turn(turns[-1], reply)
        if feedback is not None:
            new = [{"role": "user", "content": feedback}]
            episode.add_environment(new, codec.appended(episode.messages, new, eos))
    sample = episode.to_sample()
    assert sum(sample.sampled_mask) == 9 and sample.sampled_tokens == 9
    with torch.no_grad():
        whole = score(model, pack_samples([sample], 0), config.trainer_sampling(), "float32")
        per_turn = score(model, pack_samples(turns, 0), config.trainer_sampling(), "float32")
    mask = torch.tensor(sample.sampled_mask)
    episode_logprobs = whole.logprobs[0, : len(sample.completion_token_ids)][mask]
    turn_logprobs = torch.cat([per_turn.logprobs[i, : len(t.completion_token_ids)] for i, t in enumerate(turns)])
    torch.testing.assert_close(episode_logprobs, turn_logprobs, rtol=0, atol=1e-5)
    assert whole.logprobs[0, : len(mask)][~mask].abs().sum() == 0  # environment tokens are never scored


def episode_config(model_dir: Path, data: Path, *extra: str):
    return load_config(
        None,
        [
            "engine.kind=reference", f"model.path={model_dir}", "task.kind=environment", f"task.path={data}",
            "train.steps=4", "train.prompts_per_step=2", "train.eval_every=2", "train.checkpoint_every=2", "sampling.n=4",
            "sampling.max_new_tokens=4", "task.eval_size=8", "task.max_turns=3", "logging.tensorboard=false", *extra,
        ],
    )  # fmt: skip


@pytest.mark.tiny_model
def test_a_users_environment_trains_and_resumes_with_episodes_in_flight(tiny_model_dir, tmp_path, monkeypatch):
    """A user's environment from a JSONL task (an extra field reaches reset) runs through `train` with
    each step's episode metrics; stopped at step 2 with episodes drawn but not trained on, `--resume`
    replays them and logs every step once."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.syspath_prepend(str(TESTS))
    data = tmp_path / "count.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n}+0=", "answer": str(n), "start": n}) + "\n" for n in range(1, 40)))
    env = "task.environment=environments_for_tests:Countdown"
    run_dir = tmp_path / "run"
    summary = asyncio.run(run_training(episode_config(tiny_model_dir, data, env, "train.steps=2"), run_dir))
    assert summary["steps"] == 2
    pending = load_run_state(run_dir / "checkpoints" / "step_000002").pending_prompts
    assert pending and all(p.fields is not None and "start" in p.fields for p in pending)  # each record whole, for reset
    resumed = episode_config(tiny_model_dir, data, env)
    asyncio.run(run_training(resumed, run_dir, resume=True))
    records = [r for r in read_metrics(run_dir) if r["step"] > 0]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["episode/turns"] >= 1 and r["parity/kl"] is not None and r["parity/kl"] < 1e-9 for r in records)
    evaluated = [json.loads(line) for line in (run_dir / "eval_episodes" / "v000004.jsonl").read_text().splitlines()]
    assert len(evaluated) == 8 and all(e["messages"][0]["content"].startswith("count down from") for e in evaluated)


@pytest.mark.tiny_model
def test_an_environment_that_fails_stops_the_run_naming_it(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.syspath_prepend(str(TESTS))
    data = tmp_path / "add.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n}+1=", "answer": str(n + 1)}) + "\n" for n in range(30)))
    config = episode_config(tiny_model_dir, data, "task.environment=environments_for_tests:Raises")
    with pytest.raises(RunStopped, match=r"environment environments_for_tests:Raises failed on 8 of 8 episodes.*ValueError: the game crashed"):
        asyncio.run(run_training(config, tmp_path / "run"))



