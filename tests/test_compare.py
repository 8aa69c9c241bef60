"""compare: synthetic ablation (reference x3 seeds, a resample of it, a naive run with 10x clip/KL)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from parityrl.parity.compare import compare_runs, configuration_name
from parityrl.parity.compare_stats import band_test

STEPS = 40


def curves(rng: np.random.Generator, scale_clip_kl: float) -> dict[str, np.ndarray]:
    """One seed's metric curves: a per-seed offset, AR(1) drift and per-step noise, like short RL runs."""
    t = np.arange(1, STEPS + 1)

    def ar(sd: float) -> np.ndarray:
        out = np.zeros(STEPS)
        for i in range(1, STEPS):
            out[i] = 0.7 * out[i - 1] + rng.normal(0, sd)
        return out

    kl = 1e-3 * np.exp(rng.normal(0, 0.2) + ar(0.2) + rng.normal(0, 0.4, STEPS))
    clip = 0.02 * np.exp(rng.normal(0, 0.1) + ar(0.1) + rng.normal(0, 0.3, STEPS))
    return {
        "rl/clip_rate": scale_clip_kl * clip,
        "rl/kl_new_old": scale_clip_kl * kl,
        "rl/entropy": 1.2 - 0.4 * t / STEPS + rng.normal(0, 0.03) + ar(0.02) + rng.normal(0, 0.03, STEPS),
        "rl/reward": 0.5 + 0.3 * t / STEPS + rng.normal(0, 0.03) + ar(0.02) + rng.normal(0, 0.04, STEPS),
    }


def write_run(run_dir: Path, rng: np.random.Generator, scale: float, settings: dict) -> None:
    run_dir.mkdir(parents=True)
    data = curves(rng, scale)
    lines = [json.dumps({"step": 0, "eval/success": 0.4})]  # step 0: eval only, no rl/ metrics
    for i in range(STEPS):
        record = {"step": i + 1} | {k: float(v[i]) for k, v in data.items()}
        if i % 7 == 3:
            record["rl/kl_new_old"] = None  # undefined values are logged as null
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "engine": settings, "_versions": {"x": "1"}}))


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ablate_out")
    rng = np.random.default_rng(1234)
    for name, scale, settings in [
        ("reference", 1.0, {"kind": "reference"}),
        ("fixed-v1", 1.0, {"kind": "vllm"}),
        ("naive-v1", 10.0, {"kind": "vllm", "logprobs_mode": "raw_logprobs"}),
    ]:
        for seed in range(3):
            write_run(root / name / f"seed{seed}", rng, scale, settings)
    return root


def test_verdicts_and_outputs(ablation: Path, tmp_path: Path) -> None:
    run_dirs = sorted(ablation.glob("*/seed*"))
    result = compare_runs(run_dirs, None, tmp_path / "out")
    assert result.reference == "reference"
    assert {n: len(r) for n, r in result.configurations.items()} == {"reference": 3, "fixed-v1": 3, "naive-v1": 3}
    for metric in ("rl/clip_rate", "rl/kl_new_old", "rl/entropy", "rl/reward"):
        assert result.verdict("fixed-v1", metric) == "inside"
    assert result.verdict("naive-v1", "rl/clip_rate") == "outside"
    assert result.verdict("naive-v1", "rl/kl_new_old") == "outside"
    assert result.outside() == {"naive-v1": ["rl/clip_rate", "rl/kl_new_old"]}  # entropy/reward untouched
    naive_kl = next(v for v in result.verdicts if v.configuration == "naive-v1" and v.metric == "rl/kl_new_old")
    assert 5 < naive_kl.ratio < 20 and naive_kl.steps == STEPS - len(range(3, STEPS, 7))
    assert "naive-v1 on rl/clip_rate, rl/kl_new_old" in result.summary and "fixed-v1" in result.summary
    # the fixed run closes (about) the whole naive->reference gap
    assert 0.8 < result.gap_closed["fixed-v1"]["rl/kl_new_old"] < 1.2
    assert result.settings_diff["naive-v1"] == {"engine.kind": "vllm", "engine.logprobs_mode": "raw_logprobs"}

    out = tmp_path / "out"
    for name in ("figure1.png", "verdict.md", "verdict.json", "compare.html"):
        assert (out / name).stat().st_size > 0
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "compare.html").read_text()
    assert '<table id="verdict">' in page and "data:image/png;base64," in page and "naive-v1" in page
    payload = json.loads((out / "verdict.json").read_text())
    assert payload["outside"] == {"naive-v1": ["rl/clip_rate", "rl/kl_new_old"]}
    assert "| naive-v1 | 3 | rl/kl_new_old |" in (out / "verdict.md").read_text()


