"""Rewards: answer extraction, math-verify equivalence, and the worker pool (errors, timeouts, threads)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from parityrl.config import ConfigError, load_config
from parityrl.errors import InputError
from parityrl.reward_pool import RewardPool, RewardPoolError
from parityrl.rewards import (
    RewardItem,
    RewardResult,
    extract_answer,
    math_verify_reward,
    resolve_reward,
    same_answer_text,
    score_in_process,
)
from parityrl.tasks import Task


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so x = \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("first \\boxed{3}, then corrected: \\boxed{4}", "4"),
        ("\\boxed{\\sqrt{\\frac{a}{b}}} is it", "\\sqrt{\\frac{a}{b}}"),
        ("\\boxed {7}", "7"),
        ("sure: \\boxed{12} and then \\boxed{1", "12"),  # the truncated last box is not an answer
        ("Work: 3+4=7\nAnswer: 7", "7"),
        ("We add them.\nThe answer is 19.\nThanks!", "19"),
        ("THE ANSWER IS: 2.5", "2.5"),
        ("steps\n#### 1,234", "1,234"),
        ("Final answer: **x = 3**", "x = 3"),
        ("The final answer is $\\frac{3}{4}$.", "$\\frac{3}{4}$"),
        ("12 apples and 7 more\n\n19\n", "19"),
        ("  42  ", "42"),
        ("Answer:\n42", "42"),  # a marker without an answer does not win over the last line
        ("", ""),
        ("\n \n", ""),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("\\boxed{1/2}", "0.5", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("The answer is \\frac{1}{2}", "1/2", 1.0),
        ("Answer: 0.50", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\sqrt{4}}", "2", 1.0),
        ("He has 19 apples.\n19", "19", 1.0),
        ("The answer is 1,000.", "1000", 1.0),
        ("reasoning...\n#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),  # GSM8K-style gold
        ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
        ("The answer is 18", "19", 0.0),
        ("", "19", 0.0),
    ],
)
def test_math_verify_equivalence(completion, answer, reward):
    assert math_verify_reward(completion, answer) == reward


def test_fallback_compare_when_math_verify_parses_nothing():
    assert math_verify_reward("Answer: Paris", "paris") == 1.0
    assert math_verify_reward("Answer: Lyon", "Paris") == 0.0
    assert same_answer_text("1,000", "1000") and same_answer_text("0.5", "1/2") and not same_answer_text("2", "3")


MATH_ITEMS = [
    RewardItem("\\boxed{1/2}", "0.5"),
    RewardItem("\\boxed{\\frac{1}{2}}", "1/2"),
    RewardItem("The answer is 3", "4"),
    RewardItem("Final answer: 1,000", "1000"),
]
MATH_VALUES = [1.0, 1.0, 0.0, 1.0]


def test_math_verify_in_a_thread_does_not_need_the_main_thread():
    """The crash this module fixes: math-verify's default timeout uses signal.alarm, which raises
    'doesn't support threaded environment' outside the main thread (asyncio.to_thread)."""
    results = asyncio.run(_in_thread(lambda: score_in_process("math_verify", MATH_ITEMS)))
    assert results == [RewardResult(value, None) for value in MATH_VALUES]


async def _in_thread(function):
    return await asyncio.to_thread(function)


@pytest.fixture(scope="module")
def math_pool():
    with RewardPool("math_verify", workers=2, timeout_s=30) as pool:
        yield pool


def test_pool_scores_math_from_a_worker_thread(math_pool):
    assert asyncio.run(_in_thread(lambda: math_pool.score_sync(MATH_ITEMS))) == [RewardResult(v, None) for v in MATH_VALUES]


def test_pool_scores_math_from_the_event_loop_without_blocking_it(math_pool):
    async def score_while_ticking():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        # several calls at once, as concurrent rollout groups make them; each keeps its own order
        results = await asyncio.gather(*(math_pool.score(MATH_ITEMS[i:] + MATH_ITEMS[:i]) for i in range(4)))
        ticker.cancel()
        return results, ticks

    results, ticks = asyncio.run(score_while_ticking())
    for shift, values in enumerate(results):
        assert [r.value for r in values] == MATH_VALUES[shift:] + MATH_VALUES[:shift]
    assert ticks > 0  # the loop kept running while the workers scored


def test_pool_keeps_order_over_many_items_and_passes_the_prompt():
    items = [RewardItem(str(i), "0", prompt="p" * (i % 7)) for i in range(64)]
    with RewardPool("rewards_for_tests:prompt_length", workers=2, timeout_s=10) as pool:
        results = pool.score_sync(items)
        assert pool.score_sync([]) == []
    assert [r.value for r in results] == [float(i % 7) for i in range(64)]


