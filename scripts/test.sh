#!/usr/bin/env bash
# The test suite: unit tests (fast, no vLLM) and integration tests (real vLLM V1 on CPU, full RL loop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "unit or integration" "$@"