def test_parent_folder_is_searched_and_reference_option(ablation: Path, tmp_path: Path) -> None:
    result = compare_runs([ablation], "fixed-v1", tmp_path / "out")
    assert result.reference == "fixed-v1" and result.verdict("reference", "rl/reward") == "inside"
    with pytest.raises(ValueError, match="reference configuration 'nope' not found"):
        compare_runs([ablation], "nope", tmp_path / "out2")


def test_configuration_name() -> None:
    assert configuration_name(Path("ablate_out/naive-v1/seed2")) == "naive-v1"
    assert configuration_name(Path("runs/my-run")) == "my-run"


def test_band_test_resample_inside_shift_outside() -> None:
    rng = np.random.default_rng(0)
    ref = 1.0 + rng.normal(0, 0.1, (3, 30))
    assert band_test("same", "m", ref, 1.0 + rng.normal(0, 0.1, (3, 30))).verdict == "inside"
    assert band_test("shifted", "m", ref, 1.5 + rng.normal(0, 0.1, (3, 30))).verdict == "outside"
    empty = band_test("none", "m", ref, np.full((3, 30), np.nan))
    assert empty.verdict == "n/a" and empty.mean is None


def test_measured_table_summarises_each_run_robustly(tmp_path: Path) -> None:
    """The table of mismatch measured in the runs: a KL-like metric is a run's median over steps, so
    one probe spike does not move it (a mean would be ~100x larger); a fraction is a run's mean, so
    aborts in a few steps still show; a metric no step logged is None, not 0."""
    from parityrl.parity.compare import load_configurations
    from parityrl.parity.compare_stats import judge

    rng = np.random.default_rng(7)
    for name, kl in (("reference", 1e-12), ("naive-v1", 1e-2)):
        for seed in range(2):
            run = tmp_path / name / f"seed{seed}"
            write_run(run, rng, 1.0, {"kind": name})
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for record in records[1:]:
                step = record["step"]
                record["parity/kl"] = kl * (1000.0 if step == 5 else 1.0 + 0.01 * seed)  # one spike per run
                record["pipeline/aborted_frac"] = 0.5 if (name == "naive-v1" and step <= 4) else 0.0
            (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    measured = judge(load_configurations([tmp_path]), "reference").measured
    assert measured["naive-v1"]["parity/kl"]["mean"] == pytest.approx(1.005e-2)
    assert measured["naive-v1"]["parity/kl"]["min"] == pytest.approx(1e-2)
    assert measured["reference"]["parity/kl"]["max"] == pytest.approx(1.01e-12)
    assert measured["naive-v1"]["pipeline/aborted_frac"]["mean"] == pytest.approx(4 * 0.5 / STEPS)
    assert measured["reference"]["pipeline/aborted_frac"]["mean"] == 0.0
    assert measured["reference"]["pipeline/kv_staleness_kl"] == {"mean": None, "min": None, "max": None}


@pytest.mark.parametrize("folder", ["docs/ablation", "docs/ablation/demo-bf16", "docs/ablation/v0", "docs/fix3"])
def test_the_committed_ablation_verdict_is_what_its_committed_runs_give(folder: str, tmp_path: Path) -> None:
    """docs/*/verdict.json is written by `compare`, never by hand: re-deriving it from the committed
    runs with the current statistic gives the same outside/inside calls, ratios and means (the
    fix-3 rewards, 0.60 against 0.05, are these means)."""
    root = Path(__file__).resolve().parents[1] / folder
    committed = json.loads((root / "verdict.json").read_text())
    result = compare_runs([root / "runs"], committed["reference"], tmp_path)
    assert result.outside() == committed["outside"]
    for field in ("ratio", "mean", "reference_mean"):
        expected = {(v["configuration"], v["metric"]): v[field] for v in committed["verdicts"]}
        assert {(v.configuration, v.metric): getattr(v, field) for v in result.verdicts} == pytest.approx(expected), field


def test_the_committed_fix3_length_table_is_what_its_committed_runs_give() -> None:
    """docs/fix3/lengths.md ("92% of the samples cut short by an update") re-derived from
    the committed runs by scripts/completion_lengths.py's own table code."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("completion_lengths", repo / "scripts" / "completion_lengths.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.length_table(module.lengths_by_configuration([repo / "docs" / "fix3" / "runs"]), short=50)
    committed = [line for line in (repo / "docs" / "fix3" / "lengths.md").read_text().splitlines() if line.startswith("|")]
    assert table == committed
    assert "| fixed-v1-no3 | 2880 | 92.3% |" in table[3]
