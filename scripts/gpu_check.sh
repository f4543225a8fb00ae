#!/usr/bin/env bash
# Builds the op library with CUDA kernels and runs the CUDA tests (plus the CPU op tests) on a GPU
# machine that has numpy, onnx, onnxruntime (CPU build is enough), pytest, cmake, ninja and nvcc.
# The CUDA kernels are exercised through the library's C entry point, so onnxruntime-gpu is not needed.
#
# Usage: scripts/gpu_check.sh [ORT_INCLUDE_DIR]   (default: .cache/ort-headers/include/onnxruntime)
set -euo pipefail
cd "$(dirname "$0")/.."
include=${1:-.cache/ort-headers/include/onnxruntime}
build=${BUILD_DIR:-/tmp/onnx-sap-gpu-build}
arch=${CUDA_ARCH:-native}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DONNX_SAP_CUDA=ON \
  -DONNXRUNTIME_INCLUDE_DIR="$(pwd)/$include" -DCMAKE_CUDA_ARCHITECTURES="$arch" >/dev/null
cmake --build "$build"
cp "$build/custom_ops/libonnx_sap_ops.so" onnx_sap/
trap 'rm -f onnx_sap/libonnx_sap_ops.so' EXIT
python3 -c "import onnx_sap; print('CUDA kernels:', onnx_sap.has_cuda_kernels(), 'GPUs:', onnx_sap.cuda_device_count())"
python3 -m pytest -q -rs tests/test_cuda.py tests/test_op.py tests/test_reference.py
