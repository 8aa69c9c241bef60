"""The metric registry is the one list of metric names: complete, consistent, and what docs/metrics.md shows."""

from __future__ import annotations

import json
import re
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from parityrl.metric_registry import METRICS, PANELS, check_columns, compared_metrics, metric, plot_panels, reference_markdown

ROOT = Path(__file__).resolve().parent.parent
# a metric key in source: a quoted string that starts with one of the metric namespaces
LOGGED_KEY = re.compile(r"""["']((?:rl|parity|pipeline|perf|train|eval|inflight|inflight_v|inflight_v1_kept_kv|post_update)/[A-Za-z0-9_.\-]+)["']""")


def test_readme_metrics_table_is_current():
    page = (ROOT / "docs" / "metrics.md").read_text()
    assert reference_markdown() in page, "docs/metrics.md is stale: run python scripts/update_references.py"


def test_every_metric_key_in_the_source_is_registered():
    sources = [p for p in (ROOT / "src" / "parityrl").rglob("*.py") if p.name != "metric_registry.py"]
    found = {key for path in sources for key in LOGGED_KEY.findall(path.read_text())}
    assert {"rl/clip_rate", "pipeline/group_ids", "train/skip_reason"} <= found  # the scan sees the logging code
    assert sorted(found - {m.name for m in METRICS}) == []


def test_every_check_comparison_is_registered():
    """`parityrl check` reports a comparison's statistics under a prefix: `compare(...).summary("inflight_v")` gives
    inflight_v/kl, ... (`scoring.Mismatch.summary`; a summary indexed at once, like the KV staleness's, reports one
    key only), and `--full-vocab` adds `scoring.DistributionMismatch.summary("parity")`."""
    from parityrl.metric_registry import COMPARISON_STATISTICS
    from parityrl.scoring import DistributionMismatch, Mismatch

    source = (ROOT / "src" / "parityrl" / "parity" / "check.py").read_text()
    prefixes = set(re.findall(r"""\.summary\(["'](\w+)["']\)(?!\[)""", source))
    assert prefixes >= {"parity", "post_update"}, "the `.summary(prefix)` calls of parity/check.py changed: update this scan"
    reported = {key for prefix in prefixes for key in Mismatch().summary(prefix)} | set(DistributionMismatch().summary("parity"))
    assert sorted(reported - {m.name for m in METRICS}) == []
    assert {key.split("/", 1)[1] for key in Mismatch().summary("x")} == set(COMPARISON_STATISTICS)


def test_names_unique_panels_known_titles_unique():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    assert {m.panel for m in METRICS} <= {p.name for p in PANELS}
    titles = [m.check_title for m in METRICS if m.check_title]
    assert len(titles) == len(set(titles))
    with pytest.raises(KeyError, match="not a registered metric"):
        metric("rl/nope")


def test_selections_read_by_plot_compare_and_check():
    assert [m.name for m in compared_metrics()] == ["rl/clip_rate", "rl/kl_new_old", "rl/entropy", "rl/reward"]
    assert {m.name for m in compared_metrics() if m.mismatch_signal} == {"rl/clip_rate", "rl/kl_new_old"}
    panels = plot_panels()
    assert list(panels) == ["rl", "parity", "pipeline", "episode", "perf", "train"]  # `check` metrics are never in metrics.jsonl
    plotted = {m.name for ms in panels.values() for m in ms}
    assert "pipeline/group_ids" not in plotted and "train/skip_reason" not in plotted  # a list and a string
    assert {"parity/full_kl", "parity/full_tv", "parity/support_mismatch_frac", "pipeline/reward_errors"} <= plotted
    assert check_columns()[0].name == "parity/kl"  # the ratio column of the check table


def test_plot_run_draws_what_was_logged_smoothed_and_leaves_out_the_rest(tmp_path):
    from parityrl.plot import moving_average, plot_run, series

    records = [
        {"step": 1, "rl/reward": 0.5, "parity/kl": 1e-9, "pipeline/group_ids": [0, 1], "train/skip_reason": None},
        {"step": 2, "rl/reward": 0.7, "parity/kl": None, "pipeline/group_ids": [2, 3], "train/skip_reason": "non-finite loss"},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "perf.png").write_bytes(b"stale")  # a panel of an earlier drawing that has no data now
    paths = plot_run(tmp_path)
    # only panels with a logged number: pipeline has lists only, perf and train nothing
    assert [p.name for p in paths] == ["rl.png", "parity.png"]
    assert not (tmp_path / "plots" / "perf.png").exists()
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert series(records, "parity/kl") == ([1], [1e-9])
    assert series(records, "pipeline/group_ids") == ([], [])
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_check_table_columns_come_from_the_registry(monkeypatch):
    from parityrl import cli
    from parityrl.config import load_config

    out = StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=250))
    rows = {
        "configured": {"parity/kl": 2e-6, "parity/abs_diff_max": 0.01, "inflight/aborted_frac": 0.0},
        "fix1 off (raw logprobs)": {"parity/kl": 2e-4, "parity/abs_diff_max": 0.2, "inflight/aborted_frac": 0.0},
    }
    cli._print_check_table(load_config(None), rows)
    text = out.getvalue()
    header = next(line for line in text.splitlines() if "config" in line and "kl" in line)
    assert [t for t in ("kl", "×", "max|Δ|", "aborted") if t in header] == ["kl", "×", "max|Δ|", "aborted"]
    assert "mean|Δ|" not in header and "post kl" not in header  # measured by no configuration: left out
    assert "100" in text  # parity/kl of fix1 off as a ratio to the configured row
    assert "aborted: inflight/aborted_frac, " + metric("inflight/aborted_frac").meaning in text
