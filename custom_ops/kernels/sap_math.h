// The SAP operator's math, written once for the CPU kernel and the CUDA kernel (SPEC.md).
//
// Everything here is a pure function of its arguments so that host and device code compute the same
// decisions. The kernels split each example into chunks of `chunk` elements and the multinomial
// sample stream into chunks of `chunk` variates; each function below works on one chunk, and the
// drivers (sap_cpu.cc, sap_cuda.cu) only decide which chunks run where.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SAP_HD __host__ __device__ __forceinline__
#else
#define SAP_HD inline
#endif

namespace onnx_sap {

enum class Mode : int { kMultinomial = 0, kBernoulli = 1 };

// ---------------------------------------------------------------------------------------------
// Random stream: splitmix64 key derivation and Philox4x32-10.

SAP_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// K = splitmix64(seed XOR splitmix64(stream)); k0 = low 32 bits, k1 = high 32 bits.
SAP_HD uint64_t derive_key(uint64_t seed, uint64_t stream) { return splitmix64(seed ^ splitmix64(stream)); }

struct Philox4 {
  uint32_t v[4];
};

SAP_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The per-call stream parameters shared by every position of one node's call.
struct StreamKey {
  uint32_t k0, k1;  // Philox key
  uint32_t call;    // c, the node's call index modulo 2^32
};

SAP_HD double word_to_uniform(uint32_t w) { return (static_cast<double>(w) + 0.5) * (1.0 / 4294967296.0); }

// Writes the 4 uniforms of the Philox block holding positions 4*block .. 4*block+3 of example n.
SAP_HD void uniform_block(const StreamKey& key, uint64_t block, uint32_t n, double u[4]) {
  const Philox4 w = philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), n, key.call,
                                  key.k0, key.k1);
  for (int t = 0; t < 4; ++t) u[t] = word_to_uniform(w.v[t]);
}

// ---------------------------------------------------------------------------------------------
// float16 as raw bits, so that host and device share one conversion and nothing depends on a
// vendor half type.

SAP_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3FFu) << 13);
    }
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, with overflow to Inf and gradual underflow.
SAP_HD uint16_t double_to_half_bits(double d) {
  float f = static_cast<float>(d);
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t absx = x & 0x7FFFFFFFu;
  if (absx >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (absx > 0x7F800000u ? 0x200u : 0u));
  // Round from double directly so that the float step does not double-round.
  const double a = fabs(d);
  if (a >= 65520.0) return static_cast<uint16_t>(sign | 0x7C00u);
  if (a < 6.103515625e-05) {  // subnormal half: multiples of 2^-24
    const double scaled = a * 16777216.0;
    double q = floor(scaled);
    const double rem = scaled - q;
    if (rem > 0.5 || (rem == 0.5 && fmod(q, 2.0) != 0.0)) q += 1.0;
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(q));
  }
  int e = static_cast<int>(floor(log2(a)));
  double p = ldexp(1.0, e);
  if (p > a) { --e; p *= 0.5; }           // guard log2 rounding
  else if (2.0 * p <= a) { ++e; p *= 2.0; }
  const double scaled = a / p * 1024.0;   // in [1024, 2048)
  double q = floor(scaled);
  const double rem = scaled - q;
  if (rem > 0.5 || (rem == 0.5 && fmod(q, 2.0) != 0.0)) q += 1.0;
  if (q >= 2048.0) { q *= 0.5; ++e; }
  if (e > 15) return static_cast<uint16_t>(sign | 0x7C00u);
  return static_cast<uint16_t>(sign | static_cast<uint16_t>((e + 15) << 10) | (static_cast<uint16_t>(q) - 1024u));
}

struct Half {
  uint16_t bits;
};

SAP_HD double load(const float* p, int64_t i) { return static_cast<double>(p[i]); }
SAP_HD double load(const double* p, int64_t i) { return p[i]; }
SAP_HD double load(const Half* p, int64_t i) { return static_cast<double>(half_bits_to_float(p[i].bits)); }
SAP_HD void store(float* p, int64_t i, double v) { p[i] = static_cast<float>(v); }
SAP_HD void store(double* p, int64_t i, double v) { p[i] = v; }
SAP_HD void store(Half* p, int64_t i, double v) { p[i].bits = double_to_half_bits(v); }

// ---------------------------------------------------------------------------------------------
// Per-chunk math.

// q = 1 - (1 - p)^r, in float64 as SPEC.md writes it.
SAP_HD double keep_probability(double p, double r) { return -expm1(r * log1p(-p)); }

// Error-free addition (Knuth's TwoSum): s + err == a + b exactly.
SAP_HD void two_sum(double a, double b, double& s, double& err) {
  s = a + b;
  const double bp = s - a;
  err = (a - (s - bp)) + (b - bp);
}