def test_a_reward_that_raises_scores_zero_with_the_error_and_spares_the_others():
    items = [RewardItem("a", "a"), RewardItem("b", "b")]
    with RewardPool("rewards_for_tests:raises", workers=1, timeout_s=10) as pool:
        results = pool.score_sync(items)
    assert results == [
        RewardResult(0.0, "ValueError: cannot score 'a'"),
        RewardResult(0.0, "ValueError: cannot score 'b'"),
    ]


def test_a_non_numeric_reward_is_an_error():
    with RewardPool("rewards_for_tests:not_a_number", workers=1, timeout_s=10) as pool:
        (result,) = pool.score_sync([RewardItem("a", "a")])
    assert result.value == 0.0 and result.error.startswith("ValueError: could not convert string to float")


def test_a_hung_reward_times_out_alone_and_the_pool_recovers():
    items = [RewardItem("x", "x"), RewardItem("hang", "hang"), RewardItem("y", "y"), RewardItem("z", "q")]
    # one worker: if the hung process were not killed and replaced, the next call could never run
    with RewardPool("rewards_for_tests:hangs_on_hang", workers=1, timeout_s=1.0) as pool:
        pool.score_sync([RewardItem("warm", "warm")])
        start = time.monotonic()
        results = pool.score_sync(items)
        first_call_s = time.monotonic() - start
        assert results == [
            RewardResult(1.0, None),
            RewardResult(0.0, "timed out after 1 s"),
            RewardResult(1.0, None),  # items after the hung one in its chunk are still scored
            RewardResult(0.0, None),
        ]
        assert first_call_s < 8.0  # 1 s timeout + a worker restart, not the 120 s sleep
        start = time.monotonic()
        assert pool.score_sync([RewardItem("a", "a"), RewardItem("b", "c")]) == [RewardResult(1.0, None), RewardResult(0.0, None)]
        assert time.monotonic() - start < 8.0


def test_a_worker_that_dies_costs_only_its_item():
    items = [RewardItem("a", "a"), RewardItem("die", "die"), RewardItem("b", "b")]
    with RewardPool("rewards_for_tests:dies_on_die", workers=1, timeout_s=10) as pool:
        results = pool.score_sync(items)
        assert pool.score_sync([RewardItem("c", "c")]) == [RewardResult(1.0, None)]
    assert results == [RewardResult(1.0, None), RewardResult(0.0, "reward worker died (exit code 3)"), RewardResult(1.0, None)]


def test_a_closed_pool_refuses_work():
    pool = RewardPool("exact", workers=1)
    assert pool.score_sync([RewardItem(" 7 ", "7")]) == [RewardResult(1.0, None)]
    pool.close()
    pool.close()
    with pytest.raises(RewardPoolError, match="closed"):
        pool.score_sync([RewardItem("7", "7")])


def test_closing_fails_calls_that_are_still_running():
    pool = RewardPool("rewards_for_tests:hangs_on_hang", workers=1, timeout_s=60)
    future = pool.submit([RewardItem("hang", "hang")])
    closer = threading.Timer(0.5, pool.close)
    closer.start()
    with pytest.raises(RewardPoolError, match="closed"):
        future.result(timeout=10)
    closer.join()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:reward", "cannot import module 'no_such_module_xyz' (ModuleNotFoundError"),
        ("rewards_for_tests:missing", "has no function 'missing'"),
        ("rewards_for_tests:NOT_CALLABLE", "has no function 'NOT_CALLABLE'"),
        ("exactly", "is not a reward"),
    ],
)
def test_an_unusable_reward_is_a_clear_error_in_the_caller(spec, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        resolve_reward(spec)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        RewardPool(spec)


def test_config_accepts_builtin_names_and_import_paths_only():
    assert load_config(None, ["task.reward=pkg.sub.module:fn"]).task.reward == "pkg.sub.module:fn"
    for bad in ("math-verify", "pkg.module", "pkg:mod:fn", "pkg.module:"):
        with pytest.raises(ConfigError, match="task.reward"):
            load_config(None, [f"task.reward={bad}"])


def test_task_reward_still_scores_in_process():
    task = Task("t", [], [], reward_kind="math_verify")
    assert task.reward("\\boxed{0.5}", "1/2") == 1.0
    assert Task("t", [], [], reward_kind="exact").reward(" 46\n", "46") == 1.0
