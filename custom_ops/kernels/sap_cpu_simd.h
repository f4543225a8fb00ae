// The CPU's SIMD levels: one source, compiled once per instruction set by a one-line translation
// unit (sap_cpu_avx2.cc, sap_cpu_avx512.cc) whose compiler flags CMake sets; the scalar level in
// sap_cpu.cc stays the reference path. Everything here has internal linkage, so that no function
// compiled for one level can be picked by the linker for another (the shared math of sap_math.h is
// always inlined).
//
// float32 and float16 data in bernoulli mode take float32 arithmetic (SPEC.md, Equivalence):
// Philox4x32-10 over 16 blocks at a time in vector lanes, q = -expm1(r * log1p(-p)) by float32
// polynomials, one pass writing y. The error budget, in units of 2^-24 relative: a * r/S (0.5, with
// r/S held as two floats), the log1p series and the fma (0.5), expm1 (about 1; dq/q <= dz/z), x / q
// (0.5): 2.5 in all, inside SPEC.md's 4 ulps of T. Blocks the float32 path cannot serve that well (some
// p >= 1/256, where the series is not enough, or a * r/S near float32's underflow) and float64 data
// take sap_math.h's float64 code, auto-vectorized for this level.
#pragma once

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "sap_cpu_simd.h needs at least -mavx2 -mfma -mf16c"
#endif
#ifndef SAP_SIMD_ENTRY
#error "define SAP_SIMD_ENTRY to the level's entry point before including sap_cpu_simd.h"
#endif

#include <immintrin.h>

#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#include "sap_kernels.h"

namespace onnx_sap {
namespace {

SAP_HD float float_of(uint32_t b) {
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
}

// Vectors of 64-bit lanes, each holding one 32-bit word of one Philox block: the 32x32->64
// products are then one vpmuludq each (even lanes, which is all of them).
#if defined(__AVX512F__)
using VecU64 = __m512i;
constexpr int kU64Lanes = 8;
SAP_HD VecU64 set1(uint64_t v) { return _mm512_set1_epi64(static_cast<long long>(v)); }
SAP_HD VecU64 lane_index() { return _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7); }
SAP_HD VecU64 mul32(VecU64 a, VecU64 b) { return _mm512_mul_epu32(a, b); }
SAP_HD VecU64 high32(VecU64 a) { return _mm512_srli_epi64(a, 32); }
SAP_HD VecU64 xor3(VecU64 a, VecU64 b, VecU64 c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
SAP_HD VecU64 add(VecU64 a, VecU64 b) { return _mm512_add_epi64(a, b); }
SAP_HD VecU64 pack_pair(VecU64 lo, VecU64 hi) { return _mm512_or_si512(_mm512_and_si512(lo, set1(0xFFFFFFFFu)), _mm512_slli_epi64(hi, 32)); }
// Writes blocks' (c0|c1<<32, c2|c3<<32) pairs in stream order: 4 words per block.
SAP_HD void store_words(uint32_t* w, VecU64 a, VecU64 b) {
  const __m512i lo = _mm512_permutex2var_epi64(a, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), b);
  const __m512i hi = _mm512_permutex2var_epi64(a, _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15), b);
  _mm512_storeu_si512(w, lo);
  _mm512_storeu_si512(w + 16, hi);
}
#else
using VecU64 = __m256i;
constexpr int kU64Lanes = 4;
SAP_HD VecU64 set1(uint64_t v) { return _mm256_set1_epi64x(static_cast<long long>(v)); }
SAP_HD VecU64 lane_index() { return _mm256_setr_epi64x(0, 1, 2, 3); }
SAP_HD VecU64 mul32(VecU64 a, VecU64 b) { return _mm256_mul_epu32(a, b); }
SAP_HD VecU64 high32(VecU64 a) { return _mm256_srli_epi64(a, 32); }
SAP_HD VecU64 xor3(VecU64 a, VecU64 b, VecU64 c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
SAP_HD VecU64 add(VecU64 a, VecU64 b) { return _mm256_add_epi64(a, b); }
SAP_HD VecU64 pack_pair(VecU64 lo, VecU64 hi) { return _mm256_blend_epi32(lo, _mm256_slli_epi64(hi, 32), 0xAA); }
SAP_HD void store_words(uint32_t* w, VecU64 a, VecU64 b) {
  const __m256i t0 = _mm256_unpacklo_epi64(a, b), t1 = _mm256_unpackhi_epi64(a, b);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w), _mm256_permute2x128_si256(t0, t1, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 8), _mm256_permute2x128_si256(t0, t1, 0x31));
}
#endif

// The 32-bit words of kWords consecutive stream positions from position 4 * first_block: Philox4x32-10
// on kWords / 4 blocks at once (uniform_run's generator, without the conversion to float64). Only the
// low 32 bits of each lane are meaningful between rounds: vpmuludq and the final packing ignore the rest.
template <int kWords = kBlock>
SAP_HD void philox_words(const StreamKey& key, uint64_t first_block, uint32_t n, uint32_t w[kWords]) {
  constexpr int V = kWords / 4 / kU64Lanes;
  VecU64 c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    // Block counters built in registers: scalar stores read back as one vector would stall on
    // store-to-load forwarding, once per call.
    const VecU64 b = add(set1(first_block + static_cast<uint64_t>(v * kU64Lanes)), lane_index());
    c0[v] = b;  // the high half is ignored
    c1[v] = high32(b);
    c2[v] = set1(n);
    c3[v] = set1(key.call);
  }
  const VecU64 m0 = set1(0xD2511F53u), m1 = set1(0xCD9E8D57u);
  VecU64 k0 = set1(key.k0), k1 = set1(key.k1);
  const VecU64 w0 = set1(0x9E3779B9u), w1 = set1(0xBB67AE85u);
  for (int round = 0; round < 10; ++round) {
    for (int v = 0; v < V; ++v) {
      const VecU64 p0 = mul32(c0[v], m0), p1 = mul32(c2[v], m1);
      c0[v] = xor3(high32(p1), c1[v], k0);
      c2[v] = xor3(high32(p0), c3[v], k1);
      c1[v] = p1;  // low halves are the products' low words
      c3[v] = p0;
    }
    k0 = add(k0, w0);  // the carry out of bit 31 lands in the ignored high half
    k1 = add(k1, w1);
  }
  for (int v = 0; v < V; ++v) store_words(w + 4 * kU64Lanes * v, pack_pair(c0[v], c1[v]), pack_pair(c2[v], c3[v]));
}

