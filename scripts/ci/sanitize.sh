#!/usr/bin/env bash
# CI: the op library under sanitizers (issue 8), each build forced into the tests with
# ONNX_SAP_LIBRARY and checked to be the one loaded (test_the_loaded_library_is_get_library_path).
#   1. ASan + UBSan (float-cast-overflow included, nothing recoverable): the op, verify and harden
#      tests. Python itself is not built with ASan and keeps objects to exit, so leak detection is
#      off (detect_leaks=0); every other report counts. The runtime is preloaded with libstdc++
#      (Python does not link it), else its __cxa_throw interceptor finds nothing to forward to.
#   2. TSan: the concurrency test (8 threads x 200 runs of one session) with one intra-op thread,
#      so the only threads are the callers' and ONNX Runtime's pool synchronisation (invisible to
#      TSan, as ONNX Runtime is not instrumented) plays no part. Every report counts: none needs
#      suppressing (ignore_noninstrumented_modules keeps ONNX Runtime's and Python's own apart).
# Either job fails on a test failure or on any report. CPU only, gcc; a build dir per sanitizer.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
root=$PWD
logs=$root/build/sanitize-logs
rm -rf "$logs" && mkdir -p "$logs"

build() {  # build DIR FLAGS...: the op library alone, CPU kernels only
  local dir=$1; shift
  cmake -S . -B "$dir" -DONNX_SAP_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    ${ONNXRUNTIME_INCLUDE_DIR:+-DONNXRUNTIME_INCLUDE_DIR="$ONNXRUNTIME_INCLUDE_DIR"} \
    -DCMAKE_CXX_FLAGS="$* -fno-omit-frame-pointer" -DCMAKE_SHARED_LINKER_FLAGS="$*" >/dev/null
  cmake --build "$dir" -j 2 >/dev/null
}

reports() {  # reports PREFIX: how many sanitizer reports the runs wrote
  cat "$logs/$1".* 2>/dev/null | grep -cE "ERROR: AddressSanitizer|Sanitizer: CHECK failed|WARNING: ThreadSanitizer|runtime error:" || true
}

failed=0

echo "== ASan + UBSan"
build build/asan -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all
status=0
ONNX_SAP_LIBRARY=$root/build/asan/custom_ops/libonnx_sap_ops.so \
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
ASAN_OPTIONS=detect_leaks=0:log_path=$logs/asan \
UBSAN_OPTIONS=print_stacktrace=1:log_path=$logs/asan \
  .venv/bin/pytest -q -p no:cacheprovider tests/test_op.py tests/test_verify.py tests/test_harden.py \
  "tests/test_library.py::test_the_loaded_library_is_get_library_path" || status=$?
n=$(reports asan)
echo "ASan + UBSan: pytest exit $status, $n reports (${SECONDS}s so far)"
[ "$n" = 0 ] || cat "$logs"/asan.*
[ "$status" = 0 ] && [ "$n" = 0 ] || failed=1

echo "== TSan"
build build/tsan -fsanitize=thread
status=0
# setarch -R: TSan maps its shadow at fixed addresses, which newer kernels' wider ASLR can collide with.
ONNX_SAP_LIBRARY=$root/build/tsan/custom_ops/libonnx_sap_ops.so \
LD_PRELOAD="$(gcc -print-file-name=libtsan.so) $(gcc -print-file-name=libstdc++.so)" \
TSAN_OPTIONS="log_path=$logs/tsan:ignore_noninstrumented_modules=1" \
  setarch "$(uname -m)" -R .venv/bin/pytest -q -p no:cacheprovider \
  "tests/test_op.py::test_concurrent_runs_use_each_call_index_once[intra1]" \
  "tests/test_library.py::test_the_loaded_library_is_get_library_path" || status=$?
n=$(reports tsan)
echo "TSan: pytest exit $status, $n reports (${SECONDS}s in all)"
[ "$n" = 0 ] || cat "$logs"/tsan.*
[ "$status" = 0 ] && [ "$n" = 0 ] || failed=1

exit $failed
