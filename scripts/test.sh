#!/usr/bin/env bash
# The tests. Default: the fast tier (`-m "not slow"`): every unit test, the tiny model's CPU tests and
# one shared real vLLM V1 engine (generate, inflight update, parity) -- minutes on 2 cores.
# `bash scripts/test.sh --all`: every tier (the vLLM fault runs, Ray, SmolLM2, other engines).
# Anything else goes to pytest (a later -m wins: `--all -m slow` runs the full tier's own tests).
# Markers (what a test needs): vllm, ray, smollm2, tiny_model, slow; `unit` = none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
tier=(-m "not slow")
if [[ "${1:-}" == "--all" ]]; then
  tier=()
  shift
fi
exec .venv/bin/python -m pytest "${tier[@]}" "$@"