// -expm1(-z) for z >= 0 in float32: -z = k ln2 + f with |f| <= ln2/2, expm1(f) by its Taylor series
// to f^8 (truncation below 2^-27 relative), then 1 - 2^k (1 + expm1(f)) = (1 - 2^k) - 2^k expm1(f),
// whose first term is exact, so nothing cancels for small z (k = 0 there).
SAP_HD float neg_expm1f(float z) {
  // q rounds to 1 long before 87; the cap keeps 2^k normal. A min on the bits (z >= 0), which the
  // compiler cannot turn into selects of everything computed from zc.
  uint32_t zb;
  memcpy(&zb, &z, sizeof zb);
  const float zc = float_of(zb < 0x42AE0000u ? zb : 0x42AE0000u);  // bits of 87.0f
  const float shifter = 12582912.0f;       // 1.5 * 2^23: adding it rounds to an integer
  const float kf = (zc * -1.44269504f + shifter) - shifter;
  float f = __builtin_fmaf(kf, -0.693145751953125f, -zc);  // ln2's high part: k * it is exact
  f = __builtin_fmaf(kf, -1.428606765330187e-06f, f);
  float e = 1.0f / 40320;
  e = __builtin_fmaf(e, f, 1.0f / 5040);
  e = __builtin_fmaf(e, f, 1.0f / 720);
  e = __builtin_fmaf(e, f, 1.0f / 120);
  e = __builtin_fmaf(e, f, 1.0f / 24);
  e = __builtin_fmaf(e, f, 1.0f / 6);
  e = __builtin_fmaf(e, f, 0.5f);
  const float em = __builtin_fmaf(e * f, f, f);
  const float two_k = float_of(static_cast<uint32_t>(static_cast<int32_t>(kf) + 127) << 23);
  return __builtin_fmaf(-two_k, em, 1.0f - two_k);
}

// float32 vectors for the multinomial variates: 16 lanes at AVX-512, 8 at AVX2. Arithmetic on VecF
// itself (+, -, *) is GCC's vector extension; the rest are these few wrappers.
#if defined(__AVX512F__)
using VecF = __m512;
using VecI = __m512i;
constexpr int kF32Lanes = 16;
SAP_HD VecF set1f(float v) { return _mm512_set1_ps(v); }
SAP_HD VecI set1i(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
SAP_HD VecF fmadd(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
SAP_HD VecF fnmsub(VecF a, VecF b, VecF c) { return _mm512_fnmsub_ps(a, b, c); }  // -(a * b) - c
SAP_HD VecI bits_of(VecF v) { return _mm512_castps_si512(v); }
SAP_HD VecF floats_of(VecI b) { return _mm512_castsi512_ps(b); }
SAP_HD VecI sub32(VecI a, VecI b) { return _mm512_sub_epi32(a, b); }
SAP_HD VecI add32(VecI a, VecI b) { return _mm512_add_epi32(a, b); }
SAP_HD VecI and32(VecI a, VecI b) { return _mm512_and_si512(a, b); }
SAP_HD VecI srai23(VecI a) { return _mm512_srai_epi32(a, 23); }
SAP_HD VecF int_to_float(VecI a) { return _mm512_cvtepi32_ps(a); }
SAP_HD VecF word_to_float(VecI w) { return _mm512_cvtepu32_ps(w); }  // rounded once
SAP_HD VecI load_words(const uint32_t* w) { return _mm512_loadu_si512(w); }
SAP_HD void store_floats(float* p, VecF v) { _mm512_storeu_ps(p, v); }
#else
using VecF = __m256;
using VecI = __m256i;
constexpr int kF32Lanes = 8;
SAP_HD VecF set1f(float v) { return _mm256_set1_ps(v); }
SAP_HD VecI set1i(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
SAP_HD VecF fmadd(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
SAP_HD VecF fnmsub(VecF a, VecF b, VecF c) { return _mm256_fnmsub_ps(a, b, c); }
SAP_HD VecI bits_of(VecF v) { return _mm256_castps_si256(v); }
SAP_HD VecF floats_of(VecI b) { return _mm256_castsi256_ps(b); }
SAP_HD VecI sub32(VecI a, VecI b) { return _mm256_sub_epi32(a, b); }
SAP_HD VecI add32(VecI a, VecI b) { return _mm256_add_epi32(a, b); }
SAP_HD VecI and32(VecI a, VecI b) { return _mm256_and_si256(a, b); }
SAP_HD VecI srai23(VecI a) { return _mm256_srai_epi32(a, 23); }
SAP_HD VecF int_to_float(VecI a) { return _mm256_cvtepi32_ps(a); }
// No unsigned conversion before AVX-512: the two 16-bit halves convert exactly, the fma rounds once,
// so the result is AVX-512's.
SAP_HD VecF word_to_float(VecI w) {
  const VecF hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 16));
  const VecF lo = _mm256_cvtepi32_ps(_mm256_and_si256(w, set1i(0xFFFFu)));
  return fmadd(hi, set1f(65536.0f), lo);
}
SAP_HD VecI load_words(const uint32_t* w) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)); }
SAP_HD void store_floats(float* p, VecF v) { _mm256_storeu_ps(p, v); }
#endif

// -log(u) for 0 < u < 1 in float32: u = 2^e m with m in [sqrt(1/2), sqrt(2)) (integer steps on the
// bits, exact), f = m - 1 (exact), log1p(f) = f + f^2 Q(f), Q of degree 7 fitted (minimax, by
// reweighted least squares) to log1p's relative error: below 2^-24.7 with these float32 coefficients.
// No division: 2 atanh((m - 1) / (m + 1)) by its series, with a vector divide, is no faster and less
// accurate (within 3.5 2^-24 relative, against 1.6 here, both over every float u).
SAP_HD VecF neg_log(VecF u) {
  const VecI t = sub32(bits_of(u), set1i(0x3F3504F3u));  // bits of sqrt(1/2), rounded down
  const VecF e = int_to_float(srai23(t));
  const VecF f = floats_of(add32(and32(t, set1i(0x007FFFFFu)), set1i(0x3F3504F3u))) - set1f(1.0f);
  VecF q = set1f(0.0873477757f);
  q = fmadd(q, f, set1f(-0.143074155f));
  q = fmadd(q, f, set1f(0.149179503f));
  q = fmadd(q, f, set1f(-0.165705204f));
  q = fmadd(q, f, set1f(0.199620754f));
  q = fmadd(q, f, set1f(-0.250017554f));
  q = fmadd(q, f, set1f(0.333339512f));
  q = fmadd(q, f, set1f(-0.499999911f));
  return fnmsub(e, set1f(0.693147182f), fmadd(f * f, q, f));
}

