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
from parityrl.environments.calculator import Calculator, evaluate_arithmetic, format_value
from parityrl.episodes import ChatCodec, Episode, EpisodeLimits, TemplateRewritesHistory, play_group, take_environment_turn
from parityrl.errors import InputError
from parityrl.metrics import read_metrics
from parityrl.parity.check import load_policy_like, perturbed_weights
from parityrl.pipeline import RunStopped, run_training
from parityrl.policy import load_policy, load_tokenizer
from parityrl.reward_pool import CallResult, EnvironmentPool
from parityrl.scoring import Mismatch, score
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


def play_text_episode(codec: ChatCodec, replies: list[str | list[int]], feedback: list[str]) -> tuple[list[int], list[dict]]:
    """Running ids and messages of an episode whose turns sampled exactly `replies` (text, or ids), each + EOS."""
    eos = codec.tokenizer.eos_token_id
    messages = codec.opening([{"role": "user", "content": "12+34="}])
    running = codec.first(messages)
    sampled = [False] * len(running)
    for reply, answer in zip(replies, feedback):
        ids = (codec.encode(reply) if isinstance(reply, str) else reply) + [eos]
        running += ids
        sampled += [True] * len(ids)
        messages = messages + [{"role": "assistant", "content": codec.tokenizer.decode(ids, skip_special_tokens=True)}]
        new = [{"role": "user", "content": answer}]
        appended = codec.appended(messages, new, eos)
        running += appended
        sampled += [False] * len(appended)
        messages = messages + new
        codec.check(running, messages, sampled)
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
        # a special token the model sampled inside a turn is its output, not the template's: not refused
        stray = codec.encode("4") + [codec.tokenizer.bos_token_id] + codec.encode("5")
        running, messages = play_text_episode(codec, [stray, "47"], ["higher\n12+34=", "lower"])
        assert running.count(codec.tokenizer.bos_token_id) == 2 and messages[1]["content"] == "45"


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





@pytest.mark.vllm
def test_vllm_episodes_match_the_trainer_on_every_turn_across_a_weight_update(vllm_slot, tiny_model_dir):
    """Real vLLM V1 episodes of the demo environment (fp32, T 0.8, top-p 0.95): the weights change
    between turn 1 and turn 2, and every sampled token of every turn matches the trainer's processed
    logprob under the version that sampled it, computed in one pass over the episode."""
    engine = vllm_slot.get()
    config = load_config("configs/multiturn_demo.yaml", [f"model.path={tiny_model_dir}", "sampling.max_new_tokens=4"])
    codec = ChatCodec(load_tokenizer(tiny_model_dir))
    model_v0 = load_policy(tiny_model_dir, "float32", lm_head_fp32=True)
    weights_v1 = perturbed_weights(model_v0, 0.02, seed=5)
    model_v1 = load_policy_like(model_v0, weights_v1)
    v0 = engine.version
    update = asyncio.Lock()

    async def generate(prompt_ids, sampling, request_id):
        async with update:  # the first turn-2 request updates the engine; the others wait for it
            if request_id.endswith("-t2") and engine.version == v0:
                await engine.update_weights(weights_v1, v0 + 1)
        return await engine.generate(prompt_ids, sampling, request_id)

    async def play():
        with EnvironmentPool.from_config(config.task) as envs:
            limits = EpisodeLimits(config.task.max_turns, 256)
            problems = [Problem(f"{a}+{b}=", str(a + b)) for a, b in [(17, 25), (48, 39), (6, 77), (90, 13)]]
            groups = [await play_group(generate, envs, codec, p, config.sampling, limits, f"mt{i}") for i, p in enumerate(problems)]
        return [e for g in groups for e in g]

    episodes = vllm_slot.run(play())
    samples = [e.to_sample() for e in episodes]
    later = [s for s in samples if s.sampled_mask is not None]
    # the first group's later turns came from v1, its first turns from v0 (the later groups play after the update)
    assert len(later) >= 8 and sum(s.mixed_version for s in later) >= 4
    packed = pack_samples(samples, 0)
    sampling = config.trainer_sampling()
    with torch.no_grad():
        new = {v0: score(model_v0, packed, sampling, "float32").logprobs, v0 + 1: score(model_v1, packed, sampling, "float32").logprobs}
    for version, logprobs in new.items():
        select = packed.completion_mask & (packed.version_per_token == version)
        mismatch = Mismatch.of(logprobs, packed.logprobs_old, select)
        assert mismatch.tokens > 20, version
        summary = mismatch.summary("parity")
        assert summary["parity/kl"] < 1e-9 and summary["parity/abs_diff_max"] < 1e-4, (version, summary)


