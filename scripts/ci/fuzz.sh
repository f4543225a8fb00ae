#!/usr/bin/env bash
# Fuzzes `onnx-sap harden` with seeded mutated models (tests/fuzzing.py): every case must end in a
# checker-valid output that runs, or in a one-line error with exit 2. Fails on any internal error,
# crash, hang, partial output or changed input. About 3 minutes on 2 cores with the defaults;
# FUZZ_CASES and FUZZ_SEED change the run (the same seed gives the same cases).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/onnx-sap ] || bash scripts/setup.sh
.venv/bin/python tests/fuzzing.py --cases "${FUZZ_CASES:-300}" --seed "${FUZZ_SEED:-20261129}"
