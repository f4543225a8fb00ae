#!/usr/bin/env bash
# Per-phase profile of the CPU kernel (benchmarks/phase_profile.cc), built from the kernel sources
# with the flags of custom_ops/CMakeLists.txt. Prints ns per element per phase and level for a
# post-ReLU float32 1x64x112x112 activation, both modes; with CALLGRIND=1, instructions per element
# per phase instead (valgrind; scalar and avx2 only, valgrind has no AVX-512).
#   bash benchmarks/phase_profile.sh [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-5}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
k=custom_ops/kernels
flags=(-std=c++17 -O3 -g -fno-math-errno -fno-trapping-math -DONNX_SAP_WITH_X86_SIMD -I"$k")
v3=(-mavx2 -mfma -mf16c -mbmi2)
g++ "${flags[@]}" -c "$k/sap_cpu.cc" -o "$out/cpu.o"
g++ "${flags[@]}" "${v3[@]}" -c "$k/sap_cpu_avx2.cc" -o "$out/avx2.o"
g++ "${flags[@]}" "${v3[@]}" -mavx512f -mavx512dq -mavx512bw -mavx512vl -mprefer-vector-width=512 \
  -Wno-maybe-uninitialized -c "$k/sap_cpu_avx512.cc" -o "$out/avx512.o"
g++ "${flags[@]}" benchmarks/phase_profile.cc "$out"/*.o -o "$out/phase_profile"
for mode in bernoulli multinomial; do
  if [ "${CALLGRIND:-0}" = 1 ]; then
    for level in scalar avx2; do
      valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$out/phase_profile" "$mode" 1 802816 1 "$level" \
        >/dev/null 2>&1
      echo "$mode $level: instructions per element by phase"
      # Inclusive counts of the phase functions (the SIMD levels' range functions are not all inlined
      # into them): the largest line of each, since callgrind_annotate also splits them by source file.
      callgrind_annotate --inclusive=yes "$out/cg" 2>/dev/null | grep -v "=>" | grep -E "Call<float>::(partial|apply)\(" |
        sed -E 's/^ *([0-9,]+) .*Call<float>::(partial|apply)\(.*/\2 \1/' | tr -d , |
        awk '{if ($2 > t[$1]) t[$1] = $2} END {printf "  partial sums %6.1f   apply %6.1f\n", t["partial"] / 802816, t["apply"] / 802816}'
    done
  else
    "$out/phase_profile" "$mode" 1 802816 "$reps"
  fi
done
