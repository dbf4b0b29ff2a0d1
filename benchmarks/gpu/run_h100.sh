#!/usr/bin/env bash
# On the GPU device (third call; parts aa and ab already in /tmp/up): install the vLLM 0.23
# bundle and pio's wheels, build the 2B-shaped random-weight model on the GPU, and run
# `pio-vllm bench suite --profile h100` inside BUDGET_MIN minutes; records go to $OUT.
# Without scipy and matplotlib there, the records are judged here afterwards:
#   python -m benchmarks.rereport <files>
set -euo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
budget=${BUDGET_MIN:-9}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
started=$(date +%s)
mkdir -p /tmp/up
cp .gpu-bundle/parts/part-ac .gpu-bundle/parts/install.sh /tmp/up/
echo "[1/4] installing vLLM 0.23 from the bundle"
(cd /tmp/up && bash install.sh) > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-bundle/pio-wheels/*.whl
export PYTHONPATH=/tmp/site:$repo VLLM_USE_FLASHINFER_SAMPLER=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)" \
    | tee "$OUT/versions.txt"
echo "[2/4] building the 2B-shaped model on the GPU"
python3 -m pio_vllm make-model "$HOME/.cache/pio-vllm/models/qwen3-vl-2b-seed0" \
    --preset qwen3-vl-2b --device cuda > "$OUT/make-model.log" 2>&1
echo "[3/4] the H100 config with that model"
python3 - <<'PY'
import yaml
config = yaml.safe_load(open("configs/qwen3-vl-2b-instruct-h100.yaml"))
config["engine"]["model"] = "pio:qwen3-vl-2b"
yaml.safe_dump(config, open("/tmp/h100-pio.yaml", "w"))
PY
left=$(( budget * 60 - ($(date +%s) - started) ))
echo "[4/4] bench suite --profile h100 (${left} s left of ${budget} min)"
python3 -m pio_vllm bench suite --profile h100 --config /tmp/h100-pio.yaml --out-dir "$OUT" \
    --budget-min "$(python3 -c "print(max(1.0, $left / 60))")" 2>&1 | tail -60
