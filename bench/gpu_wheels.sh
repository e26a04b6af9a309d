#!/usr/bin/env bash
# Fill gpu-wheels/ (git-ignored) with the wheels bench/gpu.sh installs on a GPU machine that
# has Python 3.12 and torch but no network: rdpt's GPU path without torch, CUDA libraries,
# MLflow or pyarrow (the benchmarks and GPU tests import neither). Run where pip can reach
# PyPI; the folder must stay under the 64 MiB a device run carries.
#
#   bench/gpu_wheels.sh [DIR]          # default: gpu-wheels/
#   bench/gpu_wheels.sh --list         # print the packages, download nothing
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PACKAGES=(
    "megatron-core==0.19.*" "pydantic>=2.6,<3" pydantic-core annotated-types typing-inspection
    pyyaml safetensors psutil tqdm packaging hjson ninja py-cpuinfo msgpack einops
    webdataset braceexpand wids pytest pytest-timeout pluggy iniconfig
)
if [ "${1:-}" = "--list" ]; then
    printf '%s\n' "${PACKAGES[@]}" "deepspeed==0.19.8 (built here as a pure-Python wheel)"
    exit 0
fi
DIR="${1:-$ROOT/gpu-wheels}"
mkdir -p "$DIR"
PLATFORM=(--python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
          --only-binary=:all:)
python3 -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DIR" "${PACKAGES[@]}"
# DeepSpeed ships an sdist; with DS_BUILD_OPS=0 its wheel is pure Python (ops JIT-built later,
# which rdpt's optim.impl=auto never asks for).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "deepspeed==0.19.8"
du -sh "$DIR"