def test_the_calculator_evaluates_arithmetic_only_and_scores_the_final_answer():
    assert format_value(evaluate_arithmetic("(17 - 2) * 3 / 4")) == "11.25" and format_value(evaluate_arithmetic("2^10 - 1")) == "1023"
    hostile_inputs = [("__import__('os').system('ls')", "Call is not arithmetic"), ("9**9**9", "exponent"), ("1/(2-2)", "division by zero"), ("x+1", "Name")]
    for hostile, says in hostile_inputs:
        with pytest.raises(ValueError, match=says):
            evaluate_arithmetic(hostile)
    env = Calculator()
    opening = env.reset({"prompt": "A box holds 14 coins. Omar puts in 2 more. How many?", "answer": "\\boxed{16}"})
    assert [m["role"] for m in opening] == ["system", "user"] and "<calc>" in opening[0]["content"]
    assert env.step(opening + [{"role": "assistant", "content": "<calc>14 + 2</calc>"}]) == ([{"role": "tool", "content": "16"}], 0.0, False)
    assert env.step(opening + [{"role": "assistant", "content": "<calc>14 +</calc>"}])[0][0]["content"].startswith("error: cannot parse")
    assert env.step(opening + [{"role": "assistant", "content": "So \\boxed{16}."}]) == ([], 1.0, True)
    assert env.step(opening + [{"role": "assistant", "content": "So \\boxed{15}."}]) == ([], 0.0, True)


@pytest.mark.smollm2
def test_re_tokenizing_smollm2s_conversation_drifts_where_the_model_split_a_word_its_own_way():
    """The naive multi-turn path (render the conversation, tokenize again) trains on other tokens as soon
    as a turn sampled a non-canonical split: ' coins' sampled as ' coin' + 's' comes back as ' coins'."""
    from parityrl import pretrained

    tokenizer = pretrained.load_gguf_tokenizer(pretrained.locate_gguf(pretrained.PRETRAINED["smollm2-135m-instruct"]))
    codec = ChatCodec(tokenizer)
    messages = [{"role": "user", "content": "How many coins?"}]
    canonical = codec.encode("There are 16 coins.")
    split = canonical[:-2] + tokenizer.convert_tokens_to_ids(["Ġcoin", "s"]) + canonical[-1:]
    assert split != canonical and tokenizer.decode(split) == tokenizer.decode(canonical)
    said = messages + [{"role": "assistant", "content": "There are 16 coins."}]
    eos = tokenizer.eos_token_id
    assert not codec.retokenization_differs(codec.first(messages) + canonical + [eos], said)
    assert codec.retokenization_differs(codec.first(messages) + split + [eos], said)
    # token in, token out keeps the split: the next turn's prompt holds the ids the engine sampled
    running = codec.first(messages) + split + [eos]
    new = [{"role": "user", "content": "Sure?"}]
    running += codec.appended(said, new, eos)
    codec.check(running, said + new)
    assert running[len(codec.first(messages)) :][: len(split)] == split


@pytest.mark.vllm
def test_check_runs_an_environment_config_and_reports_parity_per_turn(vllm_slot, tiny_model_dir):
    from parityrl.parity.check import run_check

    config = load_config("configs/multiturn_demo.yaml", [f"model.path={tiny_model_dir}"])
    result = vllm_slot.run(run_check(config, num_prompts=6, inflight=False, engine=vllm_slot.get()))
    per_turn = result["parity/kl_per_turn"]
    assert result["episode/turns"] > 1.2 and len(per_turn) >= 2
    assert result["parity/kl"] < 1e-9 and all(kl is not None and kl < 1e-9 for kl in per_turn), result
    assert result["parity/tokens"] > 6 * 8  # every sampled token of every turn, no environment token