#if defined(__AVX512F__)
// out[i] = carry + in[0] + ... + in[i] for the kBlock floats in, returned out[kBlock - 1]: a log-step
// scan per vector, the vectors' carries chained. Rounding may dip out[] by an ulp where in[i] = 0;
// the search stays in bounds whatever the order (RunSearch).
SAP_HD float prefix_sums_f32(const float* in, float carry, float* out) {
  const __m512i zero = _mm512_setzero_si512();
  for (int v = 0; v < kBlock / 16; ++v) {
    __m512 x = _mm512_loadu_ps(in + 16 * v);
    x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), zero, 15)));
    x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), zero, 14)));
    x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), zero, 12)));
    x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), zero, 8)));
    _mm512_storeu_ps(out + 16 * v, _mm512_add_ps(x, _mm512_set1_ps(carry)));
    carry = out[16 * v + 15];
  }
  return carry;
}
#else
SAP_HD float prefix_sums_f32(const float* in, float carry, float* out) {
  for (int v = 0; v < kBlock / 8; ++v) {
    __m256 x = _mm256_loadu_ps(in + 8 * v);
    // Shifts across the two 128-bit halves: (0, x0..x6), then (0, 0, x0..x5), then (0, 0, 0, 0, x0..x3).
    __m256 t = _mm256_permute2f128_ps(x, x, 0x08);  // (0, 0, 0, 0, x0, x1, x2, x3)
    x = _mm256_add_ps(x, _mm256_castsi256_ps(_mm256_alignr_epi8(_mm256_castps_si256(x), _mm256_castps_si256(t), 12)));
    t = _mm256_permute2f128_ps(x, x, 0x08);
    x = _mm256_add_ps(x, _mm256_castsi256_ps(_mm256_alignr_epi8(_mm256_castps_si256(x), _mm256_castps_si256(t), 8)));
    x = _mm256_add_ps(x, _mm256_permute2f128_ps(x, x, 0x08));
    _mm256_storeu_ps(out + 8 * v, _mm256_add_ps(x, _mm256_set1_ps(carry)));
    carry = out[8 * v + 7];
  }
  return carry;
}
#endif

// The multinomial sampler's variates in float32 for float32/float16 data (SPEC.md allows it): each
// E_i is within 1.06 (2^-23 E_i + 2^-25) of -log(u_i), the 2^-25 from rounding u near 1 (checked
// against float64 over all 2^32 words; neg_log alone is within 1.6 2^-24 relative over every float u).
// Their running sums G are held in two parts: L, the float32 running sums within each block of kBlock
// variates (prefix_sums_f32, within a few ulps of the block's sum), and the blocks' totals, summed in
// float64 in stream order: G_k = G before k's block + L_k. A position T_k * S then moves by at most
// about 3e-7 of S, far inside the 1e-5 decision band. With `kept` set, phase 1 stores L there
// (kept[n * stride + i] for variate i of example n), so that phase 3 reads it instead of generating
// the variates again.
struct Float32Variates {
  float* kept = nullptr;
  uint64_t stride = 0;  // floats between two examples' running sums: r + 1, or 0 in a one-example store

  // Example n's kept running sums, or nullptr when the call does not keep them.
  SAP_HD float* kept_of(uint32_t n) const { return kept != nullptr ? kept + n * stride : nullptr; }

  // E of `count` words (a multiple of the vector width), u = (w + 1/2) / 2^32 rounded to float32.
  SAP_HD static void words_to_variates(const uint32_t* w, int count, float* e) {
    for (int i = 0; i < count; i += kF32Lanes) {
      const VecF u = fmadd(word_to_float(load_words(w + i)), set1f(2.3283064e-10f), set1f(1.1641532e-10f));
      store_floats(e + i, neg_log(u));
    }
  }
  // E of the kBlock variates from Philox block first_block on (SampleCursor's generator interface, for
  // the float64 fallback of multinomial_apply_f32).
  SAP_HD static void run(const StreamKey& key, uint64_t first_block, uint32_t n, double e[kBlock]) {
    alignas(64) uint32_t w[kBlock];
    alignas(64) float f[kBlock];
    philox_words(key, first_block, n, w);
    words_to_variates(w, kBlock, f);
    for (int i = 0; i < kBlock; ++i) e[i] = static_cast<double>(f[i]);
  }
  // L of the kBlock variates from Philox block first_block on.
  SAP_HD static void running_sums(const StreamKey& key, uint64_t first_block, uint32_t n, float l[kBlock]) {
    alignas(64) uint32_t w[kBlock];
    alignas(64) float e[kBlock];
    philox_words(key, first_block, n, w);
    words_to_variates(w, kBlock, e);
    prefix_sums_f32(e, 0.0f, l);
  }
  // The variate chunk's sum of E: its blocks' totals, in order, in float64 (phase 3 adds them the same
  // way), from Philox calls of four vectors per word (their round chains run side by side, as in
  // bernoulli_range_f32). begin is a multiple of kWords (chunks start on multiples of 1024); variates
  // past end are 0.
  SAP_HD double sum(const StreamKey& key, uint64_t begin, uint64_t end, uint32_t n) const {
    constexpr int kWords = 4 * 4 * kU64Lanes;
    static_assert(kCpuVarChunk % kWords == 0 && kWords % kBlock == 0, "whole generator calls per chunk");
    double total = 0;
    float* out = kept_of(n);
    for (uint64_t b = begin; b < end; b += kWords) {
      alignas(64) uint32_t w[kWords];
      alignas(64) float f[kWords], local[kWords];
      philox_words<kWords>(key, b >> 2, n, w);
      words_to_variates(w, kWords, f);
      const int len = end - b < static_cast<uint64_t>(kWords) ? static_cast<int>(end - b) : kWords;
      for (int i = len; i < kWords; ++i) f[i] = 0.0f;
      // A whole call writes its running sums straight to the kept ones.
      float* l = out != nullptr && len == kWords ? out + b : local;
      for (int j = 0; j < kWords; j += kBlock) {
        prefix_sums_f32(f + j, 0.0f, l + j);
        total += static_cast<double>(l[j + kBlock - 1]);
      }
      if (out != nullptr && len < kWords) memcpy(out + b, l, static_cast<size_t>(len) * sizeof(float));
    }
    return total;
  }
};

// Most floats a store of kept variates holds (64 MiB); calls past it generate them again in phase 3.
constexpr uint64_t kMaxKeptVariates = uint64_t{1} << 24;

