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
