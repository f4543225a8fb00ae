// Per-phase profile of the CPU kernel, outside ONNX Runtime: times the two parallel phases of
// sap_phases.h (partial sums, apply; the prefix runs between them in the calling thread) at each CPU level on one thread, in ns per element. Built and run by
// benchmarks/phase_profile.sh; under valgrind --tool=callgrind the same program gives instruction
// counts per phase (valgrind has no AVX-512: run it with the levels up to avx2).
//
//   phase_profile MODE N M REPS [LEVEL...]   MODE: bernoulli | multinomial; LEVEL: scalar avx2 avx512
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "sap_kernels.h"

using namespace onnx_sap;

namespace {

using Clock = std::chrono::steady_clock;
constexpr const char* kPhases[2] = {"partial sums", "apply"};
double g_phase_s[2];
int g_call;

// With fewer than kCpuExampleTasksMin examples the driver calls its parallel-for once per phase, in
// order: time each call serially.
void timed_serial_for(void*, void (*fn)(void*, size_t), size_t total, void* ctx) {
  const auto t0 = Clock::now();
  for (size_t i = 0; i < total; ++i) fn(ctx, i);
  g_phase_s[g_call++ % 2] += std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s bernoulli|multinomial N M REPS [scalar avx2 avx512]\n", argv[0]);
    return 2;
  }
  const Mode mode = std::strcmp(argv[1], "bernoulli") == 0 ? Mode::kBernoulli : Mode::kMultinomial;
  const int64_t n = std::atoll(argv[2]), m = std::atoll(argv[3]);
  const int reps = std::atoi(argv[4]);
  std::vector<std::string> levels(argv + 5, argv + argc);
  if (levels.empty()) levels = {"scalar", "avx2", "avx512"};

  std::vector<float> x(static_cast<size_t>(n * m)), y(x.size());
  std::mt19937 gen(1);
  std::normal_distribution<float> normal;
  for (float& v : x) v = std::max(normal(gen), 0.0f);  // post-ReLU: about half zeros
  Layout layout;
  if (!make_layout(n, m, sample_count(1.0, 0, m), mode, cpu_chunk(n, m), kCpuVarChunk, layout)) return 2;
  const StreamKey key{0x12345678u, 0x9abcdef0u, 0};
  std::printf("%s, float32 %lldx%lld, one thread, best of %d (ns per element)\n", argv[1],
              static_cast<long long>(n), static_cast<long long>(m), reps);
  if (n >= kCpuExampleTasksMin) {
    std::fprintf(stderr, "N must be below %lld: larger batches run one task per example, not per phase\n",
                 static_cast<long long>(kCpuExampleTasksMin));
    return 2;
  }
  std::printf("  %-8s %14s %10s %10s\n", "level", kPhases[0], kPhases[1], "total");
  for (const std::string& name : levels) {
    Isa isa = Isa::kScalar;
    for (int i = 0; i < kIsaLevels; ++i)
      if (name == isa_name(static_cast<Isa>(i))) isa = static_cast<Isa>(i);
    if (name != isa_name(isa) || !isa_available(isa)) {
      std::printf("  %-8s (not available here)\n", name.c_str());
      continue;
    }
    double best[2] = {INFINITY, INFINITY};
    for (int r = 0; r < reps; ++r) {
      g_phase_s[0] = g_phase_s[1] = 0;
      g_call = 0;
      run_cpu(isa, DType::kFloat32, x.data(), y.data(), layout, key, Pool{&timed_serial_for, nullptr, true});
      for (int p = 0; p < 2; ++p) best[p] = std::min(best[p], g_phase_s[p]);
    }
    const double per = 1e9 / static_cast<double>(n * m);
    std::printf("  %-8s %14.2f %10.2f %10.2f\n", name.c_str(), best[0] * per, best[1] * per,
                (best[0] + best[1]) * per);
  }
  return 0;
}
