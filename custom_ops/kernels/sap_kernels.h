// Entry points of the two drivers, called by the ONNX Runtime glue (sap_op.cc) and, for CUDA, by the
// C test entry point. Kept free of ONNX Runtime and CUDA headers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sap_math.h"

namespace onnx_sap {

enum class DType : int { kFloat32 = 1, kFloat16 = 10, kFloat64 = 11 };  // ONNX TensorProto codes

// Elements per chunk: large on the CPU (a chunk is one thread-pool task), small on the GPU (a chunk
// is one thread's serial walk). Variate chunks are small on both: locating a chunk's first sample
// walks up to one variate chunk.
constexpr int64_t kCpuChunk = 16384;
constexpr int64_t kCpuVarChunk = 1024;
constexpr int64_t kCudaChunk = 256;
constexpr int64_t kCudaVarChunk = 256;

// Runs fn(ctx, i) for i in [0, total), in parallel where the caller can.
using ParallelForFn = void (*)(void* runner, void (*fn)(void*, size_t), size_t total, void* ctx);

void run_cpu(DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key, ParallelForFn pfor,
             void* runner);

#ifdef ONNX_SAP_WITH_CUDA
// Enqueues the whole computation on `stream` (a cudaStream_t), its scratch (layout.scratch_doubles()
// doubles) allocated and freed in stream order. Returns a CUDA error code (0 = success), which
// cuda_error_string describes.
int run_cuda(DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key, void* stream);
const char* cuda_error_string(int code);
#endif

}  // namespace onnx_sap
