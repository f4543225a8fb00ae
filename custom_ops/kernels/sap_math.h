// The SAP operator's math, written once for the CPU kernel and the CUDA kernel (SPEC.md).
//
// Everything here is a pure function of its arguments so that host and device code compute the same
// decisions. The kernels split each example into chunks of `chunk` elements and the multinomial
// sample stream into chunks of `chunk` variates; each function below works on one chunk, and
// sap_phases.h (used by the drivers sap_cpu.cc and sap_cuda.cu) decides which chunks run where.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Always inlined: the CPU driver's AVX2 clones (sap_cpu.cc) only vectorize what is inlined into them.
#if defined(__CUDACC__)
#define SAP_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define SAP_HD inline __attribute__((always_inline))
#else
#define SAP_HD inline
#endif

namespace onnx_sap {

enum class Mode : int { kMultinomial = 0, kBernoulli = 1 };

// ---------------------------------------------------------------------------------------------
// Random stream: splitmix64 key derivation (Philox4x32-10 itself is uniform_run, below).

SAP_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// K = splitmix64(seed XOR splitmix64(stream)); k0 = low 32 bits, k1 = high 32 bits.
SAP_HD uint64_t derive_key(uint64_t seed, uint64_t stream) { return splitmix64(seed ^ splitmix64(stream)); }

// The per-call stream parameters shared by every position of one node's call.
struct StreamKey {
  uint32_t k0, k1;  // Philox key
  uint32_t call;    // c, the node's call index modulo 2^32
};

SAP_HD double word_to_uniform(uint32_t w) {
  // (w + 0.5) / 2^32, exact; w goes to double through the 2^52 trick, since unsigned 32-bit to
  // double has no vector instruction before AVX-512.
  uint64_t b = 0x4330000000000000ull | w;
  double d;
  memcpy(&d, &b, sizeof d);
  return (d - 4503599627370496.0 + 0.5) * (1.0 / 4294967296.0);
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
// Largest finite value of each element type: kept values saturate there (SPEC.md, "Saturation").
SAP_HD double max_finite(const float*) { return 3.4028234663852886e38; }
SAP_HD double max_finite(const double*) { return 1.7976931348623157e308; }
SAP_HD double max_finite(const Half*) { return 65504.0; }

// v clamped to [-max, max] of T, so that a survivor x / q never becomes Inf (nor, for float32, an
// out-of-range double-to-float conversion). Written as selects so that the loops still vectorize.
template <typename T>
SAP_HD double saturate(double v) {
  const double hi = max_finite(static_cast<const T*>(nullptr));
  const double lo = -hi;
  v = v < hi ? v : hi;
  return v > lo ? v : lo;
}

// A survivor's output x / q, saturated. q = 0 only where a = 0, which is never kept: it divides by 1
// there, so that the loops compute it for every element without a branch.
template <typename T>
SAP_HD double survivor(double x, double q) { return saturate<T>(x / (q > 0.0 ? q : 1.0)); }

SAP_HD void store(float* p, int64_t i, double v) { p[i] = static_cast<float>(v); }
SAP_HD void store(double* p, int64_t i, double v) { p[i] = v; }
SAP_HD void store(Half* p, int64_t i, double v) { p[i].bits = double_to_half_bits(v); }

// ---------------------------------------------------------------------------------------------
// Per-chunk math.

// Error-free addition (Knuth's TwoSum): s + err == a + b exactly.
SAP_HD void two_sum(double a, double b, double& s, double& err) {
  s = a + b;
  const double bp = s - a;
  err = (a - (s - bp)) + (b - bp);
}

// Sum of |x| over [begin, end) of one example, in float64 with compensation, so that every
// implementation lands within about an ulp of the exact S whatever its chunking (float64 outputs
// are compared to 4 ulps). float64 inputs get TwoSum on every element; narrower inputs, whose
// 24-bit (or 11-bit) mantissas add almost exactly in float64, get it once per 64 elements.
template <typename T>
SAP_HD double abs_sum(const T* x, int64_t begin, int64_t end) {
  const int64_t step = sizeof(T) == sizeof(double) ? 1 : 64;
  double total = 0, comp = 0;
  for (int64_t b = begin; b < end; b += step) {
    const int64_t e = b + step < end ? b + step : end;
    double s[4] = {0, 0, 0, 0};  // independent lanes keep the adds pipelined
    int64_t i = b;
    for (; i + 4 <= e; i += 4) {
      for (int l = 0; l < 4; ++l) s[l] += fabs(load(x, i + l));
    }
    for (; i < e; ++i) s[0] += fabs(load(x, i));
    double err;
    two_sum(total, (s[0] + s[1]) + (s[2] + s[3]), total, err);
    comp += err;
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


// q = 1 - (1 - p)^r, in float64 as SPEC.md writes it, with the C library's log1p and expm1.
SAP_HD double keep_probability(double p, double r) { return -expm1(r * log1p(-p)); }

// Branch-free float64 polynomials for the hot loops, written so that compilers vectorize them (the C
// library's scalar log1p/expm1/log dominate otherwise). Relative error below 1e-10: far inside
// SPEC.md's decision band (1e-5) and well under a float32 ulp (6e-8), so float32/float16 outputs
// stay within an ulp of the reference. float64 outputs use keep_probability above, since they are
// compared to 4 float64 ulps.
namespace fast {

SAP_HD uint64_t bits_of(double d) {
  uint64_t b;
  memcpy(&b, &d, sizeof b);
  return b;
}
SAP_HD double double_of(uint64_t b) {
  double d;
  memcpy(&d, &b, sizeof d);
  return d;
}

// Largest p for which the series of -log1p(-p) below is used.
constexpr double kSeriesMaxP = 1.0 / 256;

// -log1p(-p) = p + p^2/2 + ... + p^6/6 for 0 <= p <= 1/256 (truncation < 1e-15 relative).
SAP_HD double neg_log1m_series(double p) {
  double s = 1.0 / 6;
  s = s * p + 1.0 / 5; s = s * p + 1.0 / 4; s = s * p + 1.0 / 3; s = s * p + 1.0 / 2; s = s * p + 1.0;
  return s * p;
}

// exp(z) for -708 <= z <= 0: z = k ln2 + f, |f| <= ln2/2, exp(f) by its Taylor series to f^11
// (truncation < 1e-14 relative, so that 1 - exp(z) stays accurate down to |z| = 1e-2).
SAP_HD double exp_nonpositive(double z) {
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const double kd_shifted = z * 1.4426950408889634 + shifter;
  const double kd = kd_shifted - shifter;
  const double f = (z - kd * 6.93147180369123816490e-01) - kd * 1.90821492927058770002e-10;
  double e = 1.0 / 39916800.0;  // 1/11!
  e = e * f + 1.0 / 3628800.0; e = e * f + 1.0 / 362880.0; e = e * f + 1.0 / 40320.0; e = e * f + 1.0 / 5040.0; e = e * f + 1.0 / 720.0; e = e * f + 1.0 / 120.0;
  e = e * f + 1.0 / 24.0;    e = e * f + 1.0 / 6.0;    e = e * f + 0.5;         e = e * f + 1.0;
  e = e * f + 1.0;
  const int64_t k = static_cast<int64_t>(bits_of(kd_shifted) - bits_of(shifter));
  return e * double_of(static_cast<uint64_t>(k + 1023) << 52);
}

// -expm1(z) for z <= 0: 1 - exp(z), except near 0 where that cancels: there z + z^2/2 + z^3/6 +
// z^4/24 (|z| < 1e-2: truncation < 1e-10 relative).
SAP_HD double neg_expm1(double z) {
  const double zc = z < -708.0 ? -708.0 : z;
  const double near = -(zc * (1.0 + zc * (0.5 + zc * (1.0 / 6 + zc * (1.0 / 24)))));
  const double far = 1.0 - exp_nonpositive(zc);
  return zc > -1e-2 ? near : far;
}

// -log(u) for 0 < u < 1: u = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m-1)/(m+1)).
// The exponent is turned into a double with the 2^52 trick: int64 -> double conversion does not
// vectorize before AVX-512.
SAP_HD double neg_log_unit(double u) {
  const uint64_t b = bits_of(u);
  const double e_biased = double_of((b >> 52) | 0x4330000000000000ull) - 4503599627370496.0;  // e + 1023
  const double m0 = double_of((b & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
  const bool big = m0 > 1.4142135623730951;
  const double m = big ? m0 * 0.5 : m0;
  const double e = e_biased - (big ? 1022.0 : 1023.0);
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  double t = 1.0 / 13;  // atanh series to s^13: truncation < 2e-12 relative
  t = t * s2 + 1.0 / 11; t = t * s2 + 1.0 / 9;  t = t * s2 + 1.0 / 7;  t = t * s2 + 1.0 / 5;
  t = t * s2 + 1.0 / 3;  t = t * s2 + 1.0;
  return -((e * 6.93147180369123816490e-01 + 2.0 * s * t) + e * 1.90821492927058770002e-10);
}

// -log1p(-p) for 0 <= p <= 1: the series for small p (where 1 - p would round p away), else
// -log(1 - p), whose rounding error (1e-16 / p) is below 3e-14 relative there. p = 1 gives about
// 745 (log of the smallest double) rather than inf: q is 1 either way.
SAP_HD double neg_log1m(double p) {
  const double small = neg_log1m_series(p < kSeriesMaxP ? p : 0.0);
  const double one_minus = 1.0 - p;
  const double large = neg_log_unit(one_minus > 4.9e-324 ? one_minus : 4.9e-324);
  return p < kSeriesMaxP ? small : large;
}

}  // namespace fast

// Elements (and variates) handled per step of the block loops below: large on the CPU so the inner
// loops vectorize, one Philox block on the GPU where each thread is already one lane.
#if defined(__CUDA_ARCH__)
constexpr int kBlock = 4;
#else
constexpr int kBlock = 64;
#endif
// The multinomial sample search splits a run of kBlock bounds into kGroups groups of kGroup.
constexpr int kGroup = kBlock >= 64 ? 8 : 2;
constexpr int kGroups = kBlock / kGroup;

// Uniforms of kBlock consecutive stream positions starting at position 4 * first_block. Lane-major
// arrays so that the ten Philox rounds vectorize across blocks.
SAP_HD void uniform_run(const StreamKey& key, uint64_t first_block, uint32_t n, double u[kBlock]) {
  constexpr int L = kBlock / 4;
  // 32-bit words held in 64-bit lanes: the 32x32->64 products then map onto one vector multiply.
  uint64_t c0[L], c1[L], c2[L], c3[L];
  for (int l = 0; l < L; ++l) {
    const uint64_t b = first_block + static_cast<uint64_t>(l);
    c0[l] = b & 0xFFFFFFFFu;
    c1[l] = b >> 32;
    c2[l] = n;
    c3[l] = key.call;
  }
  uint64_t k0 = key.k0, k1 = key.k1;
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < L; ++l) {
      // 32 x 32 -> 64 written as such, so that x86 vectorizes it as vpmuludq (a 64 x 64 multiply has
      // no AVX2 instruction and is emulated with three).
      const uint64_t p0 = static_cast<uint64_t>(static_cast<uint32_t>(c0[l])) * 0xD2511F53u;
      const uint64_t p1 = static_cast<uint64_t>(static_cast<uint32_t>(c2[l])) * 0xCD9E8D57u;
      const uint64_t n0 = (p1 >> 32) ^ c1[l] ^ k0;
      const uint64_t n2 = (p0 >> 32) ^ c3[l] ^ k1;
      c1[l] = p1 & 0xFFFFFFFFu;
      c3[l] = p0 & 0xFFFFFFFFu;
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 = (k0 + 0x9E3779B9u) & 0xFFFFFFFFu;
    k1 = (k1 + 0xBB67AE85u) & 0xFFFFFFFFu;
  }
  for (int l = 0; l < L; ++l) {
    u[4 * l + 0] = word_to_uniform(static_cast<uint32_t>(c0[l]));
    u[4 * l + 1] = word_to_uniform(static_cast<uint32_t>(c1[l]));
    u[4 * l + 2] = word_to_uniform(static_cast<uint32_t>(c2[l]));
    u[4 * l + 3] = word_to_uniform(static_cast<uint32_t>(c3[l]));
  }
}

// q for a run of elements: the vectorized polynomials, except for float64 outputs, which take the C
// library's functions.
template <typename T>
SAP_HD void keep_probabilities(const double* a, int len, double sum, double r, double* q) {
  if (sizeof(T) == sizeof(double)) {
    for (int i = 0; i < len; ++i) q[i] = keep_probability(a[i] / sum, r);
    return;
  }
  const double inv_sum = 1.0 / sum;  // within an ulp of a / sum: enough outside float64 outputs
  double lane_max[4] = {0, 0, 0, 0};  // independent lanes: a single running max is a latency chain
  for (int i = 0; i < len; ++i) lane_max[i & 3] = a[i] > lane_max[i & 3] ? a[i] : lane_max[i & 3];
  const double p_max = fmax(fmax(lane_max[0], lane_max[1]), fmax(lane_max[2], lane_max[3])) * inv_sum;
  if (p_max < fast::kSeriesMaxP) {  // the common case in large examples: the series alone
    for (int i = 0; i < len; ++i) q[i] = fast::neg_expm1(-r * fast::neg_log1m_series(a[i] * inv_sum));
  } else {
    for (int i = 0; i < len; ++i) q[i] = fast::neg_expm1(-r * fast::neg_log1m(a[i] * inv_sum));
  }
}

// q of one element, with the same precision policy as keep_probabilities.
template <typename T>
SAP_HD double keep_probability_of(double a, double sum, double r) {
  double q;
  keep_probabilities<T>(&a, 1, sum, r, &q);
  return q;
}

// Bernoulli mode on elements [begin, end) of example n (x, y point at the example's start; begin is
// a multiple of 4, so runs start on Philox block boundaries).
template <typename T>
SAP_HD void bernoulli_range(const T* x, T* y, int64_t begin, int64_t end, double sum, double r,
                            const StreamKey& key, uint32_t n) {
  for (int64_t b = begin; b < end; b += kBlock) {
    const int len = end - b < kBlock ? static_cast<int>(end - b) : kBlock;
    double u[kBlock], xs[kBlock], a[kBlock], q[kBlock];
    uniform_run(key, static_cast<uint64_t>(b) >> 2, n, u);
    for (int i = 0; i < len; ++i) {
      xs[i] = load(x, b + i);
      a[i] = fabs(xs[i]);
    }
    keep_probabilities<T>(a, len, sum, r, q);
    for (int i = 0; i < len; ++i) {
      // q = 0 exactly where a = 0, and u > 0: such elements are never kept.
      const double scaled = survivor<T>(xs[i], q[i]);
      store(y, b + i, u[i] < q[i] ? scaled : 0.0);
    }
  }
}

// The multinomial sampler draws r samples from r + 1 exponential variates E_i = -log(u_i).
// G_k = E_0 + ... + E_k; sample k sits at T_k * S = (G_k / G_r) * S.

// E_i = -log(u_i) for kBlock variates starting at position 4 * first_block.
SAP_HD void exponential_run(const StreamKey& key, uint64_t first_block, uint32_t n, double e[kBlock]) {
  uniform_run(key, first_block, n, e);
  for (int i = 0; i < kBlock; ++i) e[i] = fast::neg_log_unit(e[i]);
}

// The variate generator of the sampler below (its template parameter V): this float64 one, or the
// CPU SIMD levels' float32 one for float32/float16 data (sap_cpu_simd.h).
struct Float64Variates {
  SAP_HD static void run(const StreamKey& key, uint64_t first_block, uint32_t n, double e[kBlock]) {
    exponential_run(key, first_block, n, e);
  }
  // Sum of E_i over variates [begin, end) (begin a multiple of 4), for the variate chunk table. Any
  // fixed order serves, since every caller reads G from that one table: this one adds in stream order.
  SAP_HD static double sum(const StreamKey& key, uint64_t begin, uint64_t end, uint32_t n) {
    double s = 0;
    for (uint64_t b = begin; b < end; b += kBlock) {
      double e[kBlock];
      run(key, b >> 2, n, e);
      const int len = end - b < static_cast<uint64_t>(kBlock) ? static_cast<int>(end - b) : kBlock;
      for (int i = 0; i < len; ++i) s += e[i];
    }
    return s;
  }
};

// Walks sample positions in order. G_k is always computed as (sum of the variates before k's chunk,
// from the chunk prefix table) + (running sum from the chunk's start), so every caller sees
// bit-identical positions for the same k whichever chunk of elements it serves.
template <typename V = Float64Variates>
struct SampleCursor {
  const double* g_before;  // g_before[d] = sum of E over variate chunks < d
  int64_t chunk;           // variates per chunk (a multiple of kBlock)
  double inv_total;        // 1 / G_r
  double sum;              // S: sample k sits at T_k * S = (G_k * inv_total) * S
  uint64_t k;              // current sample index
  uint64_t base;           // first variate of the loaded block
  double g_last;           // G of the loaded block's last variate
  double pos[kBlock];      // positions of the loaded block's variates

  SAP_HD double position() const { return pos[k - base]; }
  // T_k * S as SPEC.md writes it: T_k first, then one rounding of the product. Not G_k * (S / G_r):
  // for a subnormal S, S / G_r loses most of its digits and every position moves with it.
  SAP_HD double position_of(double g) const { return (g * inv_total) * sum; }
  // Loads the kBlock variates from b (a multiple of kBlock), given G of the variate before b.
  SAP_HD void load(const StreamKey& key, uint32_t n, uint64_t b, double g_prev) {
    base = b;
    V::run(key, b >> 2, n, pos);
    double g = g_prev;
    for (int i = 0; i < kBlock; ++i) {  // a running sum: a latency chain, kept out of the vector loops
      g += pos[i];
      pos[i] = g;
    }
    g_last = g;
    for (int i = 0; i < kBlock; ++i) pos[i] = position_of(pos[i]);
  }
  SAP_HD void seek_chunk_start(const StreamKey& key, uint32_t n, int64_t d) {
    k = static_cast<uint64_t>(d) * static_cast<uint64_t>(chunk);
    load(key, n, k, g_before[d]);
  }
  SAP_HD void advance(const StreamKey& key, uint32_t n) {
    ++k;
    if (k - base == static_cast<uint64_t>(kBlock)) {
      const uint64_t c = static_cast<uint64_t>(chunk);
      load(key, n, k, k % c == 0 ? g_before[k / c] : g_last);
    }
  }
};

// Finds the first sample k < r whose position is >= bound, returning r if none. The variate-chunk
// prefix table narrows the search to one chunk, which is then walked.
template <typename V>
SAP_HD uint64_t first_sample_at_or_after(SampleCursor<V> cur, const StreamKey& key, uint32_t n, uint64_t r,
                                         int64_t n_var_chunks, double bound) {
  if (bound <= 0.0) return 0;
  // Largest chunk d whose start is below the bound (the walk below settles the exact sample).
  int64_t lo = 0, hi = n_var_chunks - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cur.position_of(cur.g_before[mid]) < bound) lo = mid; else hi = mid - 1;
  }
  cur.seek_chunk_start(key, n, lo);
  while (cur.k < r && cur.position() < bound) cur.advance(key, n);
  return cur.k < r ? cur.k : r;
}

// Multinomial mode on elements [begin, end) of example n, which own the samples [k_begin, k_end).
// c_before is the sum of |x| over elements before `begin`. Per run of kBlock elements: the prefix
// sums C, the positions of the samples landing in the run, each sample's element (the first whose C
// exceeds its position), then q and y as in bernoulli_range.
template <typename T, typename V>
SAP_HD void multinomial_range(const T* x, T* y, int64_t begin, int64_t end, double c_before, uint64_t k_begin,
                              uint64_t k_end, SampleCursor<V> cur, const StreamKey& key, uint32_t n, double sum,
                              double r) {
  if (k_begin < k_end) {
    cur.seek_chunk_start(key, n, static_cast<int64_t>(k_begin / static_cast<uint64_t>(cur.chunk)));
    while (cur.k < k_begin) cur.advance(key, n);
  } else {
    cur.k = k_end;
  }
  double c = c_before;
  int64_t last_nonzero = -1;
  double last_x = 0.0;  // x there, read before y is written: y may be x's buffer (in place)
  for (int64_t b = begin; b < end; b += kBlock) {
    const int len = end - b < kBlock ? static_cast<int>(end - b) : kBlock;
    double xs[kBlock], a[kBlock], bound[kBlock], pos[kBlock], q[kBlock];
    int hit[kBlock];
    for (int i = 0; i < len; ++i) {
      xs[i] = load(x, b + i);
      a[i] = fabs(xs[i]);
      c += a[i];
      bound[i] = c;
      hit[i] = 0;
      if (a[i] > 0.0) last_nonzero = b + i;  // a select, not a branch on every other element
    }
    if (last_nonzero >= b) last_x = xs[last_nonzero - b];
    for (int i = len; i < kBlock; ++i) bound[i] = INFINITY;
    double tops[kGroups];
    for (int g = 0; g < kGroups; ++g) tops[g] = bound[g * kGroup + kGroup - 1];
    for (;;) {
      int np = 0;
      while (np < kBlock && cur.k < k_end && cur.position() < c) {
        pos[np++] = cur.position();
        cur.advance(key, n);
      }
      // Each sample's element in two short levels (the groups' last bounds, then one group), with
      // comparisons counted rather than branched on: no long dependency chain, nothing to
      // mispredict. Bounds past len are +inf, and every pos < c = bound[len - 1].
      for (int t = 0; t < np; ++t) {
        const double pt = pos[t];
        int group = 0;
        for (int g = 0; g < kGroups; ++g) group += tops[g] <= pt;
        int idx = group * kGroup;
        const int first = idx;
        for (int j = 0; j < kGroup; ++j) idx += bound[first + j] <= pt;
        hit[idx] = 1;
      }
      if (np < kBlock) break;
    }
    keep_probabilities<T>(a, len, sum, r, q);
    for (int j = 0; j < len; ++j) {
      const double scaled = survivor<T>(xs[j], q[j]);
      store(y, b + j, hit[j] ? scaled : 0.0);
    }
  }
  // Samples past the last boundary (rounding only) land on the last element with a_j > 0.
  if (cur.k < k_end && last_nonzero >= 0) {
    store(y, last_nonzero, saturate<T>(last_x / keep_probability_of<T>(fabs(last_x), sum, r)));
  }
}

// Largest r (SPEC.md, "Sample count"): it bounds every size that depends on r.
constexpr int64_t kMaxSamples = 2147483647;  // 2^31 - 1

// r = samples when samples > 0, else max(1, floor(ratio * m)); either way clamped to
// [1, kMaxSamples], in float64 before the conversion so that no ratio (huge, Inf or NaN) converts
// out of range.
SAP_HD uint64_t sample_count(double ratio, int64_t samples, int64_t m) {
  if (samples > 0) return static_cast<uint64_t>(samples < kMaxSamples ? samples : kMaxSamples);
  double r = floor(ratio * static_cast<double>(m));
  r = r >= 1.0 ? r : 1.0;  // NaN lands here too
  r = r <= static_cast<double>(kMaxSamples) ? r : static_cast<double>(kMaxSamples);
  return static_cast<uint64_t>(r);
}

}  // namespace onnx_sap
