#!/usr/bin/env bash
# Creates .venv (if missing) and builds + installs onnx-sap into it with the test and plot extras.
# The op library is built with CUDA kernels whenever nvcc is found (ONNX_SAP_CUDA=AUTO); set
# ONNX_SAP_CUDA=ON to require them (CI does), OFF to skip them.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
.venv/bin/python -m pip install -q --upgrade pip
# The build is shown as it runs (CMake's findings, each file compiled, CUDA or not), pip's own
# chatter is not; the whole log stays in .cache/setup.log and its end is printed on failure.
mkdir -p .cache
echo "== building and installing onnx-sap (ONNX_SAP_CUDA=${ONNX_SAP_CUDA:-AUTO}; full log: .cache/setup.log)"
if ! .venv/bin/python -m pip install -v ".[test,plot]" 2>&1 | tee .cache/setup.log \
    | { grep -E --line-buffered '^ *(\*\*\* |-- (onnx_sap|The (CXX|CUDA) compiler)|\[[0-9]+/[0-9]+\] )' || true; }; then
  tail -n 40 .cache/setup.log
  echo "setup.sh: the build failed; the full log is .cache/setup.log" >&2
  exit 1
fi
.venv/bin/python -c "import onnx_sap; print(f'onnx-sap {onnx_sap.__version__}: op library {onnx_sap.get_library_path()} (CUDA kernels: {onnx_sap.has_cuda_kernels()})')"
