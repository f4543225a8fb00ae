// CPU driver: the three phases of sap_math.h, each a parallel-for over ONNX Runtime's intra-op pool.
#include <vector>

#include "sap_kernels.h"

// The hot loops are written to vectorize; x86-64 builds get an AVX2+FMA clone picked at load time,
// since the baseline (SSE2) cannot vectorize the 64-bit integer and select operations they use.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define SAP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SAP_CPU_CLONES
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

  SAP_CPU_CLONES static void partial(void* self, size_t t) {
    auto* c = static_cast<CpuCall*>(self);
    partial_sum_task(*c->layout, c->x, c->scratch, *c->key, static_cast<int64_t>(t));
  }
  static void prefix(void* self, size_t n) {
    auto* c = static_cast<CpuCall*>(self);
    prefix_task(*c->layout, c->scratch, static_cast<int64_t>(n));
  }
  SAP_CPU_CLONES static void apply(void* self, size_t t) {
    auto* c = static_cast<CpuCall*>(self);
    apply_task(*c->layout, c->x, c->y, c->scratch, *c->key, static_cast<int64_t>(t));
  }
};

template <typename T>
void run_typed(const T* x, T* y, const Layout& layout, const StreamKey& key, ParallelForFn pfor, void* runner) {
  // Scratch is a few doubles per chunk, not per element.
  std::vector<double> scratch(static_cast<size_t>(layout.scratch_doubles()), 0.0);
  CpuCall<T> call{&layout, x, y, scratch.data(), &key};
  pfor(runner, &CpuCall<T>::partial, static_cast<size_t>(layout.partial_tasks()), &call);
  pfor(runner, &CpuCall<T>::prefix, static_cast<size_t>(layout.examples), &call);
  pfor(runner, &CpuCall<T>::apply, static_cast<size_t>(layout.apply_tasks()), &call);
}

}  // namespace

void run_cpu(DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key, ParallelForFn pfor,
             void* runner) {
  switch (dtype) {
    case DType::kFloat32:
      run_typed(static_cast<const float*>(x), static_cast<float*>(y), layout, key, pfor, runner);
      break;
    case DType::kFloat64:
      run_typed(static_cast<const double*>(x), static_cast<double*>(y), layout, key, pfor, runner);
      break;
    case DType::kFloat16:
      run_typed(static_cast<const Half*>(x), static_cast<Half*>(y), layout, key, pfor, runner);
      break;
  }
}

}  // namespace onnx_sap