// Sum of |x| over [begin, end) of one example, in float64 with compensation, so that every
// implementation lands within about an ulp of the exact S whatever its chunking (float64 outputs
// are compared to 4 ulps). Four independent lanes keep the loop pipelined.
template <typename T>
SAP_HD double abs_sum(const T* x, int64_t begin, int64_t end) {
  double s[4] = {0, 0, 0, 0}, c[4] = {0, 0, 0, 0};
  int64_t i = begin;
  for (; i + 4 <= end; i += 4) {
    for (int l = 0; l < 4; ++l) {
      double e;
      two_sum(s[l], fabs(load(x, i + l)), s[l], e);
      c[l] += e;
    }
  }
  for (; i < end; ++i) {
    double e;
    two_sum(s[0], fabs(load(x, i)), s[0], e);
    c[0] += e;
  }
  double total = 0, comp = 0;
  for (int l = 0; l < 4; ++l) {
    double e;
    two_sum(total, s[l], total, e);
    comp += e + c[l];
  }
  return total + comp;
}

// Whether a per-example sum lets SAP act: S = 0 or a non-finite S means pass-through.
SAP_HD bool sum_is_usable(double s) { return s > 0.0 && s < INFINITY; }

// Copies [begin, end) unchanged (the pass-through cases of SPEC.md).
template <typename T>
SAP_HD void copy_range(const T* x, T* y, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) y[j] = x[j];
}

// Bernoulli mode on elements [begin, end) of example n (x, y point at the example's start).
template <typename T>
SAP_HD void bernoulli_range(const T* x, T* y, int64_t begin, int64_t end, double sum, double r,
                            const StreamKey& key, uint32_t n) {
  const double inv_sum = 1.0 / sum;
  int64_t j = begin;
  while (j < end) {
    const uint64_t block = static_cast<uint64_t>(j) >> 2;
    double u[4];
    uniform_block(key, block, n, u);
    const int64_t block_end = static_cast<int64_t>(block * 4 + 4) < end ? static_cast<int64_t>(block * 4 + 4) : end;
    for (; j < block_end; ++j) {
      const double xj = load(x, j);
      const double a = fabs(xj);
      double out = 0.0;
      if (a > 0.0) {
        const double q = keep_probability(a * inv_sum, r);
        if (u[j & 3] < q) out = xj / q;
      }
      store(y, j, out);
    }
  }
}

// The multinomial sampler draws r samples from r + 1 exponential variates E_i = -log(u_i).
// G_k = E_0 + ... + E_k; sample k sits at T_k * S = (G_k / G_r) * S.

// Sum of E_i over variates [begin, end).
SAP_HD double exponential_sum(const StreamKey& key, uint64_t begin, uint64_t end, uint32_t n) {
  double s = 0;
  uint64_t i = begin;
  while (i < end) {
    const uint64_t block = i >> 2;
    double u[4];
    uniform_block(key, block, n, u);
    const uint64_t block_end = block * 4 + 4 < end ? block * 4 + 4 : end;
    for (; i < block_end; ++i) s += -log(u[i & 3]);
  }
  return s;
}

// Walks sample positions in order. G_k is always computed as (sum of the variates before k's chunk,
// from the chunk prefix table) + (running sum from the chunk's start), so every caller sees
// bit-identical positions for the same k whichever chunk of elements it serves.
struct SampleCursor {
  const double* g_before;  // g_before[d] = sum of E over variate chunks < d
  int64_t chunk;           // variates per chunk (a multiple of 4)
  uint64_t k;              // current sample index
  double g;                // G_k
  double u[4];             // uniforms of k's Philox block

  SAP_HD void seek_chunk_start(const StreamKey& key, uint32_t n, int64_t d) {
    k = static_cast<uint64_t>(d) * static_cast<uint64_t>(chunk);
    uniform_block(key, k >> 2, n, u);
    g = g_before[d] + -log(u[0]);
  }
  SAP_HD void advance(const StreamKey& key, uint32_t n) {
    ++k;
    if (k % static_cast<uint64_t>(chunk) == 0) {
      seek_chunk_start(key, n, static_cast<int64_t>(k / static_cast<uint64_t>(chunk)));
      return;
    }
    if ((k & 3) == 0) uniform_block(key, k >> 2, n, u);
    g += -log(u[k & 3]);
  }
};

// Finds the first sample k < r whose position (G_k / G_r) * S is >= bound, returning r if none.
// The variate-chunk prefix table narrows the search to one chunk, which is then walked.
SAP_HD uint64_t first_sample_at_or_after(SampleCursor cur, const StreamKey& key, uint32_t n, uint64_t r,
                                         int64_t n_var_chunks, double g_total, double sum, double bound) {
  if (bound <= 0.0) return 0;
  // Largest chunk d whose start is certainly below the bound (checked again by the walk).
  int64_t lo = 0, hi = n_var_chunks - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cur.g_before[mid] / g_total * sum < bound) lo = mid; else hi = mid - 1;
  }
  cur.seek_chunk_start(key, n, lo);
  while (cur.k < r && cur.g / g_total * sum < bound) cur.advance(key, n);
  return cur.k < r ? cur.k : r;
}

