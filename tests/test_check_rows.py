"""`check --attribute` compares its rows on the same sampled tokens (`parity.check.common_samples`)."""

from __future__ import annotations

import pytest
import torch

from parityrl.batch import Sample
from parityrl.parity.check import common_samples


def sample(tokens: list[int], logprobs_old: list[float]) -> Sample:
    return Sample(prompt_token_ids=[1], completion_token_ids=tokens, logprobs_old=logprobs_old, version_per_token=[0] * len(tokens))


def test_rows_are_compared_on_the_samples_every_row_drew():
    engine = [-0.5, -1.0]
    exact = torch.tensor(engine)
    kept = {
        "configured": {"samples": [sample([3, 4], engine), sample([5, 6], engine), sample([7, 8], engine)],
                       "recomputed": [exact, exact, exact + 0.01]},
        # the head's dtype moved the logits: its second sample drew other tokens, far off the trainer's
        "fix4 off": {"samples": [sample([3, 4], engine), sample([5, 9], engine), sample([7, 8], engine)],
                     "recomputed": [exact + 0.02, exact + 3.0, exact + 0.02]},
    }  # fmt: skip
    rows = common_samples(kept)
    assert {name: row["parity/same_samples_frac"] for name, row in rows.items()} == {"configured": pytest.approx(2 / 3), "fix4 off": pytest.approx(2 / 3)}
    assert rows["configured"]["parity_common/tokens"] == rows["fix4 off"]["parity_common/tokens"] == 4
    # the differing sample (|Δ| 3) is left out: fix 4 off is compared on samples 1 and 3 only
    assert rows["fix4 off"]["parity_common/abs_diff_max"] == pytest.approx(0.02, abs=1e-6)
    assert rows["configured"]["parity_common/abs_diff_max"] == pytest.approx(0.01, abs=1e-6)
    assert common_samples({"configured": kept["configured"], "short": {"samples": kept["configured"]["samples"][:2], "recomputed": []}}) == {}


def test_each_fix_is_judged_on_the_mismatch_it_exists_for():
    from parityrl.parity.check import FIX_OFF, fix_effects

    names = list(FIX_OFF)
    rows = {
        "configured": {"parity_common/kl": 1e-4, "parity/kl": 1e-4, "post_update/kl": 1e-4, "inflight/aborted_frac": 0.0},
        names[0]: {"parity_common/kl": 5e-2, "parity/kl": 5e-2, "post_update/kl": 5e-2, "inflight/aborted_frac": 0.0},
        # fix 2 moves only post_update/kl: a large parity/kl elsewhere must not count for it
        names[1]: {"parity_common/kl": 1e-4, "parity/kl": 9e-3, "post_update/kl": 2.9e-4, "inflight/aborted_frac": 0.0},
        names[2]: {"parity_common/kl": 1e-4, "parity/kl": 1e-4, "post_update/kl": 1e-4, "inflight/aborted_frac": 1.0},
        # judged on the common samples when the row has them, not on its own (here 10x from a changed sample)
        names[3]: {"parity_common/kl": 3.1e-4, "parity/kl": 1e-3, "post_update/kl": 1e-4, "inflight/aborted_frac": 0.0},
    }
    effects = {e.row: e for e in fix_effects(rows)}
    assert list(effects) == names[:4]  # a row the check did not run is left out
    assert (effects[names[0]].metric, effects[names[0]].ratio, effects[names[0]].shows) == ("parity_common/kl", pytest.approx(500), True)
    assert (effects[names[1]].metric, effects[names[1]].ratio, effects[names[1]].shows) == ("post_update/kl", pytest.approx(2.9), False)
    assert (effects[names[2]].ratio, effects[names[2]].shows) == (None, True)
    assert (effects[names[3]].ratio, effects[names[3]].shows) == (pytest.approx(3.1), True)
    assert "does not show (< 3×)" in effects[names[1]].describe()
    no_inflight = {name: {k: v for k, v in row.items() if k in ("parity_common/kl", "parity/kl")} for name, row in rows.items()}
    assert {e.row: e.shows for e in fix_effects(no_inflight)}[names[1]] is None
