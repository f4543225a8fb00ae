#!/usr/bin/env bash
# CI: the release path works. Builds the repaired manylinux wheel (scripts/build_wheel.sh), installs
# it into a fresh venv and runs harden + verify on the bundled example with no compiler on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

wheel=$(ONNX_SAP_CUDA=OFF bash scripts/build_wheel.sh "$work/dist" | tail -n 1)
echo "== fresh venv: pip install $(basename "$wheel")"
"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$wheel"

# Only the venv on PATH: the installed package must need no compiler, cmake or nvcc.
cp "$root/examples/digits/digits_cnn.onnx" "$work/"
(
  cd "$work"
  export PATH="$work/venv/bin"
  for tool in cc gcc c++ g++ cmake nvcc; do
    if command -v "$tool" >/dev/null; then echo "wheel.sh: $tool is on PATH" >&2; exit 1; fi
  done
  echo "== onnx-sap --version"
  onnx-sap --version
  echo "== onnx-sap harden + verify (no compiler on PATH)"
  onnx-sap harden digits_cnn.onnx -o digits_cnn.sap.onnx
  onnx-sap verify digits_cnn.sap.onnx
)
echo "wheel.sh: $(basename "$wheel") installs and runs without a compiler"