// Loads and stores of a run of len <= kBlock elements as float32; the rest of the run is zero.
SAP_HD void load_run(const float* x, int len, float* xs) {
  for (int i = 0; i < kBlock; ++i) xs[i] = i < len ? x[i] : 0.0f;
}
SAP_HD void load_run(const Half* x, int len, float* xs) {
  int i = 0;
  for (; i + 8 <= len; i += 8) {
    _mm256_storeu_ps(xs + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  }
  for (; i < len; ++i) xs[i] = half_bits_to_float(x[i].bits);
  for (; i < kBlock; ++i) xs[i] = 0.0f;
}
SAP_HD void store_run(float* y, int len, const float* v) {
  for (int i = 0; i < len; ++i) y[i] = v[i];
}
SAP_HD void store_run(Half* y, int len, const float* v) {
  int i = 0;
  for (; i + 8 <= len; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < len; ++i) y[i].bits = double_to_half_bits(v[i]);
}

// float32 keep probabilities q = -expm1(r * log1p(-p)), p = a / S, shared by both modes. The error
// budget is the header comment's; blocks it cannot serve are flagged `wide` for the float64 path.
struct KeepF32 {
  float inv_sum;    // 1 / S
  float rs, rs_lo;  // r / S as a pair of floats (rs + rs_lo), so that a * r / S rounds once, not twice

  // false when S or r / S is beyond float32's comfort: the caller then takes the float64 path.
  bool init(double sum, double r) {
    const double inv_sum_d = 1.0 / sum, rs_d = r / sum;
    if (!(inv_sum_d > 1e-30 && inv_sum_d < 1e30 && rs_d > 1e-30 && rs_d < 1e30)) return false;
    inv_sum = static_cast<float>(inv_sum_d);
    rs = static_cast<float>(rs_d);
    rs_lo = static_cast<float>(rs_d - static_cast<double>(rs));
    return true;
  }

  // q of kBlock elements xs (zero past the run's end: q = 0 there). Returns whether any element is
  // non-zero; `wide` says whether any needs the float64 path (some p >= 1/256, where the series is not
  // enough, or a * r / S near float32's underflow). The flags are OR-reductions of one loop, which the
  // compiler keeps in registers (per-lane flag arrays had been kept in memory).
  SAP_HD bool run(const float* xs, float* q, bool& wide) const {
    int nonzero = 0, any_wide = 0;
    for (int i = 0; i < kBlock; ++i) {
      const float a = fabsf(xs[i]);
      const float p = a * inv_sum;
      const float t_hi = a * rs;
      const float t = t_hi + __builtin_fmaf(a, rs_lo, __builtin_fmaf(a, rs, -t_hi));
      // r * -log1p(-p) = t (1 + p/2 + p^2/3 + p^3/4 + ...), p < 1/256: later terms are below 2^-32.
      const float z = __builtin_fmaf(t, p * __builtin_fmaf(p, __builtin_fmaf(p, 0.25f, 1.0f / 3), 0.5f), t);
      q[i] = neg_expm1f(z);  // 0 where a = 0
      nonzero |= a > 0.0f;
      any_wide |= (p >= static_cast<float>(fast::kSeriesMaxP)) | ((a > 0.0f) & (t < 1e-30f));
    }
    wide = any_wide != 0;
    return nonzero != 0;
  }
};

// Words per Philox call in bernoulli_range_f32: four vectors of blocks per word of the block, so that
// the ten rounds' multiply-shift-xor chains (each round waits on the last) run four at a time: 128 at
// AVX-512 (16 zmm of state), 64 at AVX2 (16 ymm, all there are). With two at AVX-512 (kBlock words)
// the apply phase took 1.57 ns/element instead of 1.27 (phase_profile, one thread).
constexpr int kBernoulliWords = 4 * 4 * kU64Lanes;
static_assert(kBernoulliWords % kBlock == 0, "whole runs per generator call");

// Bernoulli mode on elements [begin, end) of one example (begin a multiple of kBernoulliWords),
// float32 math. Each run of kBlock elements is loaded (all of a step's runs before any is written, so
// y may be x) and gets its q; the generator serves the step's runs at once unless none needs it.
template <typename T>
void bernoulli_range_f32(const T* x, T* y, int64_t begin, int64_t end, double sum, double r, const StreamKey& key,
                         uint32_t n) {
  KeepF32 keep;
  if (!keep.init(sum, r)) {
    bernoulli_range(x, y, begin, end, sum, r, key, n);  // S or r / S beyond float32's comfort
    return;
  }
  const float top = static_cast<float>(max_finite(static_cast<const T*>(nullptr)));
  constexpr int kRuns = kBernoulliWords / kBlock;
  for (int64_t b = begin; b < end; b += kBernoulliWords) {
    alignas(64) float xs[kRuns][kBlock], q[kRuns][kBlock], v[kBlock];
    alignas(64) uint32_t w[kBernoulliWords];
    int len[kRuns];
    bool nonzero[kRuns], wide[kRuns], generate = false;
    for (int k = 0; k < kRuns; ++k) {
      const int64_t rb = b + k * kBlock;
      len[k] = rb >= end ? 0 : end - rb < kBlock ? static_cast<int>(end - rb) : kBlock;
      if (len[k] == 0) {
        nonzero[k] = wide[k] = false;
        continue;
      }
      load_run(x + rb, len[k], xs[k]);
      nonzero[k] = keep.run(xs[k], q[k], wide[k]);
      generate |= nonzero[k] && !wide[k];
    }
    if (generate) philox_words<kBernoulliWords>(key, static_cast<uint64_t>(b) >> 2, n, w);
    for (int k = 0; k < kRuns && len[k] > 0; ++k) {
      const int64_t rb = b + k * kBlock;
      if (!nonzero[k]) {  // nothing to keep (zero skipping)
        for (int i = 0; i < kBlock; ++i) v[i] = 0.0f;
      } else if (wide[k]) {
        bernoulli_range(x, y, rb, rb + len[k], sum, r, key, n);  // reads x[rb..] before writing y[rb..]
        continue;
      } else {
        const uint32_t* wk = w + k * kBlock;
        for (int i = 0; i < kBlock; ++i) {
          const float u = __builtin_fmaf(static_cast<float>(wk[i]), 2.3283064e-10f, 1.1641532e-10f);  // (w+.5)/2^32
          float kept = xs[k][i] / (q[k][i] > 0.0f ? q[k][i] : 1.0f);
          kept = kept > top ? top : kept < -top ? -top : kept;  // saturation (SPEC.md)
          v[i] = u < q[k][i] ? kept : 0.0f;
        }
      }
      store_run(y + rb, len[k], v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Multinomial mode for float32/float16 data. Per run of kBlock elements: the bounds C as float32
// prefix sums of |x| relative to the run's start (a log-step scan), the positions T_k * S of the
// window's samples relative to the same start (SampleWindow::at), the samples below the run's last
// bound (one count: the window is sorted), each one's element by RunSearch, then KeepF32's q and y.
// Comparing in float32 relative to the run moves a decision only where a position is within a few
// float32 ulps of the run's mass (or of a block's variate sum) of a bound, far inside SPEC.md's 1e-5
// band. Each sample is still placed exactly once: which chunk owns it is decided in float64 against
// phase 2's prefix (SampleWindow::append), and which run of the chunk by one advancing sample index.
// Every quantity is a fixed function of the stream position or element index, not of the chunking,
// so each sample is seen by the chunk that owns it.

#if defined(__AVX512F__)
// How many of the kBlock doubles at v are < p.
SAP_HD int count_lt_block(const double* v, double p) {
  const __m512d pp = _mm512_set1_pd(p);
  int n = 0;
  for (int i = 0; i < kBlock; i += 8) n += __builtin_popcount(_mm512_cmp_pd_mask(_mm512_loadu_pd(v + i), pp, _CMP_LT_OQ));
  return n;
}
#else
SAP_HD int count_lt_block(const double* v, double p) {
  const __m256d pp = _mm256_set1_pd(p);
  int n = 0;
  for (int i = 0; i < kBlock; i += 4) n += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(v + i), pp, _CMP_LT_OQ))));
  return n;
}
#endif

#if defined(__AVX512F__)
// How many of the n floats at v (n a multiple of 16) are < p.
SAP_HD int count_lt_f32(const float* v, int n, float p) {
  const __m512 pp = _mm512_set1_ps(p);
  int c = 0;
  for (int i = 0; i < n; i += 16) c += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(v + i), pp, _CMP_LT_OQ));
  return c;
}
#else
SAP_HD int count_lt_f32(const float* v, int n, float p) {
  const __m256 pp = _mm256_set1_ps(p);
  int c = 0;
  for (int i = 0; i < n; i += 8) {
    c += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + i), pp, _CMP_LT_OQ))));
  }
  return c;
}
#endif

