// Entry points of the two drivers, called by the ONNX Runtime glue (sap_op.cc) and, for CUDA, by the
// C test entry point. Kept free of ONNX Runtime and CUDA headers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sap_phases.h"

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

// CPU instruction-set levels, chosen at run time (sap_cpu.cc): the portable scalar code (the
// reference path), and the SIMD paths of sap_cpu_simd.h built for AVX2 and for AVX-512.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kIsaLevels = 3;

const char* isa_name(Isa isa);
// Whether this build holds the level and this CPU can run it.
bool isa_available(Isa isa);
// The level a kernel uses: ONNX_SAP_ISA when set, else the best available one. Returns nullptr and
// sets *isa, or returns a one-line error (unknown name, or a level this CPU or build lacks).
const char* choose_isa(Isa* isa);

void run_cpu(Isa isa, DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key,
             ParallelForFn pfor, void* runner);

// The SIMD levels, one translation unit each (sap_cpu_avx2.cc, sap_cpu_avx512.cc), compiled for
// their instruction set: call only when isa_available() says so. scratch holds
// layout.scratch_doubles() zeros.
void run_cpu_avx2(DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key,
                  double* scratch, ParallelForFn pfor, void* runner);
void run_cpu_avx512(DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key,
                    double* scratch, ParallelForFn pfor, void* runner);

#ifdef ONNX_SAP_WITH_CUDA
// Enqueues the whole computation on `stream` (a cudaStream_t), its scratch (layout.scratch_doubles()
// doubles) allocated and freed in stream order. Returns a CUDA error code (0 = success), which
// cuda_error_string describes.
int run_cuda(DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key, void* stream);
const char* cuda_error_string(int code);
#endif

}  // namespace onnx_sap
