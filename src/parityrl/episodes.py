"""Multi-turn episodes, token in, token out (`task.kind: environment`; docs/multi-turn.md).

An episode is one token sequence: the first prompt, then each turn's sampled tokens (as sampled, the
end-of-turn token included) and the environment's messages between turns. The model's own text is
never tokenized again: turn k+1's prompt is turn k's prompt + its sampled ids + the ids of what the
environment appended, and those come from the chat template by rendering the conversation with and
without the new messages and taking the difference (`ChatCodec.appended`). Rebuilding the
conversation as text and tokenizing it again between turns, as a first attempt would, makes the
trainer score tokens the engine never sampled (`parity.ablate`'s `naive_multiturn` row measures it).

At every turn the special-token skeleton of the running ids must equal that of the template's
rendering of the whole conversation (`ChatCodec.check`). A template that rewrites history (drops an
earlier turn's reasoning, re-renders an assistant turn) fails it, and the run is refused with a
message naming the template's behaviour: the model would be trained on a context it never sees at
inference, so there is no sequence to train on that both sides agree on (docs/multi-turn.md, "the
template rule"). The same check runs on a synthetic conversation before the engine starts.

`Episode.to_sample` hands the trainer one `Sample` per episode: the completion is everything after the
first prompt, `sampled_mask` says which tokens the policy sampled (the loss and `parity/*` see only
those), every token carries a policy version (an environment token the version of the turn before it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from parityrl.batch import Sample
from parityrl.config import SamplingConfig
from parityrl.errors import InputError
from parityrl.reward_pool import CallResult, EnvironmentPool
from parityrl.tasks import Problem


class TemplateRewritesHistory(InputError):
    """The chat template renders earlier turns differently once later ones are added."""


class ChatCodec:
    """Token ids of a conversation as the engine and the trainer see it, from the tokenizer's template."""

    def __init__(self, tokenizer, system_prompt: str | None = None):
        if not tokenizer.chat_template:
            raise InputError(
                "task.kind=environment needs a tokenizer with a chat template (the conversation is rendered by it); "
                "this model's tokenizer has none: use a chat model, or add a chat_template to its tokenizer_config.json."
            )
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids = set(tokenizer.all_special_ids) | {index for index, token in decoder.items() if getattr(token, "special", False)}

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def opening(self, messages: list[dict]) -> list[dict]:
        """The environment's first messages, after `task.system_prompt` when it is set and they have none."""
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return list(messages)

    def first(self, messages: list[dict]) -> list[int]:
        """The first prompt: the opening messages with the generation prompt."""
        return self.encode(self.render(messages, generation_prompt=True))

    def appended(self, messages: list[dict], new_messages: list[dict], stop_id: int) -> list[int]:
        """Ids to put after a turn whose sampled ids end with `stop_id`, so that the model next sees
        `new_messages` and its generation prompt exactly as the template renders them. `messages` ends
        with that assistant turn (its text). The template's text after the assistant's end-of-turn token
        (ChatML's newline after `<|im_end|>`) is kept: dropping it is verl's bug #6501."""
        before = self.render(messages, generation_prompt=False)
        after = self.render(messages + new_messages, generation_prompt=True)
        if not after.startswith(before):
            raise TemplateRewritesHistory(
                "the chat template renders the conversation's earlier turns differently once the environment's "
                f"messages are added (rendering diverges at character {_diverges_at(before, after)}: "
                f"{before[_diverges_at(before, after):][:60]!r} became {after[_diverges_at(before, after):][:60]!r}). "
                + TEMPLATE_RULE
            )
        stop_text = self.tokenizer.decode([stop_id])
        cut = before.rfind(stop_text) if stop_id in self.special_ids else -1
        tail = before[cut + len(stop_text) :] if cut >= 0 else ""
        return self.encode(tail + after[len(before) :])

    def check(self, running_ids: list[int], messages: list[dict], sampled: list[bool] | None = None) -> None:
        """The special tokens of `running_ids` (an episode so far, ending with a generation prompt) must be
        those of the template's rendering of `messages`; TemplateRewritesHistory otherwise. `sampled` marks
        the tokens the model sampled: a special token it sampled inside a turn (a stray `<bos>`) is its own
        output, which the message text leaves out, not the template's; the one that ends a turn counts."""
        expected = [i for i in self.first(messages) if i in self.special_ids]
        sampled = sampled or [False] * len(running_ids)
        inside_a_turn = [sampled[k] and k + 1 < len(running_ids) and sampled[k + 1] for k in range(len(running_ids))]
        actual = [i for i, inside in zip(running_ids, inside_a_turn) if i in self.special_ids and not inside]
        if actual != expected:
            at = next((k for k, (a, b) in enumerate(zip(actual, expected)) if a != b), min(len(actual), len(expected)))
            names = self.tokenizer.convert_ids_to_tokens
            raise TemplateRewritesHistory(
                f"after {len(messages)} messages the episode's special tokens ({len(actual)}) differ from the chat "
                f"template's rendering of the same conversation ({len(expected)}) from special token {at} on: "
                f"{names(actual[at : at + 4])} in the episode, {names(expected[at : at + 4])} in the template. "
                + TEMPLATE_RULE
            )

    def retokenization_differs(self, running_ids: list[int], messages: list[dict]) -> bool:
        """Whether the naive multi-turn path, rendering the conversation as text and tokenizing it again,
        gives other ids than the episode's (the tokens the engine sampled and the template's between them)."""
        naive = self.encode(self.render(messages, generation_prompt=False))
        return naive[: len(running_ids)] != running_ids

    def preflight(self, first_messages: list[dict], eos_id: int) -> None:
        """The template rule on a synthetic two-turn conversation, before any engine starts."""
        messages = self.opening(first_messages)
        reply = {"role": "assistant", "content": "1"}
        running = self.first(messages) + self.encode("1") + [eos_id]
        feedback = [{"role": "user", "content": "2"}]
        running += self.appended(messages + [reply], feedback, eos_id)
        self.check(running, messages + [reply] + feedback)