// Bit i set where xs[i] != 0, for a run of kBlock floats.
SAP_HD uint64_t nonzero_mask(const float* xs) {
  uint64_t m = 0;
#if defined(__AVX512F__)
  for (int v = 0; v < kBlock / 16; ++v) {
    m |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(xs + 16 * v), _mm512_setzero_ps(), _CMP_NEQ_UQ)) << (16 * v);
  }
#else
  for (int v = 0; v < kBlock / 8; ++v) {
    const int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xs + 8 * v), _mm256_setzero_ps(), _CMP_NEQ_UQ));
    m |= static_cast<uint64_t>(static_cast<unsigned>(bits)) << (8 * v);
  }
#endif
  return m;
}

// hit[i] = bit i of m, for a run of kBlock (so that the loops reading it vectorize).
SAP_HD void expand_mask(uint64_t m, uint32_t* hit) {
#if defined(__AVX512F__)
  for (int i = 0; i < kBlock; i += 16) {
    _mm512_storeu_si512(hit + i, _mm512_maskz_set1_epi32(static_cast<__mmask16>(m >> i), 1));
  }
#else
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int i = 0; i < kBlock; i += 8) {
    const __m256i b = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>((m >> i) & 0xFF)), bits);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hit + i), _mm256_srli_epi32(_mm256_cmpeq_epi32(b, bits), 31));
  }
#endif
}

#if defined(__AVX512F__)
// AVX-512's sample search: 16 samples at a time, branch-free, in three 4-way steps over a run's 64
// bounds (16 elements, 4, 1: three compares each, against pivots picked from registers by vpermps),
// each sample's element set as one bit of a 64-bit mask by variable shifts. Three short steps rather
// than six binary ones: the search is a dependency chain. For sorted bounds the result is the count of
// bounds <= the position; bound[63] is never a pivot, so an ulp dip cannot take it past 63.
struct RunSearch {
  __m512 col[4];  // col[c][q] = bound[4q + c]

  // bound: the run's kBlock float32 bounds (+inf past the run's end).
  SAP_HD explicit RunSearch(const float* bound) {
    __m512 b[4];
    for (int v = 0; v < 4; ++v) b[v] = _mm512_loadu_ps(bound + 16 * v);
    for (int c = 0; c < 4; ++c) {
      const __m512i idx = _mm512_add_epi32(_mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0),
                                           _mm512_set1_epi32(c));
      // [4q + c for q < 8] from b[0..1], [for 8 <= q < 16] from b[2..3], joined by 256-bit halves.
      col[c] = _mm512_shuffle_f32x4(_mm512_permutex2var_ps(b[0], idx, b[1]), _mm512_permutex2var_ps(b[2], idx, b[3]),
                                    0x44);
    }
  }

  // i + step for each of the pivots piv[0..2] <= p.
  SAP_HD static __m512i add_le(__m512i i, const __m512 piv[3], __m512 p, __m512i step) {
    const __mmask16 m0 = _mm512_cmp_ps_mask(piv[0], p, _CMP_LE_OQ), m1 = _mm512_cmp_ps_mask(piv[1], p, _CMP_LE_OQ),
                    m2 = _mm512_cmp_ps_mask(piv[2], p, _CMP_LE_OQ);
    const __m512i two = _mm512_maskz_add_epi32(m0, step, _mm512_maskz_mov_epi32(m1, step));
    return _mm512_add_epi32(i, _mm512_mask_add_epi32(two, m2, two, step));
  }

  // The elements hit by samples pos[t0 .. t1), as a mask over the run's 64 elements.
  SAP_HD uint64_t place(const float* pos, int t0, int t1) const {
    const __m512i one = _mm512_set1_epi32(1);
    const __m512 top[3] = {_mm512_permutexvar_ps(_mm512_set1_epi32(3), col[3]),   // bound[15]
                           _mm512_permutexvar_ps(_mm512_set1_epi32(7), col[3]),   // bound[31]
                           _mm512_permutexvar_ps(_mm512_set1_epi32(11), col[3])};  // bound[47]
    __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
    for (int t = t0; t < t1; t += 16) {
      const __mmask16 live = static_cast<__mmask16>(t1 - t >= 16 ? 0xFFFF : (1u << (t1 - t)) - 1);
      const __m512 p = _mm512_maskz_loadu_ps(live, pos + t);
      __m512i i = add_le(_mm512_setzero_si512(), top, p, _mm512_set1_epi32(16));
      __m512i q = _mm512_srli_epi32(i, 2);  // 4 x the 16-element block: bound[16g + 3, 7, 11] = col[3][4g + 0, 1, 2]
      const __m512 mid[3] = {_mm512_permutexvar_ps(q, col[3]), _mm512_permutexvar_ps(_mm512_add_epi32(q, one), col[3]),
                             _mm512_permutexvar_ps(_mm512_add_epi32(q, _mm512_set1_epi32(2)), col[3])};
      i = add_le(i, mid, p, _mm512_set1_epi32(4));
      q = _mm512_srli_epi32(i, 2);  // the 4-element block: bound[4q + 0, 1, 2]
      const __m512 fine[3] = {_mm512_permutexvar_ps(q, col[0]), _mm512_permutexvar_ps(q, col[1]),
                              _mm512_permutexvar_ps(q, col[2])};
      i = add_le(i, fine, p, one);
      // Shift counts past 31 give 0: i < 32 sets a bit of lo only, 32 <= i < 64 one of hi only.
      lo = _mm512_mask_or_epi32(lo, live, lo, _mm512_sllv_epi32(one, i));
      hi = _mm512_mask_or_epi32(hi, live, hi, _mm512_sllv_epi32(one, _mm512_sub_epi32(i, _mm512_set1_epi32(32))));
    }
    return static_cast<uint32_t>(_mm512_reduce_or_epi32(lo)) |
           static_cast<uint64_t>(static_cast<uint32_t>(_mm512_reduce_or_epi32(hi))) << 32;
  }
};
#else
// AVX2's sample search, one sample at a time: its group of 8 elements by one compare of the groups'
// last bounds, then its element by one compare of that group's bounds (capped at 63, so that an ulp
// dip of the scan cannot index past the run).
struct RunSearch {
  const float* bound;
  alignas(32) float tops[kGroups];

