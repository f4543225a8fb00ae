// Entry points of the two drivers, called by the ONNX Runtime glue (sap_op.cc) and, for CUDA, by the
// C test entry point. Kept free of ONNX Runtime and CUDA headers.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <thread>

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

// Where a CPU call's tasks run: pfor(runner, ...) hands them to a pool. per_phase: a call of few
// examples hands over each phase by itself instead of all at once (PhaseRun, below), so that
// benchmarks/phase_profile.cc can time each phase; the results are the same.
struct Pool {
  ParallelForFn pfor;
  void* runner;
  bool per_phase = false;
};

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
             const Pool& pool);

// Batches of at least this many examples run one task per example (below).
constexpr int64_t kCpuExampleTasksMin = 8;

// Elements per chunk for a CPU call: kCpuChunk, or a quarter of it for calls of few examples and
// fewer than 8 chunks' elements in all. There the chunks are the only parallelism, and smaller ones
// even out the threads' shares. The chunking moves S by rounding only (SPEC.md: within 2 ulps
// whatever the chunking).
constexpr int64_t cpu_chunk(int64_t examples, int64_t m) {
  return examples < kCpuExampleTasksMin && m < 8 * kCpuChunk / (examples > 0 ? examples : 1) ? kCpuChunk / 4
                                                                                             : kCpuChunk;
}

// The CPU schedule of sap_phases.h's three phases, shared by the scalar level (sap_cpu.cc) and the
// SIMD levels (sap_cpu_simd.h). Call has members `layout` and `scratch` and static partial(self, t)
// and apply(self, t), the phase tasks. Every parallel-for is a hand-off to ONNX Runtime's pool
// (workers woken, then joined), and inside a model the activation was just written by the previous
// node, so:
// - with many examples, one task per example: its partial sums, prefix and apply back to back, the
//   second read of the example coming from the cache, in one parallel-for;
// - with few, the chunk tasks of each phase in parallel (the only parallelism there is), also in one
//   parallel-for (PhaseRun), whose last phase-1 task runs the prefix, a few additions per example.
// Every path runs the same tasks on the same chunks, so the results are bit for bit the same.
template <typename Call>
void example_task(void* self, size_t n) {
  auto* c = static_cast<Call*>(self);
  const Layout& l = *c->layout;
  const int64_t e = static_cast<int64_t>(n);
  for (int64_t ch = 0; ch < l.elem_chunks; ++ch) Call::partial(self, static_cast<size_t>(e * l.elem_chunks + ch));
  const int64_t var_base = l.examples * l.elem_chunks + e * l.var_chunks;
  for (int64_t d = 0; d < l.var_chunks; ++d) Call::partial(self, static_cast<size_t>(var_base + d));
  prefix_task(l, c->scratch, e);
  for (int64_t ch = 0; ch < l.elem_chunks; ++ch) Call::apply(self, static_cast<size_t>(e * l.elem_chunks + ch));
}

// The phases of a call of few examples in one parallel-for: every invocation claims phase-1 tasks
// while there are any, waits until all of them are done (the invocation that finishes the last one
// runs the prefix), then claims apply tasks. Each hand-off wakes pool threads, which on a small
// call costs as much as the work, so one hand-off instead of two. An invocation waits only for
// tasks that running invocations have claimed, never for one the pool has yet to start, so it
// cannot deadlock, whatever the pool's size or order (with one thread, the first invocation does
// everything and the others find nothing left).
template <typename Call>
struct PhaseRun {
  Call* call;
  size_t partial_total;  // > 0
  size_t apply_total;
  std::atomic<size_t> next_partial{0}, done_partial{0}, next_apply{0};
  std::atomic<bool> prefix_done{false};

  static void invocation(void* self, size_t) {
    auto* p = static_cast<PhaseRun*>(self);
    Call* c = p->call;
    for (size_t t; (t = p->next_partial.fetch_add(1, std::memory_order_relaxed)) < p->partial_total;) {
      Call::partial(c, t);
      if (p->done_partial.fetch_add(1, std::memory_order_acq_rel) + 1 == p->partial_total) {
        for (int64_t n = 0; n < c->layout->examples; ++n) prefix_task(*c->layout, c->scratch, n);
        p->prefix_done.store(true, std::memory_order_release);
      }
    }
    // The wait is at most one task of another thread: spin briefly, then give the core away.
    for (int spins = 0; !p->prefix_done.load(std::memory_order_acquire);) {
      if (spins < 64) {
        ++spins;
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
    for (size_t t; (t = p->next_apply.fetch_add(1, std::memory_order_relaxed)) < p->apply_total;) Call::apply(c, t);
  }
};

// Runs a call's tasks on `pool`. `example` runs one example's task: example_task, or a Call's own
// wrapper around it (the SIMD levels give each such task its own variate store).
template <typename Call>
void run_phases(Call& call, const Pool& pool, void (*example)(void*, size_t) = &example_task<Call>) {
  const Layout& l = *call.layout;
  if (l.examples >= kCpuExampleTasksMin) {
    pool.pfor(pool.runner, example, static_cast<size_t>(l.examples), &call);
    return;
  }
  if (l.partial_tasks() == 0) return;  // no elements
  if (pool.per_phase) {
    pool.pfor(pool.runner, &Call::partial, static_cast<size_t>(l.partial_tasks()), &call);
    for (int64_t n = 0; n < l.examples; ++n) prefix_task(l, call.scratch, n);
    pool.pfor(pool.runner, &Call::apply, static_cast<size_t>(l.apply_tasks()), &call);
    return;
  }
  PhaseRun<Call> run{&call, static_cast<size_t>(l.partial_tasks()), static_cast<size_t>(l.apply_tasks())};
  // As many invocations as the larger phase has tasks; the pool runs no more at once than it has
  // threads, and an invocation that finds nothing left returns at once.
  const size_t invocations = run.partial_total > run.apply_total ? run.partial_total : run.apply_total;
  pool.pfor(pool.runner, &PhaseRun<Call>::invocation, invocations, &run);
}

// The SIMD levels, one translation unit each (sap_cpu_avx2.cc, sap_cpu_avx512.cc), compiled for
// their instruction set: call only when isa_available() says so. scratch holds
// layout.scratch_doubles() zeros.
void run_cpu_avx2(DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key,
                  double* scratch, const Pool& pool);
void run_cpu_avx512(DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key,
                    double* scratch, const Pool& pool);

#ifdef ONNX_SAP_WITH_CUDA
// Enqueues the whole computation on `stream` (a cudaStream_t), its scratch (layout.scratch_doubles()
// doubles) allocated and freed in stream order. Returns a CUDA error code (0 = success), which
// cuda_error_string describes.
int run_cuda(DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key, void* stream);
const char* cuda_error_string(int code);
#endif

}  // namespace onnx_sap
