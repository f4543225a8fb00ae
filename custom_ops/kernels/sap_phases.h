// How one call of the operator is cut into tasks, shared by the two drivers (sap_cpu.cc,
// sap_cuda.cu): the chunk layout and the three phase tasks built on sap_math.h's per-chunk math.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sap_math.h"

namespace onnx_sap {

// ---------------------------------------------------------------------------------------------
// How one call is cut into tasks. Both drivers run the same three phases:
//   1. partial sums: |x| per element chunk, E per variate chunk (all independent tasks);
//   2. prefix: per example, turn the partial sums into running sums (S, C before each chunk,
//      G before each variate chunk, G_r);
//   3. apply: per element chunk, decide and write y.
struct Layout {
  int64_t examples;       // N
  int64_t m;              // activations per example
  uint64_t r;             // samples per example
  Mode mode;
  int64_t chunk;          // elements per chunk, a multiple of kBlock
  int64_t var_chunk;      // variates per chunk, a multiple of kBlock
  int64_t elem_chunks;    // ceil(m / chunk)
  int64_t var_chunks;     // ceil((r + 1) / var_chunk) in multinomial mode, else 0
  int64_t scratch_size;   // see scratch_doubles(); computed once, overflow-checked, by make_layout

  SAP_HD int64_t c_stride() const { return elem_chunks + 1; }
  SAP_HD int64_t g_stride() const { return var_chunks + 1; }
  // Scratch, in doubles: c_before[N][elem_chunks + 1] then g_before[N][var_chunks + 1]. Every
  // index and task count below is at most this, so it alone needs the overflow check.
  SAP_HD int64_t scratch_doubles() const { return scratch_size; }
  SAP_HD int64_t partial_tasks() const { return examples * (elem_chunks + var_chunks); }
  SAP_HD int64_t apply_tasks() const { return examples * elem_chunks; }
  // Element chunk c of an example: elements [chunk_begin(c), chunk_end(c)).
  SAP_HD int64_t chunk_begin(int64_t c) const { return c * chunk; }
  SAP_HD int64_t chunk_end(int64_t c) const { return c * chunk + chunk < m ? c * chunk + chunk : m; }
};

// Fills `l` for N examples of m elements and r samples. Returns false when a size would not fit in
// int64 (or its byte count in size_t): the caller reports that r or the input is too large. r above
// kMaxSamples is refused here too, whatever the caller checked before.
inline bool make_layout(int64_t examples, int64_t m, uint64_t r, Mode mode, int64_t chunk, int64_t var_chunk,
                        Layout& l) {
  constexpr int64_t kMax = INT64_MAX;
  l = Layout{examples, m, r, mode, chunk, var_chunk, 0, 0, 0};
  if (examples < 0 || m < 0 || chunk <= 0 || var_chunk <= 0 || r > static_cast<uint64_t>(kMaxSamples)) return false;
  l.elem_chunks = m / chunk + (m % chunk != 0 ? 1 : 0);
  if (mode == Mode::kMultinomial) l.var_chunks = static_cast<int64_t>(r) / var_chunk + 1;  // ceil((r + 1) / var_chunk)
  const int64_t per_example = (l.elem_chunks + 1) + (l.var_chunks + 1);  // no overflow: both terms < 2^62
  if (examples != 0 && per_example > kMax / examples) return false;
  l.scratch_size = examples * per_example;
  return static_cast<uint64_t>(l.scratch_size) <= SIZE_MAX / sizeof(double);
}

// Phase 1, task t: one partial sum, stored at index chunk + 1 of its table so that phase 2 can
// prefix-sum in place.
// V: the multinomial variate generator (sap_math.h's Float64Variates unless a driver picks another;
// `variates` is passed for generators that keep state, such as where to keep the variates).
template <typename T, typename V = Float64Variates>
SAP_HD void partial_sum_task(const Layout& l, const T* x, double* scratch, const StreamKey& key, int64_t t,
                             const V& variates = V{}) {
  double* c_before = scratch;
  double* g_before = scratch + l.examples * l.c_stride();
  const int64_t elem_tasks = l.examples * l.elem_chunks;
  if (t < elem_tasks) {
    const int64_t n = t / l.elem_chunks, c = t % l.elem_chunks;
    const int64_t begin = l.chunk_begin(c), end = l.chunk_end(c);
    c_before[n * l.c_stride() + c + 1] = abs_sum(x + n * l.m, begin, end);
  } else {
    const int64_t u = t - elem_tasks;
    const int64_t n = u / l.var_chunks, d = u % l.var_chunks;
    const uint64_t begin = static_cast<uint64_t>(d * l.var_chunk);
    const uint64_t end = begin + l.var_chunk < l.r + 1 ? begin + l.var_chunk : l.r + 1;
    g_before[n * l.g_stride() + d + 1] = variates.sum(key, begin, end, static_cast<uint32_t>(n));
  }
}

// Phase 2, example n.
SAP_HD void prefix_task(const Layout& l, double* scratch, int64_t n) {
  double* c = scratch + n * l.c_stride();
  c[0] = 0;
  double comp = 0;  // compensated, like abs_sum, so S stays within about an ulp
  for (int64_t i = 1; i <= l.elem_chunks; ++i) {
    double hi, e;
    two_sum(c[i - 1], c[i], hi, e);
    comp += e;
    c[i] = hi + comp;
    comp -= c[i] - hi;
  }
  double* g = scratch + l.examples * l.c_stride() + n * l.g_stride();
  g[0] = 0;
  for (int64_t i = 1; i <= l.var_chunks; ++i) g[i] += g[i - 1];
}

// Phase 3, task t: element chunk t % elem_chunks of example t / elem_chunks.
template <typename T, typename V = Float64Variates>
SAP_HD void apply_task(const Layout& l, const T* x, T* y, const double* scratch, const StreamKey& key, int64_t t) {
  const int64_t n = t / l.elem_chunks, c = t % l.elem_chunks;
  const int64_t begin = l.chunk_begin(c), end = l.chunk_end(c);
  const T* xn = x + n * l.m;
  T* yn = y + n * l.m;
  const double* c_before = scratch + n * l.c_stride();
  const double sum = c_before[l.elem_chunks];
  if (!sum_is_usable(sum)) {
    copy_range(xn, yn, begin, end);
    return;
  }
  const double r = static_cast<double>(l.r);
  const uint32_t n32 = static_cast<uint32_t>(n);
  if (l.mode == Mode::kBernoulli) {
    bernoulli_range(xn, yn, begin, end, sum, r, key, n32);
    return;
  }
  const double* g_before = scratch + l.examples * l.c_stride() + n * l.g_stride();
  const double g_total = g_before[l.var_chunks];
  SampleCursor<V> cur{g_before, l.var_chunk, 1.0 / g_total, sum, 0, 0, 0.0, {}};
  const uint64_t k_begin = first_sample_at_or_after(cur, key, n32, l.r, l.var_chunks, c_before[c]);
  const uint64_t k_end =
      c + 1 < l.elem_chunks ? first_sample_at_or_after(cur, key, n32, l.r, l.var_chunks, c_before[c + 1]) : l.r;
  multinomial_range(xn, yn, begin, end, c_before[c], k_begin, k_end, cur, key, n32, sum, r);
}

}  // namespace onnx_sap
