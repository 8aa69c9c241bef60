"""Run `parityrl check` on every installed vLLM release and write docs/parity_matrix.md.

    bash scripts/setup.sh --vllm 0.31.0            # once per other release (.venv-vllm-0.31.0)
    .venv/bin/python scripts/parity_matrix.py       # every .venv*, every case; skips results already there
    .venv/bin/python scripts/parity_matrix.py --venv .venv-vllm-0.31.0 --case fp32 --force

Each (release, case) runs `VENV/bin/parityrl check configs/demo.yaml --json ...` (the cases are
`parity.matrix.CASES`) and its whole output goes to docs/parity_matrix/<release>/<case>.json as soon
as it finishes, so an interrupted matrix continues where it stopped. The page is rendered from all the
JSON there at the end (`--render-only`: just that). One check at a time: each starts a vLLM engine.

`--out DIR --strict` (CI's release stage, `.ci/run`) writes the results and page under DIR instead and
exits 1 if any release breaks a bound of `parity.matrix.failures` (its `KNOWN_LIMITS` aside).
`--compare-with docs/parity_matrix` also exits 1 where a fresh result reaches another verdict than the
committed one (`parity.matrix.disagreements`: read-back settings, each bound, fixes 1 and 3 showing).

`--shims-off NAME[,NAME]` runs with those `engines.vllm_compat` shims switched off
(`PARITYRL_VLLM_SHIMS_OFF`) and writes to docs/parity_matrix/simulated/ instead, outside the page:
the run that shows the matrix's test would fail on a release that lacked the shim.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from parityrl.hardware import cpu_description  # noqa: E402
from parityrl.parity.matrix import CASE_BY_NAME, CASES, CONFIG, disagreements, failures, load_results, render, unexpected_failures  # noqa: E402

OUT = REPO / "docs" / "parity_matrix"
PAGE = REPO / "docs" / "parity_matrix.md"
COMMAND = ".venv/bin/python scripts/parity_matrix.py"
CHECK_TIMEOUT_S = 3600


def installed_venvs() -> list[Path]:
    return [path for path in [REPO / ".venv", *sorted(REPO.glob(".venv-vllm-*"))] if (path / "bin" / "parityrl").exists()]


def release_of(venv: Path) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-c", "import vllm; print(vllm.__version__)"],
                          check=True, capture_output=True, text=True, timeout=300).stdout.strip().splitlines()[-1]


def run_check(venv: Path, case_name: str, shims_off: str) -> dict:
    case = CASE_BY_NAME[case_name]
    command = [str(venv / "bin" / "parityrl"), "check", CONFIG, "--json", *case.flags]
    for override in case.sets:
        command += ["--set", override]
    environment = dict(os.environ)
    if shims_off:
        environment["PARITYRL_VLLM_SHIMS_OFF"] = shims_off
    began = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    shown = [str(Path(command[0]).relative_to(REPO)), *command[1:]]
    result = {"case": case_name, "command": " ".join(shown), "shims_off": shims_off, "elapsed_s": round(time.monotonic() - began, 1),
              "machine": cpu_description()}  # fmt: skip
    if done.returncode != 0:  # a release on which the check fails is a row of the matrix, with what it said
        # what it said last, without the warnings that follow any exit (the resource tracker's at shutdown)
        said = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip() and "warn" not in line.lower()]
        return result | {"check": {}, "error": f"exit {done.returncode}: " + " / ".join(said[-4:])}
    printed = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{"))  # `check --json`: one line
    return result | {"check": json.loads(printed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, action="append", help="a release's virtualenv (repeatable; default: every .venv*)")
    parser.add_argument("--case", action="append", choices=[case.name for case in CASES], help="default: every case")
    parser.add_argument("--force", action="store_true", help="run again where a result is already there")
    parser.add_argument("--shims-off", default="", help="switch these vllm_compat shims off (results go to simulated/)")
    parser.add_argument("--render-only", action="store_true", help="only write the page from the JSON there")
    parser.add_argument("--out", type=Path, default=OUT, help="where the JSON goes (the page beside it as parity_matrix.md "
                        "unless it is the default, docs/parity_matrix/, whose page is docs/parity_matrix.md)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a release breaks a bound")
    parser.add_argument("--compare-with", type=Path, help="a committed matrix (docs/parity_matrix): exit 1 where a result run now "
                        "reaches another verdict than the committed one")
    options = parser.parse_args()
    out = options.out.resolve()
    page = PAGE if out == OUT else out / "parity_matrix.md"

    fresh: list[dict] = []
    if not options.render_only:
        for venv in [REPO / v if not v.is_absolute() else v for v in options.venv or []] or installed_venvs():
            release = release_of(venv)
            for case_name in options.case or [case.name for case in CASES]:
                target = out / ("simulated" if options.shims_off else release) / (
                    f"{release}-{case_name}-{options.shims_off}-off.json" if options.shims_off else f"{case_name}.json")
                if target.exists() and not options.force:
                    print(f"vLLM {release} {case_name}: kept {target}", flush=True)
                    continue
                print(f"vLLM {release} {case_name}: running parityrl check ...", flush=True)
                result = {"release": release} | run_check(venv, case_name, options.shims_off)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".json.partial")
                partial.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
                partial.replace(target)  # atomic: a killed run leaves no half-written result
                fresh.append(result)
                problems = failures(result)
                print(f"  {result['elapsed_s']:.0f} s: " + ("holds" if not problems else "; ".join(problems)), flush=True)
    results = load_results(out)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render(results, COMMAND))
    print(f"wrote {page}")
    problems = [problem for result in results for problem in unexpected_failures(result)]
    if options.compare_with is not None:
        for result in fresh:
            committed = options.compare_with / result["release"] / f"{result['case']}.json"
            if not committed.is_file():
                problems.append(f"vLLM {result['release']} {result['case']}: nothing committed at {committed} to compare with")
                continue
            found = disagreements(result, json.loads(committed.read_text()))
            problems += found
            print(f"vLLM {result['release']} {result['case']} against {committed}: " + ("same verdicts" if not found else "; ".join(found)))
    if (options.strict or options.compare_with is not None) and problems:
        raise SystemExit("parity matrix: " + "; ".join(problems))


if __name__ == "__main__":
    main()
