#!/usr/bin/env bash
# Download the wheels that the GPU device machine lacks into .wheels/ (git-ignored), for
# benchmarks/gpu_check.sh to install offline there. The device image has torch, torchdiffeq, scipy,
# tensorboard, absl-py and PyYAML, but not torchsde, ml-collections or torchsde's trampoline.
# Run here (pip reaches PyPI), then name .wheels in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DEST="${1:-.wheels}"
# Versions as in the development venv; all three are pure-Python wheels (py3-none-any).
PACKAGES=(torchsde==0.2.6 ml_collections==1.1.0 trampoline==0.1.2)
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$DEST" "${PACKAGES[@]}"
ls -l "$DEST"
