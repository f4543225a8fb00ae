#!/usr/bin/env bash
# Fuzzes `onnx-sap harden` (tests/fuzzing.py): every case must end in a checker-valid output that
# runs, or in a one-line error with exit 2; any internal error, crash, hang, partial output or
# changed input fails the step. Two bounded runs, about 3 minutes in all on 2 cores:
# - seeded mutations, each case in a child process (FUZZ_CASES, FUZZ_SEED: the same seed gives the
#   same cases);
# - coverage-guided with atheris (libFuzzer) when it installs, in process (ATHERIS_RUNS).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/onnx-sap ] || bash scripts/setup.sh
.venv/bin/python tests/fuzzing.py --cases "${FUZZ_CASES:-200}" --seed "${FUZZ_SEED:-20261129}"
if .venv/bin/python -m pip install -q atheris; then
  root=$PWD
  work=$(mktemp -d)
  rc=0
  (cd "$work" && "$root/.venv/bin/python" "$root/tests/fuzzing.py" --atheris -runs="${ATHERIS_RUNS:-300}" \
    -seed="${FUZZ_SEED:-20261129}" -max_total_time=90 -rss_limit_mb=6000 -print_final_stats=1 \
    > "$work/atheris.log" 2>&1) || rc=$?
  if [ "$rc" -ne 0 ]; then
    tail -40 "$work/atheris.log"  # the failing case is saved in $work as crash-*
    exit "$rc"
  fi
  echo "fuzz (atheris): $(grep -E '^Done' "$work/atheris.log"), $(grep -E 'new_units_added' "$work/atheris.log" | tr -s ' ')"
  rm -rf "$work"
else
  echo "fuzz: atheris does not install here; the seeded run above is the fuzz step"
fi