  SAP_HD explicit RunSearch(const float* b) : bound(b) {
    for (int g = 0; g < kGroups; ++g) tops[g] = b[g * kGroup + kGroup - 1];
  }
  SAP_HD static int count_le8(const float* v, float p) {
    return __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v), _mm256_set1_ps(p), _CMP_LE_OQ))));
  }
  SAP_HD uint64_t place(const float* pos, int t0, int t1) const {
    uint64_t hits = 0;
    for (int t = t0; t < t1; ++t) {
      int g = count_le8(tops, pos[t]);
      g = g < kGroups - 1 ? g : kGroups - 1;
      const int i = g * kGroup + count_le8(bound + g * kGroup, pos[t]);
      hits |= uint64_t{1} << (i < kBlock ? i : kBlock - 1);
    }
    return hits;
  }
};
#endif

// The loaded block of kBlock samples (variates base .. base + kBlock - 1): G before it in float64 and
// its float32 running sums L (see Float32Variates). Positions T_k * S are float64 where a chunk's
// ownership is decided (position, count_below), float32 relative to a run's start elsewhere
// (SampleWindow).
struct SampleBlock {
  const double* g_before;  // g_before[d] = sum of E over variate chunks < d
  int64_t var_chunk;       // variates per chunk, a multiple of kBlock
  int64_t var_chunks;
  double inv_total;        // 1 / G_r
  double sum;              // S
  uint64_t r;
  const StreamKey* key;
  uint32_t n;
  const float* kept;       // this example's running sums kept by phase 1, or nullptr: generate them
  uint64_t base = 0;
  double g_base = 0;       // G before the block
  const float* lsum = nullptr;  // the block's L: in the kept store, or in own
  alignas(64) float own[kBlock];

  // Loads the block from variate b (a multiple of kBlock), given G before b.
  SAP_HD void load(uint64_t b, double g_prev) {
    if (kept != nullptr) {
      // The last block holds r + 1 - b variates: past them L stays at its last value, as phase 1 summed.
      const uint64_t len = r + 1 - b < static_cast<uint64_t>(kBlock) ? r + 1 - b : static_cast<uint64_t>(kBlock);
      if (len == kBlock) {
        lsum = kept + b;
      } else {
        memcpy(own, kept + b, static_cast<size_t>(len) * sizeof(float));
        for (uint64_t i = len; i < static_cast<uint64_t>(kBlock); ++i) own[i] = own[len - 1];
        lsum = own;
      }
    } else {
      Float32Variates::running_sums(*key, b >> 2, n, own);
      lsum = own;
    }
    g_base = g_prev;
    base = b;
  }
  // The next block; callers only ask while it holds samples (base + kBlock < r), so that the table
  // index stays below var_chunks.
  SAP_HD void next() {
    const uint64_t b = base + kBlock, c = static_cast<uint64_t>(var_chunk);
    load(b, b % c == 0 ? g_before[b / c] : g_base + static_cast<double>(lsum[kBlock - 1]));
  }
  // The float64 position of sample base + i, as SampleCursor.
  SAP_HD double position(int i) const { return ((g_base + static_cast<double>(lsum[i])) * inv_total) * sum; }
  // How many of the block's positions are < bound.
  SAP_HD int count_below(double bound) const {
    alignas(64) double p[kBlock];
    for (int i = 0; i < kBlock; ++i) p[i] = position(i);
    return count_lt_block(p, bound);
  }
  // Loads the block of the first sample whose position is >= bound and returns it (r if none, then
  // the loaded block is unspecified). The chunk table narrows the search to one variate chunk.
  SAP_HD uint64_t seek(double bound) {
    int64_t lo = 0, hi = var_chunks - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if ((g_before[mid] * inv_total) * sum < bound) lo = mid; else hi = mid - 1;
    }
    load(static_cast<uint64_t>(lo * var_chunk), g_before[lo]);
    for (;;) {
      const int below = count_below(bound);
      if (below < kBlock) return base + below < r ? base + below : r;
      if (base + kBlock >= r) return r;
      next();
    }
  }
};

// The samples a chunk owns, two blocks of kBlock at a time, as float32 positions relative to the start
// of the run being placed (at()): each block's L scaled by S / G_r plus where the block starts, so
// that a run's positions and bounds carry rounding errors of the run's mass, not the chunk's. The
// chunk owns the samples from the first at or after C before it (SampleBlock::seek) to the last below
// C after it (phase 2's prefix, compared in float64); the last chunk of an example also owns those
// past its last bound (rounding only).
struct SampleWindow {
  SampleBlock& sb;
  double origin;      // C before the chunk
  double c_end;       // C after the chunk (unused for the last chunk)
  bool last_chunk;
  float spacing;      // S / G_r
  int size = 0;       // owned samples in the window
  bool more = false;  // whether the chunk may own samples past the window
  double start[2] = {0, 0};  // each block's position at L = 0, relative to origin
  alignas(64) float lsum[2 * kBlock];
  alignas(64) float pos[2 * kBlock];  // by at(): relative to a run's start, +inf past size

