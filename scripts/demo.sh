#!/usr/bin/env bash
# The embedded demo: build the tiny model + task offline, RL-train it with vLLM V1, write metrics + plots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# --overwrite: running the demo again replaces the previous demo run (use --resume runs/demo to continue one)
exec .venv/bin/parityrl train configs/demo.yaml --run-dir "${RUN_DIR:-runs/demo}" --overwrite "$@"
