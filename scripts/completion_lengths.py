"""The length distribution of the samples trained on, per configuration: a histogram PNG and a table.

    python scripts/completion_lengths.py RUNS... --out lengths.png

RUNS are run directories or folders holding them (as for `parityrl compare`: OUT/<config>/seed<N>/ is
one configuration with several seeds). Reads `rl/completion_lens` (each sample's length, every step
but step 0) and `pipeline/aborted_frac` from metrics.jsonl. With `engine.update_mode: abort` an update
that lands mid-generation cuts the requests in flight short and they are trained on as they are: the
histogram shows the short tail that keep-mode updates do not have.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from parityrl.metrics import read_metrics
from parityrl.parity.compare import configuration_name, find_run_dirs


def lengths_by_configuration(paths: list[Path]) -> dict[str, dict[str, np.ndarray]]:
    """configuration -> {"lengths": every sample's length, "aborted_frac": each step's aborted fraction}."""
    found: dict[str, dict[str, list[float]]] = {}
    for run in find_run_dirs(paths):
        entry = found.setdefault(configuration_name(run), {"lengths": [], "aborted_frac": []})
        for record in read_metrics(run):
            if record.get("step", 0) > 0 and isinstance(record.get("rl/completion_lens"), list):
                entry["lengths"].extend(record["rl/completion_lens"])
                entry["aborted_frac"].append(record.get("pipeline/aborted_frac") or 0.0)
    return {name: {k: np.asarray(v, dtype=float) for k, v in entry.items()} for name, entry in sorted(found.items()) if entry["lengths"]}


def length_table(data: dict[str, dict[str, np.ndarray]], short: int) -> list[str]:
    """The markdown table (docs/fix3/lengths.md): per configuration, samples, mean aborted fraction,
    mean and 10/50/90% lengths, and the share shorter than `short` tokens."""
    lines = [f"| configuration | samples | aborted | mean length | 10% | 50% | 90% | shorter than {short} tokens |", "|---|---|---|---|---|---|---|---|"]
    for name, d in data.items():
        lengths = d["lengths"]
        q10, q50, q90 = np.percentile(lengths, [10, 50, 90])
        lines.append(
            f"| {name} | {len(lengths)} | {d['aborted_frac'].mean():.1%} | {lengths.mean():.1f} | {q10:.0f} | {q50:.0f} | {q90:.0f} "
            f"| {(lengths < short).mean():.1%} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--short", type=int, default=50, help="the table counts samples shorter than this (data/count.jsonl's answers are >= 55)")
    args = parser.parse_args()
    data = lengths_by_configuration(args.runs)
    if not data:
        raise SystemExit("no rl/completion_lens in these runs (logged since this script was added)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = int(max(d["lengths"].max() for d in data.values()))
    bins = np.arange(0, longest + 2) - 0.5
    fig, ax = plt.subplots(figsize=(8, 4))
    for line in length_table(data, args.short):
        print(line)
    for name, d in data.items():
        lengths = d["lengths"]
        ax.hist(lengths, bins=bins, histtype="step", linewidth=1.5, density=True, label=f"{name} (n={len(lengths)})")
    ax.set_xlabel("completion length (tokens) of a sample trained on")
    ax.set_ylabel("fraction of samples")
    ax.legend(frameon=False)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