  // Starts at the block sb holds (after seek).
  SampleWindow(SampleBlock& s, double c_begin, double c_end_, bool last)
      : sb(s), origin(c_begin), c_end(c_end_), last_chunk(last),
        spacing(static_cast<float>(s.inv_total * s.sum)) {
    append(0);
    if (more) {
      sb.next();
      append(kBlock);
    }
  }
  // Copies the block sb holds into the window at `at` (0 or kBlock).
  SAP_HD void append(int at) {
    const uint64_t left = sb.r - sb.base;
    int n = left < static_cast<uint64_t>(kBlock) ? static_cast<int>(left) : kBlock;
    if (!last_chunk && !(sb.position(kBlock - 1) < c_end)) {
      const int below = sb.count_below(c_end);  // the rest belong to the next chunk
      n = below < n ? below : n;
    }
    memcpy(lsum + at, sb.lsum, kBlock * sizeof(float));
    start[at / kBlock] = (sb.g_base * sb.inv_total) * sb.sum - origin;
    size = at + n;
    more = n == kBlock && sb.base + kBlock < sb.r;
  }
  // Drops the first block and appends the next one, if the chunk owns any of it.
  SAP_HD void slide() {
    memcpy(lsum, lsum + kBlock, kBlock * sizeof(float));
    start[0] = start[1];
    size -= kBlock;
    if (more) {
      sb.next();
      append(kBlock);
    }
  }
  // Fills pos[] relative to c (C before the run, relative to origin).
  SAP_HD void at(double c) {
    for (int h = 0; h < 2; ++h) {
      const float s0 = static_cast<float>(start[h] - c);
      for (int i = 0; i < kBlock; ++i) pos[h * kBlock + i] = __builtin_fmaf(lsum[h * kBlock + i], spacing, s0);
    }
    for (int i = size; i < 2 * kBlock; ++i) pos[i] = INFINITY;
  }
};

// A run of multinomial_range_f32 (y at its start) whose keep probabilities need float64 (KeepF32's
// `wide`). Out of line: inlined, this rarely taken code changed GCC's code for the whole loop and
// made the op 8% slower.
template <typename T>
__attribute__((noinline)) void multinomial_run_f64(const float* xs, const float* a, const uint32_t* hit, int len,
                                                   double sum, double r, T* y) {
  double a64[kBlock], q64[kBlock];
  for (int i = 0; i < len; ++i) a64[i] = static_cast<double>(a[i]);
  keep_probabilities<T>(a64, len, sum, r, q64);
  for (int i = 0; i < len; ++i) store(y, i, hit[i] ? survivor<T>(xs[i], q64[i]) : 0.0);
}

// Multinomial mode on elements [begin, end) of one example (begin a multiple of kBlock), whose C runs
// from c_begin to c_end; the last chunk of an example also takes the samples past its last bound.
template <typename T>
void multinomial_range_f32(const T* x, T* y, int64_t begin, int64_t end, double c_begin, double c_end,
                           bool last_chunk, SampleBlock& sb, const KeepF32& keep, double r) {
  const uint64_t k0 = sb.seek(c_begin);
  if (k0 >= sb.r || (!last_chunk && sb.position(static_cast<int>(k0 - sb.base)) >= c_end)) {  // this chunk owns no samples
    memset(static_cast<void*>(y + begin), 0, static_cast<size_t>(end - begin) * sizeof(T));
    return;
  }
  int t = static_cast<int>(k0 - sb.base);  // the next sample to place, as an index of the window's pos
  SampleWindow win(sb, c_begin, c_end, last_chunk);  // starts at sb's block
  const float top = static_cast<float>(max_finite(static_cast<const T*>(nullptr)));
  double c = 0;  // C before the run, relative to c_begin: the runs' float32 sums, added in float64
  // The chunk's last element with a_j > 0 and its x, read before y is written (y may be x's buffer).
  int64_t last_nonzero = -1;
  float last_x = 0.0f;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int len = end - b < kBlock ? static_cast<int>(end - b) : kBlock;
    alignas(64) float xs[kBlock], a[kBlock], bound[kBlock], q[kBlock], v[kBlock];
    load_run(x + b, len, xs);
    const uint64_t nz = nonzero_mask(xs);  // zero past len
    if (nz != 0) {
      const int i = 63 - __builtin_clzll(nz);
      last_nonzero = b + i;
      last_x = xs[i];
    }
    for (int i = 0; i < kBlock; ++i) a[i] = fabsf(xs[i]);
    const double c_run = c;
    const float mass = prefix_sums_f32(a, 0.0f, bound);  // bounds relative to the run's start
    c += static_cast<double>(mass);
    for (int i = len; i < kBlock; ++i) bound[i] = INFINITY;
    const float last = bound[len - 1];
    uint64_t hits = 0;
    if (t < win.size) {
      const RunSearch search(bound);
      win.at(c_run);
      for (;;) {
        int t1 = count_lt_f32(win.pos, 2 * kBlock, last);  // the window is sorted, +inf past size
        t1 = t1 > t ? t1 : t;
        hits |= search.place(win.pos, t, t1);
        t = t1;
        if (t < 2 * kBlock || !win.more) break;
        win.slide();  // all the window's samples are below this run's end: the next block too may be
        win.at(c_run);
        t -= kBlock;
      }
      if (t >= kBlock && win.more) {  // keep the next run's samples in one range of the window
        win.slide();
        t -= kBlock;
      }
    }
    hits &= nz;  // a sample on a zero element (a dip of the scan) keeps nothing: y = 0 there anyway
    if (hits == 0) {  // no sample landed in this run: zeros, no q
      for (int i = 0; i < kBlock; ++i) v[i] = 0.0f;
      store_run(y + b, len, v);
      continue;
    }
    alignas(64) uint32_t hit[kBlock];
    expand_mask(hits, hit);
    bool wide;
    keep.run(xs, q, wide);
    if (wide) {  // some p >= 1/256 (or an underflowing a * r / S): float64 q for this run
      multinomial_run_f64(xs, a, hit, len, sb.sum, r, y + b);
      continue;
    }
    for (int i = 0; i < kBlock; ++i) {
      float kept = xs[i] / (q[i] > 0.0f ? q[i] : 1.0f);
      kept = kept > top ? top : kept < -top ? -top : kept;  // saturation (SPEC.md)
      v[i] = hit[i] ? kept : 0.0f;
    }
    store_run(y + b, len, v);
  }
  // Owned samples past the chunk's last bound (rounding only) land on its last element with a_j > 0,
  // as in multinomial_range.
  if (t < win.size && last_nonzero >= 0) {
    const double xj = static_cast<double>(last_x);
    store(y, last_nonzero, saturate<T>(xj / keep_probability_of<T>(fabs(xj), sb.sum, r)));
  }
}

