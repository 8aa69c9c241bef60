#!/usr/bin/env bash
# The CUDA path, checked on a machine with NVIDIA GPUs: its own virtualenv (.venv-gpu, the `vllm`
# wheel; the CPU .venv is left alone), then vLLM engine parity tests, a short RL run with the trainer
# on CUDA and the ray backend. Everything goes to docs/gpu_check/<UTC date>.log; a summary ends it.
# Usage: bash scripts/gpu_check.sh        (exit 0 only when every stage passed)
set -euo pipefail
cd "$(dirname "$0")/.."
export PARITYRL_VENV="${PARITYRL_VENV:-.venv-gpu}"
py="$PARITYRL_VENV/bin/python"
log="docs/gpu_check/$(date -u +%Y-%m-%d).log"
mkdir -p docs/gpu_check runs/gpu-check
exec > >(tee -a "$log") 2>&1
echo "=== parityrl gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

results=()
stage() {  # stage NAME COMMAND...: run it, record PASS/FAIL with its time, go on either way
  local name="$1" start=$SECONDS
  shift
  echo
  echo "=== [$name] $*"
  if "$@"; then results+=("PASS  $name ($((SECONDS - start)) s)"); else results+=("FAIL  $name (exit $?, $((SECONDS - start)) s)"); fi
}

echo "=== [nvidia-smi]"
nvidia-smi
gpus="$(nvidia-smi -L | grep -c '^GPU ')"
echo "=== $gpus GPU(s)"

echo "=== [setup] bash scripts/setup.sh --gpu into $PARITYRL_VENV"
bash scripts/setup.sh --gpu

stage versions "$py" -c 'import torch, vllm; print("torch", torch.__version__, "cuda", torch.version.cuda, "| vllm", vllm.__version__, "| cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())'
# unit tests: train.device=auto now means cuda, so every Trainer they build runs on the GPU
stage unit-tests "$py" -m pytest -m unit -q
stage vllm-engine-tests "$py" -m pytest -m integration -q tests/test_vllm_engine.py tests/test_check.py

train_dir=runs/gpu-check/train-cuda
tiny=(--set assets.cache_dir=runs/test-assets --set assets.sft.steps=300 --set assets.sft.target_success=null)
stage trainer-on-cuda "$py" -m parityrl.cli train configs/demo.yaml "${tiny[@]}" --set train.device=cuda --set train.steps=5 \
  --set train.eval_every=5 --set logging.tensorboard=false --run-dir "$train_dir" --overwrite --no-plot
stage trainer-on-cuda-metrics "$py" -c '
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
steps = [r for r in rows if "train/loss" in r]
print(len(steps), "steps; last parity/kl", steps[-1].get("parity/kl"), "| train/step_s", steps[-1].get("train/step_s"))
assert len(steps) == 5' "$train_dir/metrics.jsonl"

# FSDP2 over NCCL: two CUDA trainer ranks (one GPU each) and one engine replica need 3 GPUs
if (( gpus >= 3 )); then
  stage fsdp2-nccl "$py" -m parityrl.cli train configs/demo.yaml "${tiny[@]}" --set pipeline.backend=ray \
    --set train.world_size=2 --set train.fsdp=true --set train.device=cuda --set train.steps=10 --set train.eval_every=10 \
    --set logging.tensorboard=false --run-dir runs/gpu-check/fsdp --overwrite --no-plot
else
  echo "=== only $gpus GPU(s): the FSDP2 + NCCL stage needs 3 (two trainer ranks, one engine replica); skipped"
fi

# Ray asks one whole GPU per engine replica and per CUDA trainer rank: the CI test (2 + 2, FSDP2) needs 4
if (( gpus >= 4 )); then
  stage ray-backend-tests "$py" -m pytest -m integration -q tests/test_ray_backend.py
else
  trainer_device=cuda
  (( gpus >= 2 )) || trainer_device=cpu  # one GPU: the engine replica gets it, the trainer rank runs on CPU
  echo "=== only $gpus GPU(s): tests/test_ray_backend.py needs 4; a 1-replica x 1-rank ray run instead (trainer on $trainer_device)"
  stage "ray-backend-1x1-trainer-$trainer_device" "$py" -m parityrl.cli train configs/demo.yaml "${tiny[@]}" \
    --set pipeline.backend=ray --set train.device="$trainer_device" --set train.steps=10 --set train.eval_every=10 \
    --set logging.tensorboard=false --run-dir runs/gpu-check/ray --overwrite --no-plot
fi

echo
echo "=== summary ($log)"
printf '%s\n' "${results[@]}"
if printf '%s\n' "${results[@]}" | grep -q '^FAIL'; then exit 1; fi
