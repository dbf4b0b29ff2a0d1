#!/usr/bin/env bash
# Here, before a GPU session: build what the H100 record needs into .gpu-bundle/ (git-ignored):
# the offline vLLM 0.23.0 bundle (../shared/gpu/build-bundle.sh: parts/part-aa.. and
# parts/install.sh) and pio's own runtime wheels the device lacks (pio-wheels/: httpx and
# httpx-sse for Python 3.12). Then the device calls, in order (docs/gpu.md):
#   1. carry [".gpu-bundle/parts/part-aa"]: mkdir -p /tmp/up && cp .gpu-bundle/parts/part-aa /tmp/up/
#   2. carry [".gpu-bundle/parts/part-ab"]: the same for part-ab
#   3. carry [".gpu-bundle/parts/part-ac", ".gpu-bundle/parts/install.sh", ".gpu-bundle/pio-wheels"]:
#      bash benchmarks/gpu/run_h100.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
shared=${SHARED_GPU:-$repo/../shared/gpu}
out=$repo/.gpu-bundle
echo "[1/2] vLLM 0.23.0 offline bundle (a few minutes)"
bash "$shared/build-bundle.sh" "$out"
echo "[2/2] pio's runtime wheels for the device (Python 3.12)"
rm -rf "$out/pio-wheels" && mkdir -p "$out/pio-wheels"
CERT=(); [ -f /etc/ssl/certs/ca-certificates.crt ] && CERT=(--cert /etc/ssl/certs/ca-certificates.crt)
python3 -m pip --isolated download "${CERT[@]}" -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform any --platform manylinux2014_x86_64 \
    -d "$out/pio-wheels" httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 httpx-sse==0.4.3
ls -l "$out/parts" "$out/pio-wheels"
du -sh "$out/parts"/part-?? "$out/pio-wheels"