// Multinomial mode on elements [begin, end) of example n, which own the samples [k_begin, k_end).
// c_before is the sum of |x| over elements before `begin`.
template <typename T>
SAP_HD void multinomial_range(const T* x, T* y, int64_t begin, int64_t end, double c_before, uint64_t k_begin,
                              uint64_t k_end, SampleCursor cur, const StreamKey& key, uint32_t n, double g_total,
                              double sum, double r) {
  const double inv_sum = 1.0 / sum;
  if (k_begin < k_end) {
    cur.seek_chunk_start(key, n, static_cast<int64_t>(k_begin / static_cast<uint64_t>(cur.chunk)));
    while (cur.k < k_begin) cur.advance(key, n);
  } else {
    cur.k = k_end;
  }
  double c = c_before;
  int64_t last_nonzero = -1;
  for (int64_t j = begin; j < end; ++j) {
    const double xj = load(x, j);
    const double a = fabs(xj);
    c += a;
    bool hit = false;
    while (cur.k < k_end && cur.g / g_total * sum < c) {
      hit = true;
      cur.advance(key, n);
    }
    if (a > 0.0) last_nonzero = j;
    store(y, j, hit ? xj / keep_probability(a * inv_sum, r) : 0.0);
  }
  // Samples past the last boundary (rounding only) land on the last element with a_j > 0.
  if (cur.k < k_end && k_begin < k_end && last_nonzero >= 0) {
    const double xj = load(x, last_nonzero);
    store(y, last_nonzero, xj / keep_probability(fabs(xj) * inv_sum, r));
  }
}

// r = samples when samples > 0, else max(1, floor(ratio * m)).
SAP_HD uint64_t sample_count(double ratio, int64_t samples, int64_t m) {
  if (samples > 0) return static_cast<uint64_t>(samples);
  const double r = floor(ratio * static_cast<double>(m));
  return r < 1.0 ? 1u : static_cast<uint64_t>(r);
}

}  // namespace onnx_sap

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
  int64_t chunk;          // elements (and variates) per chunk, a multiple of 4
  int64_t elem_chunks;    // ceil(m / chunk)
  int64_t var_chunks;     // ceil((r + 1) / chunk) in multinomial mode, else 0

  SAP_HD int64_t c_stride() const { return elem_chunks + 1; }
  SAP_HD int64_t g_stride() const { return var_chunks + 1; }
  // Scratch, in doubles: c_before[N][elem_chunks + 1] then g_before[N][var_chunks + 1].
  SAP_HD int64_t scratch_doubles() const { return examples * (c_stride() + g_stride()); }
  SAP_HD int64_t partial_tasks() const { return examples * (elem_chunks + var_chunks); }
  SAP_HD int64_t apply_tasks() const { return examples * elem_chunks; }
};

inline Layout make_layout(int64_t examples, int64_t m, uint64_t r, Mode mode, int64_t chunk) {
  Layout l{examples, m, r, mode, chunk, 0, 0};
  l.elem_chunks = (m + chunk - 1) / chunk;
  if (mode == Mode::kMultinomial) l.var_chunks = static_cast<int64_t>((r + 1 + chunk - 1) / chunk);
  return l;
}

// Phase 1, task t: one partial sum, stored at index chunk + 1 of its table so that phase 2 can
// prefix-sum in place.
template <typename T>
SAP_HD void partial_sum_task(const Layout& l, const T* x, double* scratch, const StreamKey& key, int64_t t) {
  double* c_before = scratch;
  double* g_before = scratch + l.examples * l.c_stride();
  const int64_t elem_tasks = l.examples * l.elem_chunks;
  if (t < elem_tasks) {
    const int64_t n = t / l.elem_chunks, c = t % l.elem_chunks;
    const int64_t begin = c * l.chunk, end = begin + l.chunk < l.m ? begin + l.chunk : l.m;
    c_before[n * l.c_stride() + c + 1] = abs_sum(x + n * l.m, begin, end);
  } else {
    const int64_t u = t - elem_tasks;
    const int64_t n = u / l.var_chunks, d = u % l.var_chunks;
    const uint64_t begin = static_cast<uint64_t>(d * l.chunk);
    const uint64_t end = begin + l.chunk < l.r + 1 ? begin + l.chunk : l.r + 1;
    g_before[n * l.g_stride() + d + 1] = exponential_sum(key, begin, end, static_cast<uint32_t>(n));
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
template <typename T>
SAP_HD void apply_task(const Layout& l, const T* x, T* y, const double* scratch, const StreamKey& key, int64_t t) {
  const int64_t n = t / l.elem_chunks, c = t % l.elem_chunks;
  const int64_t begin = c * l.chunk, end = begin + l.chunk < l.m ? begin + l.chunk : l.m;
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
  SampleCursor cur{g_before, l.chunk, 0, 0.0, {0, 0, 0, 0}};
  const uint64_t k_begin = first_sample_at_or_after(cur, key, n32, l.r, l.var_chunks, g_total, sum, c_before[c]);
  const uint64_t k_end = c + 1 < l.elem_chunks
                             ? first_sample_at_or_after(cur, key, n32, l.r, l.var_chunks, g_total, sum, c_before[c + 1])
                             : l.r;
  multinomial_range(xn, yn, begin, end, c_before[c], k_begin, k_end, cur, key, n32, g_total, sum, r);
}

}  // namespace onnx_sap
