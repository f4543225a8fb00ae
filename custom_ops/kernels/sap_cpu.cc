// CPU driver: picks the instruction-set level, and runs the portable scalar level (the reference
// path on CPUs without AVX2): the three phases of sap_phases.h, scheduled on ONNX Runtime's intra-op
// pool by run_phases (sap_kernels.h). The SIMD levels live in sap_cpu_simd.h.
#include <cstdlib>
#include <cstring>
#include <vector>

#include "sap_kernels.h"

#if defined(ONNX_SAP_WITH_X86_SIMD)
#include <cpuid.h>
#endif

namespace onnx_sap {
namespace {

template <typename T>
struct CpuCall {
  const Layout* layout;
  const T* x;
  T* y;
  double* scratch;
  const StreamKey* key;

  static void partial(void* self, size_t t) {
    auto* c = static_cast<CpuCall*>(self);
    partial_sum_task(*c->layout, c->x, c->scratch, *c->key, static_cast<int64_t>(t));
  }
  static void apply(void* self, size_t t) {
    auto* c = static_cast<CpuCall*>(self);
    apply_task(*c->layout, c->x, c->y, c->scratch, *c->key, static_cast<int64_t>(t));
  }
};

template <typename T>
void run_scalar(const T* x, T* y, const Layout& layout, const StreamKey& key, double* scratch, const Pool& pool) {
  CpuCall<T> call{&layout, x, y, scratch, &key};
  run_phases(call, pool);
}

constexpr const char* kIsaNames[kIsaLevels] = {"scalar", "avx2", "avx512"};

#if defined(ONNX_SAP_WITH_X86_SIMD)
// cpuid and xgetbv directly rather than __builtin_cpu_supports: the latter needs the runtime's CPU
// model (libgcc's or compiler-rt's), which zig's toolchain (the release wheel's) leaves empty, and
// xgetbv also says whether the OS saves the ymm/zmm registers.
struct X86Levels {
  bool v3 = false;  // AVX2, FMA, F16C, BMI2, with ymm state enabled
  bool v4 = false;  // v3 + AVX-512 F/DQ/BW/VL, with zmm state enabled
};

X86Levels detect_x86() {
  X86Levels l;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return l;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!osxsave || !avx || __get_cpuid_max(0, nullptr) < 7) return l;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_state = (xcr0_lo & 0x6u) == 0x6u, zmm_state = (xcr0_lo & 0xE6u) == 0xE6u;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), bmi2 = b & (1u << 8), avx512f = b & (1u << 16), avx512dq = b & (1u << 17),
             avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  l.v3 = ymm_state && fma && f16c && avx2 && bmi2;
  l.v4 = l.v3 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl;
  return l;
}
#endif

bool cpu_has(Isa isa) {
#if defined(ONNX_SAP_WITH_X86_SIMD)
  static const X86Levels levels = detect_x86();
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return levels.v3;
    case Isa::kAvx512: return levels.v4;
  }
  return false;
#else
  return isa == Isa::kScalar;  // no SIMD levels in this build (not x86-64)
#endif
}

}  // namespace

const char* isa_name(Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

bool isa_available(Isa isa) { return cpu_has(isa); }

const char* choose_isa(Isa* isa) {
  const char* forced = std::getenv("ONNX_SAP_ISA");
  if (forced == nullptr || *forced == '\0') {
    *isa = isa_available(Isa::kAvx512) ? Isa::kAvx512 : isa_available(Isa::kAvx2) ? Isa::kAvx2 : Isa::kScalar;
    return nullptr;
  }
  for (int i = 0; i < kIsaLevels; ++i) {
    if (std::strcmp(forced, kIsaNames[i]) != 0) continue;
    if (!isa_available(static_cast<Isa>(i))) {
      return i == static_cast<int>(Isa::kAvx512)
                 ? "ONNX_SAP_ISA=avx512, but this CPU (or build) lacks AVX-512 F/DQ/BW/VL; set it to avx2 or "
                   "scalar, or unset it"
                 : "ONNX_SAP_ISA=avx2, but this CPU (or build) lacks AVX2/FMA/F16C/BMI2; set it to scalar, or "
                   "unset it";
    }
    *isa = static_cast<Isa>(i);
    return nullptr;
  }
  return "ONNX_SAP_ISA must be scalar, avx2 or avx512 (or unset: the best level this CPU has)";
}

void run_cpu(Isa isa, DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key,
             const Pool& pool) {
  // Scratch is a few doubles per chunk, not per element.
  std::vector<double> scratch(static_cast<size_t>(layout.scratch_doubles()), 0.0);
#if defined(ONNX_SAP_WITH_X86_SIMD)
  if (isa == Isa::kAvx512) return run_cpu_avx512(dtype, x, y, layout, key, scratch.data(), pool);
  if (isa == Isa::kAvx2) return run_cpu_avx2(dtype, x, y, layout, key, scratch.data(), pool);
#else
  (void)isa;
#endif
  switch (dtype) {
    case DType::kFloat32:
      run_scalar(static_cast<const float*>(x), static_cast<float*>(y), layout, key, scratch.data(), pool);
      break;
    case DType::kFloat64:
      run_scalar(static_cast<const double*>(x), static_cast<double*>(y), layout, key, scratch.data(), pool);
      break;
    case DType::kFloat16:
      run_scalar(static_cast<const Half*>(x), static_cast<Half*>(y), layout, key, scratch.data(), pool);
      break;
  }
}

}  // namespace onnx_sap
