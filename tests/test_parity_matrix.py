"""docs/parity_matrix.md is what its committed JSON says, and every release in it holds the bounds.

The JSON is `parityrl check --json` on each release's own virtualenv (`scripts/parity_matrix.py`); this
test needs no vLLM: it re-derives the page and applies `parity.matrix.failures` to what was measured.
The last test mutates a measured result the ways a release could break parity and requires each to
be caught, so the bounds are not vacuous."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from parityrl.parity.matrix import CASES, CONFIGURED, FIX_ROWS, KNOWN_LIMITS, disagreements, failures, load_results, render, unexpected_failures

REPO = Path(__file__).resolve().parents[1]
MATRIX = REPO / "docs" / "parity_matrix"


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return load_results(MATRIX)


def test_page_is_rendered_from_the_committed_json(results):
    assert (REPO / "docs" / "parity_matrix.md").read_text() == render(results, ".venv/bin/python scripts/parity_matrix.py"), (
        "docs/parity_matrix.md differs from its JSON: run `.venv/bin/python scripts/parity_matrix.py --render-only`"
    )


def test_every_release_measured_holds_every_bound_but_its_known_limits(results):
    measured = {(r["release"], r["case"]): r for r in results}
    for release in ("0.18.1", "0.31.0", "0.32.0"):
        for case in CASES:
            assert (release, case.name) in measured, f"vLLM {release} {case.name} is not in the matrix"
    assert [problem for result in results for problem in unexpected_failures(result)] == []
    for (release, case), ((cause, *_), _) in KNOWN_LIMITS.items():  # still a limit: else it goes from KNOWN_LIMITS
        assert any(cause in problem for problem in failures(measured[(release, case)])), (release, case)


# what each shim keeps from happening, as the run without it fails: a crash of another cause (an engine
# that does not start, a typo in the shim's name) must not count as the shim's failure
SHIM_FAILURES = {"stream_tags": "object has no attribute 'weight_versions'"}


def test_a_release_without_a_shim_is_caught():
    """The simulated runs (a shim switched off on a release that needs it) fail the matrix, each for the
    reason its shim exists. (`pause_sleep` switched off on 0.31.0 held every bound on an AMD EPYC,
    kept-KV kl 3.3e-12: not a simulated failure, so not here.) The bounds themselves are exercised on
    measured numbers by the next test."""
    simulated = sorted((MATRIX / "simulated").glob("*.json"))
    assert simulated, "no simulated run under docs/parity_matrix/simulated/"
    for path in simulated:
        result = json.loads(path.read_text())
        assert result["shims_off"] in SHIM_FAILURES, f"{path.name}: no expected failure for shim {result['shims_off']!r}"
        problems = failures(result)
        assert any(SHIM_FAILURES[result["shims_off"]] in problem for problem in problems), (path.name, problems)


def test_bounds_catch_what_a_release_could_break(results):
    fp32 = next(r for r in results if r["case"] == "fp32" and r["release"] == "0.32.0")  # the release parityrl pins

    def broken(change) -> list[str]:
        result = copy.deepcopy(fp32)
        change(result["check"])
        return failures(result)

    assert failures(fp32) == []

    def ignores_logprobs_mode(check):  # fix 1 off reads the same as on: the setting never reached the sampler
        check[FIX_ROWS["fix1 off"]]["parity/kl"] = check[CONFIGURED]["parity/kl"]

    def reports_raw(check):
        check[CONFIGURED]["settings"].setdefault("worker", {})["sampler_logprobs_mode"] = "raw_logprobs"

    def drifts_inflight(check):  # tokens after a keep-mode update scored against the wrong version
        check[CONFIGURED]["inflight_v/kl"] = 3e-6

    def mistags_versions(check):  # tokens computed by v tagged v+1 (a pause that did not drain the stream)
        check[CONFIGURED]["inflight_v1_kept_kv/kl"] = 4e-6

    def aborts_inflight(check):
        check[CONFIGURED]["inflight/aborted_frac"] = 0.25

    def full_kl_nan(check):
        check[CONFIGURED]["parity/full_kl"] = float("nan")

    def salt_ignored(check):  # fix 2 off reads the same as on: the hazard sequence was never served old blocks
        check[FIX_ROWS["fix2 off"]]["post_update/kl"] = check[CONFIGURED]["post_update/kl"]

    def caches_unsalted(check):  # the engine caches without the salt: stale KV whenever a prefix repeats
        check[CONFIGURED]["settings"]["cache_salt"] = None

    for change, expected in [(ignores_logprobs_mode, "ignored logprobs_mode"), (reports_raw, "raw_logprobs"),
                             (drifts_inflight, "inflight_v/kl"), (mistags_versions, "inflight_v1_kept_kv/kl"),
                             (aborts_inflight, "did not keep"), (salt_ignored, "fix 2 off"),
                             (caches_unsalted, "prefix caching = 'on'"), (full_kl_nan, "parity/full_kl")]:  # fmt: skip
        found = broken(change)
        assert any(expected in problem for problem in found), (change.__name__, found)
    assert failures(fp32 | {"error": "exit 1: EngineDeadError"})  # a release on which check fails is a failure


def test_a_fresh_measurement_is_held_to_the_committed_verdicts(results):
    """CI's release stage measures a release afresh and compares it with its committed row: the values
    may move with the CPU, a verdict may not."""
    committed = next(r for r in results if r["release"] == "0.31.0" and r["case"] == "fp32")
    fresh = copy.deepcopy(committed)
    fresh["check"][CONFIGURED]["parity/kl"] *= 3  # another CPU's rounding: same verdict
    assert disagreements(fresh, committed) == []
    broken = copy.deepcopy(committed)
    broken["check"][CONFIGURED]["post_update/kl"] = 2e-6  # stale prefix KV after an update
    broken["check"][FIX_ROWS["fix1 off"]]["parity/kl"] = 1e-12  # logprobs_mode ignored
    broken["check"][CONFIGURED]["settings"]["cache_salt"] = None  # caching on, unsalted
    broken["check"][FIX_ROWS["fix2 off"]]["post_update/kl"] = 1e-12  # the hazard not shown
    found = disagreements(broken, committed)
    assert len(found) == 4 and any("post_update/kl" in f for f in found) and any("fix1 off" in f for f in found), found
    assert any("prefix caching" in f for f in found) and any("fix2 off" in f for f in found), found
    assert disagreements(fresh | {"error": "exit 1: EngineDeadError"}, committed)