// Apply task t in multinomial mode for float32/float16 data; float64 code (apply_task) where S, r / S
// or S / G_r is beyond float32's comfort.
template <typename T>
void multinomial_apply_f32(const Layout& l, const T* x, T* y, const double* scratch, const StreamKey& key,
                           const Float32Variates& variates, int64_t t) {
  const int64_t n = t / l.elem_chunks, ch = t % l.elem_chunks;
  const int64_t begin = l.chunk_begin(ch), end = l.chunk_end(ch);
  const double* c_before = scratch + n * l.c_stride();
  const double sum = c_before[l.elem_chunks];
  const double r = static_cast<double>(l.r);
  const double* g_before = scratch + l.examples * l.c_stride() + n * l.g_stride();
  const double inv_total = 1.0 / g_before[l.var_chunks];
  const double spacing = inv_total * sum;  // float32 positions scale L by it (SampleBlock::positions_f32)
  KeepF32 keep;
  if (!sum_is_usable(sum) || !keep.init(sum, r) || !(spacing > 1e-30 && spacing < 1e30)) {
    apply_task<T, Float32Variates>(l, x, y, scratch, key, t);
    return;
  }
  SampleBlock sb{g_before, l.var_chunk, l.var_chunks, inv_total, sum, l.r, &key,
                 static_cast<uint32_t>(n), variates.kept_of(static_cast<uint32_t>(n)), 0, 0.0, nullptr, {}};
  multinomial_range_f32(x + n * l.m, y + n * l.m, begin, end, c_before[ch], c_before[ch + 1], ch + 1 == l.elem_chunks,
                        sb, keep, r);
}

// Apply task t in bernoulli mode for float32/float16 data.
template <typename T>
void bernoulli_apply_f32(const Layout& l, const T* x, T* y, const double* scratch, const StreamKey& key, int64_t t) {
  const int64_t n = t / l.elem_chunks, ch = t % l.elem_chunks;
  const int64_t begin = l.chunk_begin(ch), end = l.chunk_end(ch);
  const double sum = scratch[n * l.c_stride() + l.elem_chunks];
  if (sum_is_usable(sum)) {
    bernoulli_range_f32(x + n * l.m, y + n * l.m, begin, end, sum, static_cast<double>(l.r), key,
                        static_cast<uint32_t>(n));
  } else {
    copy_range(x + n * l.m, y + n * l.m, begin, end);
  }
}

template <typename T>
struct SimdCall {
  const Layout* layout;
  const T* x;
  T* y;
  double* scratch;
  const StreamKey* key;

  // float32 variates for float32/float16 data, float64 ones for float64 data.
  using Variates = std::conditional_t<sizeof(T) == sizeof(double), Float64Variates, Float32Variates>;
  Variates variates;

  static void partial(void* self, size_t t) {
    auto* c = static_cast<SimdCall*>(self);
    partial_sum_task<T, Variates>(*c->layout, c->x, c->scratch, *c->key, static_cast<int64_t>(t), c->variates);
  }
  // One example's task (run_phases' schedule for large batches) in multinomial mode: it keeps the
  // example's running sums in a store of its own, of r + 1 floats, at most kMaxKeptVariates. Each
  // thread's next task reuses the freed memory, so a call needs a store per thread, not per example.
  // Without memory for it, the task generates the variates again, with the same result.
  static void example_keeping(void* self, size_t n) {
    SimdCall local = *static_cast<SimdCall*>(self);
    const uint64_t per_example = local.layout->r + 1;
    std::unique_ptr<float[]> own;
    if (per_example <= kMaxKeptVariates) {
      own.reset(new (std::nothrow) float[per_example]);  // uninitialized: phase 1 writes every one read
      local.variates = Float32Variates{own.get(), 0};
    }
    example_task<SimdCall>(&local, n);
  }
  static void apply(void* self, size_t t) {
    auto* c = static_cast<SimdCall*>(self);
    const Layout& l = *c->layout;
    const int64_t task = static_cast<int64_t>(t);
    if constexpr (sizeof(T) != sizeof(double)) {
      if (l.mode == Mode::kBernoulli) return bernoulli_apply_f32(l, c->x, c->y, c->scratch, *c->key, task);
      return multinomial_apply_f32(l, c->x, c->y, c->scratch, *c->key, c->variates, task);
    }
    apply_task<T, Variates>(l, c->x, c->y, c->scratch, *c->key, task);
  }
};

template <typename T>
void run_simd(const T* x, T* y, const Layout& layout, const StreamKey& key, double* scratch, const Pool& pool) {
  SimdCall<T> call{&layout, x, y, scratch, &key, {}};
  // Multinomial float32/float16 calls keep their variates between phases 1 and 3 when they fit: in one
  // store per task when the batch runs one task per example (example_keeping), else in one for the call.
  std::unique_ptr<float[]> kept;
  if constexpr (sizeof(T) != sizeof(double)) {
    const uint64_t per_example = layout.r + 1;
    const uint64_t n = static_cast<uint64_t>(layout.examples);
    if (layout.mode == Mode::kMultinomial && layout.examples >= kCpuExampleTasksMin) {
      return run_phases(call, pool, &SimdCall<T>::example_keeping);
    }
    if (layout.mode == Mode::kMultinomial && n != 0 && per_example <= kMaxKeptVariates / n) {
      kept.reset(new (std::nothrow) float[n * per_example]);  // uninitialized: phase 1 writes every one read
      call.variates = Float32Variates{kept.get(), per_example};
    }
  }
  run_phases(call, pool);
}

}  // namespace

void SAP_SIMD_ENTRY(DType dtype, const void* x, void* y, const Layout& layout, const StreamKey& key,
                    double* scratch, const Pool& pool) {
  switch (dtype) {
    case DType::kFloat32:
      run_simd(static_cast<const float*>(x), static_cast<float*>(y), layout, key, scratch, pool);
      break;
    case DType::kFloat64:
      run_simd(static_cast<const double*>(x), static_cast<double*>(y), layout, key, scratch, pool);
      break;
    case DType::kFloat16:
      run_simd(static_cast<const Half*>(x), static_cast<Half*>(y), layout, key, scratch, pool);
      break;
  }
}

}  // namespace onnx_sap
