// CUDA driver: the three phases of sap_math.h as three kernels on the caller's stream, with their
// scratch allocated and freed on that stream too (stream-ordered), so that the scratch lives exactly
// until the stream has consumed it, whatever other streams or Run() calls do meanwhile.
#include <cuda_runtime.h>

#include <cstring>
#include <string>

#include "sap_kernels.h"

namespace onnx_sap {
namespace {

constexpr int kThreads = 128;

unsigned blocks_for(int64_t tasks) { return static_cast<unsigned>((tasks + kThreads - 1) / kThreads); }

template <typename T>
__global__ void partial_kernel(Layout l, const T* x, double* scratch, StreamKey key) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < l.partial_tasks()) partial_sum_task(l, x, scratch, key, t);
}

__global__ void prefix_kernel(Layout l, double* scratch) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n < l.examples) prefix_task(l, scratch, n);
}

template <typename T>
__global__ void apply_kernel(Layout l, const T* x, T* y, const double* scratch, StreamKey key) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < l.apply_tasks()) apply_task(l, x, y, scratch, key, t);
}

template <typename T>
void launch(const T* x, T* y, const Layout& l, const StreamKey& key, double* scratch, cudaStream_t stream) {
  partial_kernel<T><<<blocks_for(l.partial_tasks()), kThreads, 0, stream>>>(l, x, scratch, key);
  prefix_kernel<<<blocks_for(l.examples), kThreads, 0, stream>>>(l, scratch);
  apply_kernel<T><<<blocks_for(l.apply_tasks()), kThreads, 0, stream>>>(l, x, y, scratch, key);
}

// Whether the current device has stream-ordered allocation (cudaMallocAsync); nearly all do.
bool has_memory_pools() {
  int device = 0, supported = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess) return false;
  return supported != 0;
}

}  // namespace

int run_cuda(DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key, void* stream_ptr) {
  if (layout.apply_tasks() == 0) return 0;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const size_t bytes = sizeof(double) * static_cast<size_t>(layout.scratch_doubles());
  const bool pools = has_memory_pools();
  double* scratch = nullptr;
  cudaError_t err = pools ? cudaMallocAsync(reinterpret_cast<void**>(&scratch), bytes, stream)
                          : cudaMalloc(reinterpret_cast<void**>(&scratch), bytes);
  if (err != cudaSuccess) return static_cast<int>(err);
  switch (dtype) {
    case DType::kFloat32:
      launch(static_cast<const float*>(x), static_cast<float*>(y), layout, key, scratch, stream);
      break;
    case DType::kFloat64:
      launch(static_cast<const double*>(x), static_cast<double*>(y), layout, key, scratch, stream);
      break;
    case DType::kFloat16:
      launch(static_cast<const Half*>(x), static_cast<Half*>(y), layout, key, scratch, stream);
      break;
  }
  err = cudaGetLastError();
  // Freed behind the kernels on the same stream; without pools, only once the stream is done.
  const cudaError_t free_err = pools ? cudaFreeAsync(scratch, stream)
                                     : (cudaStreamSynchronize(stream), cudaFree(scratch));
  return static_cast<int>(err != cudaSuccess ? err : free_err);
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace onnx_sap

namespace {
thread_local std::string g_last_error;

int fail(const char* what, cudaError_t err) {
  g_last_error = std::string(what) + ": " + cudaGetErrorString(err);
  return static_cast<int>(err);
}
}  // namespace

// C entry points for testing the CUDA kernel without onnxruntime-gpu: host arrays in, host arrays out.
extern "C" {

__attribute__((visibility("default"))) const char* onnx_sap_cuda_last_error(void) { return g_last_error.c_str(); }

__attribute__((visibility("default"))) int onnx_sap_cuda_device_count(void) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
  return count;
}

// Runs the operator on the first GPU. dtype is an ONNX TensorProto code (1, 10, 11); mode 0 is
// multinomial, 1 bernoulli; r comes from ratio and samples as in the op; key is the 64-bit Philox key (k0 low, k1 high). Returns 0 on success,
// else a CUDA error code with onnx_sap_cuda_last_error() describing it.
__attribute__((visibility("default"))) int onnx_sap_cuda_run(const void* x_host, void* y_host, int dtype,
                                                             int64_t examples, int64_t m, int mode, double ratio,
                                                             int64_t samples,
                                                             uint64_t key64, uint32_t call) {
  using namespace onnx_sap;
  const size_t elem = dtype == 10 ? 2 : dtype == 11 ? 8 : 4;
  if (dtype != 1 && dtype != 10 && dtype != 11) return fail("unsupported dtype", cudaErrorInvalidValue);
  const uint64_t r = sample_count(ratio, samples, m);
  Layout layout;
  if (examples < 0 || m < 0 || (m > 0 && examples > INT64_MAX / m) || static_cast<uint64_t>(examples * m) > SIZE_MAX / elem ||
      !make_layout(examples, m, r, mode == 1 ? Mode::kBernoulli : Mode::kMultinomial, kCudaChunk, kCudaVarChunk,
                   layout)) {
    return fail("sizes out of range", cudaErrorInvalidValue);
  }
  const size_t bytes = static_cast<size_t>(examples * m) * elem;
  const StreamKey key{static_cast<uint32_t>(key64), static_cast<uint32_t>(key64 >> 32), call};
  void *dx = nullptr, *dy = nullptr;
  cudaError_t err;
  int rc = 0;
  if ((err = cudaMalloc(&dx, bytes ? bytes : 1)) != cudaSuccess) return fail("cudaMalloc", err);
  if ((err = cudaMalloc(&dy, bytes ? bytes : 1)) != cudaSuccess) { cudaFree(dx); return fail("cudaMalloc", err); }
  if ((err = cudaMemcpy(dx, x_host, bytes, cudaMemcpyHostToDevice)) != cudaSuccess) {
    rc = fail("cudaMemcpy to device", err);
  } else if ((rc = run_cuda(static_cast<DType>(dtype), dx, dy, layout, key, nullptr)) != 0) {
    rc = fail("kernel launch", static_cast<cudaError_t>(rc));
  } else if ((err = cudaMemcpy(y_host, dy, bytes, cudaMemcpyDeviceToHost)) != cudaSuccess) {
    rc = fail("kernel or copy back", err);
  }
  cudaFree(dx);
  cudaFree(dy);
  return rc;
}

}  // extern "C"