TEMPLATE_RULE = (
    "parityrl trains on the token sequence the engine saw, so it refuses templates whose rendering of a "
    "conversation is not its turns' renderings laid end to end (docs/multi-turn.md, 'the template rule'): "
    "set a chat_template in the model's tokenizer_config.json that keeps earlier turns as they were, and that "
    "closes an assistant turn with the token the model stops on (its EOS)."
)


def _diverges_at(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass
class Episode:
    """One episode so far. Token lists are aligned: `ids[k]` was sampled (`sampled[k]`) with
    `logprobs_old[k]` by version `versions[k]`, or was appended by the environment (logprob 0, the
    version of the turn before it)."""

    problem: Problem
    messages: list[dict]
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    logprobs_old: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    reward: float = 0.0
    turn_rewards: list[float] = field(default_factory=list)
    turns: int = 0
    env_tokens: int = 0
    error: str | None = None
    finish_reason: str = "stop"
    kv_versions: list[int] = field(default_factory=list)
    cached_prompt_tokens: int | None = None
    turn_prompt_tokens: int = 0
    """Prompt tokens submitted over all turns (what prefix caching can serve)."""
    retokenization_differs: bool | None = None
    """Set when the episode ends: the naive path (conversation re-rendered and tokenized again) would have
    trained on other tokens (`ChatCodec.retokenization_differs`)."""
    replica: int | None = None
    first_sample: Sample | None = None
    """Turn 1 as the engine returned it: a one-turn episode hands the trainer exactly that sample."""

    @classmethod
    def single_turn(cls, problem: Problem, sample: Sample) -> Episode:
        """A single-turn task's sample as the one-turn episode it is (scored by the task's reward)."""
        episode = cls(problem, [], sample.prompt_token_ids)
        episode.add_turn(sample, "")
        return episode

    @property
    def running_ids(self) -> list[int]:
        return self.prompt_ids + self.ids

    def add_turn(self, sample: Sample, text: str) -> None:
        if self.turns == 0:
            self.first_sample = sample
        self.ids += sample.completion_token_ids
        self.sampled += [True] * len(sample.completion_token_ids)
        self.logprobs_old += sample.logprobs_old
        self.versions += sample.version_per_token
        self.messages = self.messages + [{"role": "assistant", "content": text}]
        self.turns += 1
        self.finish_reason = sample.finish_reason
        self.replica = sample.replica
        self.turn_prompt_tokens += len(sample.prompt_token_ids)
        if sample.kv_version is not None:
            self.kv_versions.append(sample.kv_version)
        if sample.cached_prompt_tokens is not None:
            self.cached_prompt_tokens = (self.cached_prompt_tokens or 0) + sample.cached_prompt_tokens

    def add_environment(self, new_messages: list[dict], ids: list[int]) -> None:
        self.messages = self.messages + new_messages
        self.ids += ids
        self.sampled += [False] * len(ids)
        self.logprobs_old += [0.0] * len(ids)
        self.versions += [self.versions[-1] if self.versions else 0] * len(ids)
        self.env_tokens += len(ids)

    def to_sample(self) -> Sample:
        if self.turns == 1 and self.env_tokens == 0 and self.first_sample is not None:
            return self.first_sample
        return Sample(
            self.prompt_ids, self.ids, self.logprobs_old, self.versions, self.finish_reason, self.replica,
            kv_version=min(self.kv_versions) if self.kv_versions else None,
            cached_prompt_tokens=self.cached_prompt_tokens,
            sampled_mask=self.sampled if not all(self.sampled) else None,
            turn_prompt_tokens=self.turn_prompt_tokens,
        )  # fmt: skip


Generate = Callable[[list[int], SamplingConfig, str], Awaitable[list[Sample]]]


@dataclass
class EpisodeLimits:
    max_turns: int
    max_tokens: int
    """Most tokens in one episode, prompt included (`task.max_episode_tokens`, at most the model's context)."""


async def play_group(
    generate: Generate, envs: EnvironmentPool, codec: ChatCodec, problem: Problem, sampling: SamplingConfig,
    limits: EpisodeLimits, request_id: str,
) -> list[Episode]:  # fmt: skip
    """`sampling.n` episodes of `problem`: the first turn as one group of n samples (one prompt), then
    each episode on its own. A failing environment call ends its episode (reward 0, `Episode.error`)."""
    [opening] = await envs.reset([problem.record()])
    if opening.error is not None:
        messages = codec.opening([{"role": "user", "content": problem.prompt}])
        return [Episode(problem, messages, codec.first(messages), error=f"reset: {opening.error}") for _ in range(sampling.n)]
    messages = codec.opening(opening.value)
    prompt_ids = codec.first(messages)
    budget = min(sampling.max_new_tokens, limits.max_tokens - len(prompt_ids))
    if budget < 1:
        error = f"the first prompt is {len(prompt_ids)} tokens, the episode budget {limits.max_tokens}"
        return [Episode(problem, messages, prompt_ids, error=error, finish_reason="length") for _ in range(sampling.n)]
    samples = await generate(prompt_ids, sampling.model_copy(update={"max_new_tokens": budget}), request_id)
    episodes = []
    for sample in samples:
        episode = Episode(problem, messages, prompt_ids)
        episode.add_turn(sample, codec.tokenizer.decode(sample.completion_token_ids, skip_special_tokens=True))
        episodes.append(episode)
    await asyncio.gather(*(_play_on(generate, envs, codec, episode, sampling, limits, f"{request_id}-e{i}") for i, episode in enumerate(episodes)))
    for episode in episodes:
        episode.retokenization_differs = codec.retokenization_differs(episode.running_ids, episode.messages)
    return episodes


async def _play_on(
    generate: Generate, envs: EnvironmentPool, codec: ChatCodec, episode: Episode, sampling: SamplingConfig, limits: EpisodeLimits, request_id: str
) -> None:
    """Environment turn, next model turn, ... until the environment says done, a turn is cut by its budget
    (`length`/`abort`: its reward still counts), `max_turns`, the token budget, or an environment error."""
    one = sampling.model_copy(update={"n": 1})
    while True:
        [result] = await envs.step([(episode.problem.record(), episode.messages)])
        if not take_environment_turn(episode, result, codec, limits):
            return
        budget = min(sampling.max_new_tokens, limits.max_tokens - len(episode.running_ids))
        [sample] = await generate(episode.running_ids, one.model_copy(update={"max_new_tokens": budget}), f"{request_id}-t{episode.turns + 1}")
        episode.add_turn(sample, codec.tokenizer.decode(sample.completion_token_ids, skip_special_tokens=True))


def take_environment_turn(episode: Episode, result: CallResult, codec: ChatCodec, limits: EpisodeLimits) -> bool:
    """Apply the environment's answer to the turn just sampled; True when the model plays on. The episode
    ends when the environment failed (reward 0) or said done, at `max_turns`, after a turn cut short
    (`length`/`abort`: its reward still counts), or when the appended messages leave the next turn no
    token of `limits.max_tokens` (the earlier turns are kept: a clean end, `length`)."""
    if result.error is not None:
        episode.error, episode.reward = f"step (turn {episode.turns}): {result.error}", 0.0
        return False
    new_messages, reward, done = result.value
    episode.reward += reward
    episode.turn_rewards.append(reward)
    if done or episode.turns >= limits.max_turns or episode.finish_reason != "stop":
        return False
    ids = codec.appended(episode.messages, new_messages, episode.ids[-1])
    if len(episode.running_ids) + len(ids) >= limits.max_tokens:
        episode.finish_reason = "length"
        return False
    episode.add_environment(new_messages, ids)
    codec.check(episode.running_ids, episode.messages, [False] * len(episode.prompt_ids) + episode.sampled)
    return True


Greedy = Callable[[list[list[int]], int, str], Awaitable[list[list[int]]]]


async def play_greedy(
    greedy: Greedy, envs: EnvironmentPool, codec: ChatCodec, problems: list[Problem], limits: EpisodeLimits, max_new_tokens: int,
    eos_id: int, request_id: str,
) -> list[Episode]:  # fmt: skip
    """One greedy episode per problem (held-out evaluation), every episode's next turn in one engine batch."""
    openings = await envs.reset([problem.record() for problem in problems])
    episodes = []
    for problem, opening in zip(problems, openings):
        messages = codec.opening(opening.value if opening.error is None else [{"role": "user", "content": problem.prompt}])
        error = None if opening.error is None else f"reset: {opening.error}"
        episodes.append(Episode(problem, messages, codec.first(messages), error=error))
    active = [episode for episode in episodes if episode.error is None]
    while active:
        fits = []
        for episode in active:
            if len(episode.running_ids) < limits.max_tokens:
                fits.append(episode)
            else:
                episode.finish_reason = "length"
        budget = min(max_new_tokens, limits.max_tokens - max((len(e.running_ids) for e in fits), default=0))
        turn = max((e.turns for e in fits), default=0) + 1
        completions = await greedy([e.running_ids for e in fits], budget, f"{request_id}-t{turn}") if fits else []
        for episode, tokens in zip(fits, completions):
            finish = "stop" if tokens and tokens[-1] == eos_id else "length"
            sample = Sample(episode.running_ids, list(tokens), [0.0] * len(tokens), [0] * len(tokens), finish)
            episode.add_turn(sample, codec.tokenizer.decode(tokens, skip_special_tokens=True))
        results = await envs.step([(e.problem.record(), e.messages) for e in fits]) if fits else []
        active = [e for e, result in zip(fits, results) if take_environment_turn(e, result, codec, limits)]
    return episodes


def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
    """The `episode/*` metrics of a step's episodes (metric_registry)."""
    count = max(len(episodes), 1)
    tool_results = [m["content"] for e in episodes for m in e.messages if m["role"] == "tool"]
    return {
        "episode/tool_calls": len(tool_results) / count,
        "episode/tool_call_success": sum(not r.lstrip().lower().startswith("error") for r in tool_results) / len(tool_results) if tool_results else None,
        "episode/turns": sum(e.turns for e in episodes) / count,
        "episode/env_tokens": sum(e.env_tokens for e in episodes) / count,
        "episode/env_errors": sum(e.error is not None for e in episodes),
        "episode/turn1_success": sum(bool(e.turn_rewards) and e.turn_rewards[0] >= 1.0 for e in episodes) / count,
        "episode/retokenization_drift_frac": sum(bool(e.retokenization_differs) for e in episodes) / count,
    }


def episode_record(episode: Episode) -> dict:
    """What an evaluation keeps of an episode (`RUN_DIR/eval_episodes/`): problem, whole conversation, reward,
    turns, error."""
    e = episode
    return {"problem": e.problem.record(), "messages": e.messages, "reward": e.reward, "turns": e.turns, "error": e.error}
