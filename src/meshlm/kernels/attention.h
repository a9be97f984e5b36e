// Decode attention on the KV cache as stored: one new query position per sequence, grouped
// (multiquery) heads. Shared by decode_attention.cc (its FFI handler) and decoder_layer.cc.
// The cache is f32 or bf16 (`bf16`: the high half of an f32, widened in registers; half the bytes
// to stream, which is what a long-context decode step spends its time on).
//
// o[b, k, g] = softmax_s(scale * q[b, k, g] . k[b, s, k]) @ v[b, :, k] over s <= pos[b] (every s
// when it is >= S; uniform over all S when it is negative, like a fully masked row). Each cached K
// and V row is read once, in place. S is split into chunks (flash-decoding) so a single sequence
// still uses every core; the last chunk of a row to finish merges the partial softmaxes.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "ffi_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)  // BW, VL: the bf16 row loads
#include <immintrin.h>
#define MESHLM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)  // Zen 1-3 and the Intel parts without AVX-512
#include <immintrin.h>
#define MESHLM_AVX2 1
#endif

namespace meshlm {
namespace attention {

constexpr int64_t kMinChunk = 64;  // cache positions per chunk, at least
constexpr int64_t kPrefetchRows = 4;  // rows ahead (the per-row path)
#if defined(MESHLM_AVX512)
constexpr int64_t kLanes = 16;  // f32 lanes per vector: cached rows per block of the blocked path
#elif defined(MESHLM_AVX2)
constexpr int64_t kLanes = 8;
#endif
#if defined(MESHLM_AVX512) || defined(MESHLM_AVX2)
constexpr int64_t kAhead = 32 / kLanes;  // blocks ahead (the blocked path): 32 cached rows
#endif

struct bf16 {  // a bfloat16 as stored: the high 16 bits of an f32
  uint16_t bits;
};

inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// f32 -> bf16 rounded to nearest even (as XLA's convert, so both paths write the same cache bits);
// NaN stays NaN.
inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};
  return bf16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// e^x as Cephes expf: 2^n * p(r), n = round(x log2 e), r = x - n ln 2 (ln 2 in two parts),
// p(r) = 1 + r + r^2 (c0 r^5 + ... + c5); relative error ~1e-7 for x in [-87, 88].
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline void store_row(const float* x, float* y, int64_t n) { std::copy(x, x + n, y); }
inline void store_row(const float* x, bf16* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = to_bf16(x[i]);
}

#if defined(MESHLM_AVX512) || defined(MESHLM_AVX2)
// The h-th of H equal parts of [p, p + n) (n elements) into L2, one prefetch per 64-byte line: a
// block ahead's rows, spread over this block's heads. The heads read a block's rows strided, which
// the hardware prefetcher does not follow: with no prefetch, or a burst per block into L1, the
// blocked path streamed at ~45% of the bandwidth pass (measured in alternating processes, SmolLM2
// heads at 1088 positions; into L2 two blocks ahead was the best of 1-4 blocks, L1/L2/NTA).
template <typename T>
inline void prefetch_part(const T* p, int64_t n, int64_t h, int64_t H) {
  constexpr int64_t line = 64 / sizeof(T);
  const int64_t part = ((n + H - 1) / H + line - 1) / line * line;
  for (int64_t i = h * part; i < std::min(n, (h + 1) * part); i += line)
    _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T1);
}

#endif

#ifdef MESHLM_AVX512

// 16 lanes (the first of `k`, the rest 0) widened to f32
inline __m512 load16(const float* p, __mmask16 k = 0xFFFF) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const bf16* p, __mmask16 k = 0xFFFF) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t D) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), load16(b + d), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 16), load16(b + d + 16), acc1);
  }
  for (; d < D; d += 16) {
    const __mmask16 k = tail_mask(D - d);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + d), load16(b + d, k), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

template <typename T>
inline void axpy(float p, const T* x, float* y, int64_t D) {  // y += p * x
  const __m512 pb = _mm512_set1_ps(p);
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    _mm512_storeu_ps(y + d, _mm512_fmadd_ps(pb, load16(x + d), _mm512_loadu_ps(y + d)));
  if (d < D) {
    const __mmask16 k = tail_mask(D - d);
    _mm512_mask_storeu_ps(y + d, k, _mm512_fmadd_ps(pb, load16(x + d, k), _mm512_maskz_loadu_ps(k, y + d)));
  }
}

// e^x (kExpPoly above), 16 lanes.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  UNROLL for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// p[i] = e^(p[i] - m) in place; returns their sum.
inline float exp_sum(float* p, int64_t n, float m) {
  const __m512 mb = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 e = _mm512_maskz_mov_ps(k, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + i), mb)));
    _mm512_mask_storeu_ps(p + i, k, e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

// lane i = the sum of a[i]'s 16 lanes: a transpose-and-add tree, 45 instructions for 16 dot products
// where 16 horizontal reductions take ~130 (they, not the loads, set the pace of the scores pass).
inline __m512 sum16(const __m512* a) {
  __m512 t[8], u[4], w[2];
  UNROLL for (int i = 0; i < 8; ++i)  // [a0+a2, b0+b2, a1+a3, b1+b3] per 128-bit lane
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  UNROLL for (int i = 0; i < 4; ++i) {  // rows 4i..4i+3, one partial sum each per 128-bit lane
    const __m512d c = _mm512_castps_pd(t[2 * i]), d = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  UNROLL for (int i = 0; i < 2; ++i)  // 128-bit lanes added in pairs
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

// One head's D = 16 NV cached values as NV f32 vectors. f32: in order. bf16: each 32-element piece
// as its even then its odd elements ([x0 x2 .. x30], [x1 x3 .. x31]: a shift and a mask of the raw
// words, no cross-lane widening), so the query and the output are kept in that order (to_split).
template <int NV>
inline void load_head(const float* p, __m512* x) {
  UNROLL for (int j = 0; j < NV; ++j) x[j] = _mm512_loadu_ps(p + 16 * j);
}
template <int NV>
inline void load_head(const bf16* p, __m512* x) {
  const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
  UNROLL for (int j = 0; j < NV / 2; ++j) {
    const __m512i w = _mm512_loadu_si512(p + 32 * j);
    x[2 * j] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    x[2 * j + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, hi));
  }
}

// The order load_head gives a head's D values in (n heads of D, D a multiple of 32), and back.
template <typename T>
inline void to_split(const float* x, float* y, int64_t n, int64_t D) {
  if constexpr (std::is_same_v<T, bf16>)
    for (int64_t i = 0; i < n * D; i += 32)
      for (int j = 0; j < 16; ++j) y[i + j] = x[i + 2 * j], y[i + 16 + j] = x[i + 2 * j + 1];
  else
    std::copy(x, x + n * D, y);
}
template <typename T>
inline void from_split(float* x, int64_t n, int64_t D) {
  if constexpr (std::is_same_v<T, bf16>) {
    float t[32];
    for (int64_t i = 0; i < n * D; i += 32) {
      for (int j = 0; j < 16; ++j) t[2 * j] = x[i + j], t[2 * j + 1] = x[i + 16 + j];
      std::copy(t, t + 32, x + i);
    }
  }
}

// Scores of n <= 16 consecutive cached rows kr (row: a row's stride) for every head h = (k, g):
// sc[h * len + r] = scale * q[h] . kr[r, k], and mx[16 h .. 16 h + 15] the running max per lane.
// A head's 16 dot products are reduced together (sum16); rows past n repeat row n - 1 and are not
// stored, so every block runs the same unrolled code. q in load_head's order; pf, pf_n: prefetch_part.
template <int NV, typename T>
inline void block_scores(const float* q, const T* kr, int64_t row, int64_t n, int64_t K, int64_t G, float scale,
                         float* sc, int64_t len, float* mx, const T* pf, int64_t pf_n) {
  constexpr int64_t D = 16 * NV;
  const __mmask16 keep = tail_mask(n);
  const __m512 sb = _mm512_set1_ps(scale);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = k * G + g;
      prefetch_part(pf, pf_n, h, K * G);
      __m512 qv[NV], acc[16];
      load_head<NV>(q + h * D, qv);
      UNROLL for (int r = 0; r < 16; ++r) {
        __m512 x[NV];
        load_head<NV>(kr + std::min<int64_t>(r, n - 1) * row + k * D, x);
        acc[r] = _mm512_mul_ps(qv[0], x[0]);
        UNROLL for (int j = 1; j < NV; ++j) acc[r] = _mm512_fmadd_ps(qv[j], x[j], acc[r]);
      }
      const __m512 s = _mm512_mul_ps(sum16(acc), sb);
      _mm512_mask_storeu_ps(sc + h * len, keep, s);
      const __m512 m = _mm512_loadu_ps(mx + 16 * h);
      _mm512_storeu_ps(mx + 16 * h, _mm512_mask_max_ps(m, keep, m, s));
    }
}

// o[h] += sum_r p[h * len + r] * vr[r, k] over n consecutive cached rows, every head; o [H, D] in
// load_head's order, held in registers across the rows.
template <int NV, typename T>
inline void block_values(const float* p, int64_t len, const T* vr, int64_t row, int64_t n, int64_t K, int64_t G,
                         float* o, const T* pf, int64_t pf_n) {
  constexpr int64_t D = 16 * NV;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = k * G + g;
      prefetch_part(pf, pf_n, h, K * G);
      __m512 ov[NV];
      load_head<NV>(o + h * D, ov);
      for (int64_t r = 0; r < n; ++r) {
        const __m512 pb = _mm512_set1_ps(p[h * len + r]);
        __m512 x[NV];
        load_head<NV>(vr + r * row + k * D, x);
        UNROLL for (int j = 0; j < NV; ++j) ov[j] = _mm512_fmadd_ps(pb, x[j], ov[j]);
      }
      UNROLL for (int j = 0; j < NV; ++j) _mm512_storeu_ps(o + h * D + 16 * j, ov[j]);
    }
}

template <typename T>
inline void prefetch_row(const T* p, int64_t D) {  // every 64-byte line of D elements
  for (int64_t d = 0; d < D; d += 64 / sizeof(T)) _mm_prefetch(reinterpret_cast<const char*>(p + d), _MM_HINT_T0);
}

#elif defined(MESHLM_AVX2)

// 8 lanes widened to f32 (bf16: the high halves of f32s).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Without AVX-512's masked loads the tails (D not a multiple of 8, short score rows) run as scalars.
template <typename T>
inline float dot(const float* a, const T* b, int64_t D) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), load8(b + d + 8), acc1);
  }
  for (; d + 8 <= D; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; d < D; ++d) s += a[d] * to_f32(b[d]);
  return s;
}

template <typename T>
inline void axpy(float p, const T* x, float* y, int64_t D) {  // y += p * x
  const __m256 pb = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(pb, load8(x + d), _mm256_loadu_ps(y + d)));
  for (; d < D; ++d) y[d] += p * to_f32(x[d]);
}

// e^x (kExpPoly above), 8 lanes; 2^n built in the exponent bits (n in [-126, 127] for x in [-87, 88]).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  UNROLL for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// p[i] = e^(p[i] - m) in place; returns their sum.
inline float exp_sum(float* p, int64_t n, float m) {
  const __m256 mb = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + i), mb));
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float l = hsum(acc);
  for (; i < n; ++i) l += (p[i] = std::exp(p[i] - m));
  return l;
}

template <typename T>
inline void prefetch_row(const T* p, int64_t D) {  // every 64-byte line of D elements
  for (int64_t d = 0; d < D; d += 64 / sizeof(T)) _mm_prefetch(reinterpret_cast<const char*>(p + d), _MM_HINT_T0);
}

// lane i = the sum of a[i]'s 8 lanes (two rounds of hadd within 128-bit lanes, then the halves added).
inline __m256 sum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [a0..a3 | a4..a7] per 128-bit lane
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// As the AVX-512 block_scores, 8 cached rows a block: a head's 8 dot products reduced together
// (sum8). q is read from L1 8 columns at a time, so 8 accumulators, q's piece and a row's piece fit
// the 16 registers at D = 64 and 128 alike. bf16 rows widen in order (no split order needed).
template <int NV, typename T>
inline void block_scores(const float* q, const T* kr, int64_t row, int64_t n, int64_t K, int64_t G, float scale,
                         float* sc, int64_t len, float* mx, const T* pf, int64_t pf_n) {
  constexpr int64_t D = 8 * NV;
  const __m256 sb = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 keep = _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  const T* rp[8];
  UNROLL for (int r = 0; r < 8; ++r) rp[r] = kr + std::min<int64_t>(r, n - 1) * row;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = k * G + g;
      prefetch_part(pf, pf_n, h, K * G);
      __m256 acc[8];
      UNROLL for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
      UNROLL for (int j = 0; j < NV; ++j) {
        const __m256 qj = _mm256_loadu_ps(q + h * D + 8 * j);
        UNROLL for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qj, load8(rp[r] + k * D + 8 * j), acc[r]);
      }
      const __m256 s = _mm256_mul_ps(sum8(acc), sb);
      if (n == 8) {
        _mm256_storeu_ps(sc + h * len, s);
      } else {
        alignas(32) float t[8];
        _mm256_store_ps(t, s);
        std::copy(t, t + n, sc + h * len);
      }
      float* mh = mx + 8 * h;
      _mm256_storeu_ps(mh, _mm256_max_ps(_mm256_loadu_ps(mh), _mm256_blendv_ps(ninf, s, keep)));
    }
}

// As the AVX-512 block_values: o[h] += sum_r p[h * len + r] * vr[r, k], 8 vectors of o in
// registers across a block's rows.
template <int NV, typename T>
inline void block_values(const float* p, int64_t len, const T* vr, int64_t row, int64_t n, int64_t K, int64_t G,
                         float* o, const T* pf, int64_t pf_n) {
  constexpr int64_t D = 8 * NV;
  constexpr int NH = NV < 8 ? NV : 8;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = k * G + g;
      prefetch_part(pf, pf_n, h, K * G);
      for (int j0 = 0; j0 < NV; j0 += NH) {
        float* oh = o + h * D + 8 * j0;
        __m256 ov[NH];
        UNROLL for (int j = 0; j < NH; ++j) ov[j] = _mm256_loadu_ps(oh + 8 * j);
        for (int64_t r = 0; r < n; ++r) {
          const __m256 pb = _mm256_set1_ps(p[h * len + r]);
          const T* v = vr + r * row + k * D + 8 * j0;
          UNROLL for (int j = 0; j < NH; ++j) ov[j] = _mm256_fmadd_ps(pb, load8(v + 8 * j), ov[j]);
        }
        UNROLL for (int j = 0; j < NH; ++j) _mm256_storeu_ps(oh + 8 * j, ov[j]);
      }
    }
}

// bf16 rows widen in order here: q and o keep the usual order.
template <typename T>
inline void to_split(const float* x, float* y, int64_t n, int64_t D) { std::copy(x, x + n * D, y); }
template <typename T>
inline void from_split(float*, int64_t, int64_t) {}

#else  // portable loops

template <typename T>
inline float dot(const float* a, const T* b, int64_t D) {
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += a[d] * to_f32(b[d]);
  return s;
}

template <typename T>
inline void axpy(float p, const T* x, float* y, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += p * to_f32(x[d]);
}

inline float exp_sum(float* p, int64_t n, float m) {
  float l = 0.f;
  for (int64_t i = 0; i < n; ++i) l += (p[i] = std::exp(p[i] - m));
  return l;
}

template <typename T>
inline void prefetch_row(const T*, int64_t) {}

#endif

// One cached row (K heads of D) against every query head h = (k, g): sc[h * stride] = scale * q[h] . kr[k]
// (the portable path, and head dims other than 64 and 128).
template <typename T>
inline void row_scores(const float* q, const T* kr, int64_t K, int64_t G, int64_t D, float scale, float* sc,
                       int64_t stride) {
  for (int64_t k = 0; k < K; ++k, q += G * D, kr += D, sc += G * stride)
    for (int64_t g = 0; g < G; ++g) sc[g * stride] = scale * dot(q + g * D, kr, D);
}

// One cached row's values into every query head's output: o[h] += p[h * stride] * vr[k].
template <typename T>
inline void row_values(const float* p, int64_t stride, const T* vr, int64_t K, int64_t G, int64_t D, float* o) {
  for (int64_t k = 0; k < K; ++k, p += G * stride, vr += D, o += G * D)
    for (int64_t g = 0; g < G; ++g) axpy(p[g * stride], vr, o + g * D, D);
}

// Cache positions row b attends to: 0..pos, all S when pos >= S or (a fully masked row) pos < 0.
inline int64_t attended(int32_t pos, int64_t S) { return pos < 0 || pos >= S ? S : pos + 1; }

struct Dims {
  int64_t B, S, K, G, D, P, chunk;
};

#if defined(MESHLM_AVX512) || defined(MESHLM_AVX2)
// chunk_softmax for D = kLanes NV in blocks of kLanes cached rows: each block is read from memory
// once and again from L1 for each query head; o in registers across a block's rows.
template <int NV, typename T>
inline void blocked_softmax(const float* q, const T* kr, const T* vr, int64_t row, int64_t K, int64_t G, float scale,
                            int64_t len, float* m, float* l, float* o) {
  constexpr int64_t D = kLanes * NV, R = kLanes;
  const int64_t H = K * G;
  std::vector<float> qs(H * D), sc(H * len), mx(R * H, -std::numeric_limits<float>::infinity());
  to_split<T>(q, qs.data(), H, D);
  // The K blocks, then the V blocks, are one stream: block i prefetches block i + kAhead's rows, and
  // the first kAhead blocks are fetched at the start.
  const int64_t nb = (len + R - 1) / R;
  auto block = [&](int64_t i) -> std::pair<const T*, int64_t> {  // block i of the stream: (rows, elements)
    if (i >= 2 * nb) return {kr, 0};
    const int64_t s = (i % nb) * R;
    return {(i < nb ? kr : vr) + s * row, std::min(R, len - s) * row};
  };
  for (int64_t i = 0; i < std::min(kAhead, 2 * nb); ++i) {
    const auto [p, p_n] = block(i);
    prefetch_part(p, p_n, 0, 1);
  }
  for (int64_t i = 0; i < nb; ++i) {
    const auto [pf, pf_n] = block(i + kAhead);
    block_scores<NV>(qs.data(), kr + i * R * row, row, std::min(R, len - i * R), K, G, scale, sc.data() + i * R, len,
                     mx.data(), pf, pf_n);
  }
  for (int64_t h = 0; h < H; ++h) {
    m[h] = *std::max_element(mx.data() + R * h, mx.data() + R * (h + 1));
    l[h] = exp_sum(sc.data() + h * len, len, m[h]);
  }
  for (int64_t i = 0; i < nb; ++i) {
    const auto [pf, pf_n] = block(nb + i + kAhead);
    block_values<NV>(sc.data() + i * R, len, vr + i * R * row, row, std::min(R, len - i * R), K, G, o, pf, pf_n);
  }
  from_split<T>(o, H, D);
}
#endif

// Positions [s0, s1) of row b, every query head h = (k, g) (H = K * G): unnormalized
// o[h] = sum_s e^(score - m[h]) v[s, k], with m[h] the chunk's max score and l[h] the sum of the
// exponentials. A cache row holds all K heads side by side, so both passes read memory in order.
// Empty chunks give l = 0.
template <typename T>
inline void chunk_softmax(const Dims& n, const float* q, const T* k, const T* v, float scale, bool uniform,
                   int64_t b, int64_t s0, int64_t s1, float* m, float* l, float* o) {
  const int64_t G = n.G, D = n.D, H = n.K * G, len = s1 - s0, row = n.K * D;
  std::memset(o, 0, sizeof(float) * H * D);
  for (int64_t h = 0; h < H; ++h) m[h] = -std::numeric_limits<float>::infinity(), l[h] = 0.f;
  if (len <= 0) return;
  const float* qb = q + b * H * D;
  const T* kr = k + (b * n.S + s0) * row;
  const T* vr = v + (b * n.S + s0) * row;
#if defined(MESHLM_AVX512) || defined(MESHLM_AVX2)
  if (!uniform && D == 64) return blocked_softmax<64 / kLanes>(qb, kr, vr, row, n.K, G, scale, len, m, l, o);
  if (!uniform && D == 128) return blocked_softmax<128 / kLanes>(qb, kr, vr, row, n.K, G, scale, len, m, l, o);
#endif
  std::vector<float> sc(H * len);
  for (int64_t s = 0; s < len; ++s, kr += row) {
    if (s + kPrefetchRows < len) prefetch_row(kr + kPrefetchRows * row, row);
    if (uniform)
      for (int64_t h = 0; h < H; ++h) sc[h * len + s] = 0.f;
    else
      row_scores(qb, kr, n.K, G, D, scale, sc.data() + s, len);
  }
  for (int64_t h = 0; h < H; ++h) {
    float mx = sc[h * len];
    for (int64_t s = 1; s < len; ++s) mx = std::max(mx, sc[h * len + s]);
    m[h] = mx;
    l[h] = exp_sum(sc.data() + h * len, len, mx);
  }
  for (int64_t s = 0; s < len; ++s, vr += row) {
    if (s + kPrefetchRows < len) prefetch_row(vr + kPrefetchRows * row, row);
    row_values(sc.data() + s, len, vr, n.K, G, D, o);
  }
}

// o[h] = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p over the P chunks of one row.
inline void merge(const Dims& n, const float* m, const float* l, const float* po, float* out) {
  const int64_t H = n.K * n.G, D = n.D;
  for (int64_t h = 0; h < H; ++h) {
    float M = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < n.P; ++p)
      if (l[p * H + h] > 0.f) M = std::max(M, m[p * H + h]);
    float* oh = out + h * D;
    std::memset(oh, 0, sizeof(float) * D);
    float denom = 0.f;
    for (int64_t p = 0; p < n.P; ++p) {
      if (!(l[p * H + h] > 0.f)) continue;
      const float w = std::exp(m[p * H + h] - M);
      denom += w * l[p * H + h];
      axpy(w, po + (p * H + h) * D, oh, D);
    }
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    for (int64_t d = 0; d < D; ++d) oh[d] *= inv;
  }
}

constexpr int64_t kWarmCacheBytes = 64 << 10;  // DecodeAttention::warm: of K and of V, per share

// out [B, K, G, D] = the attention above for q [B, K, G, D] against k, v [B, S, K, D] at positions
// pos [B], as a plan split over the pool's threads (B * P units: rows times chunks of S): shares()
// shares, share(i) in any order on any thread, each row merged by the share that finishes its last
// chunk. q is read only by the shares (decoder_layer.cc builds the plan before q is computed).
// T: float or bf16.
template <typename T>
class DecodeAttention {
 public:
  DecodeAttention(ffi::ThreadPool& pool, int64_t B, int64_t S, int64_t K, int64_t G, int64_t D, const float* q,
                  const T* k, const T* v, const int32_t* pos, float scale, float* out)
      : n_{B, S, K, G, D, 1, S}, q_(q), k_(k), v_(v), pos_(pos), scale_(scale), out_(out) {
    const int64_t threads = std::max<int64_t>(1, pool.num_threads());
    int64_t bytes = 0, longest = 1;
    for (int64_t b = 0; b < B; ++b) {
      bytes += attended(pos[b], S) * K * D * 2 * int64_t(sizeof(T));
      longest = std::max(longest, attended(pos[b], S));
    }
    // enough chunks over the longest attended row (not the cache: a 200-token row in a 2048-position
    // cache would be one chunk of 256) that B * P units keep every thread busy. A single row splits
    // into one chunk per thread, each one stream, as the memory-bound matmuls split (matmul.h:
    // packed_split): every chunk starts its stream cold (its first blocks fetched at once, then
    // waited on). On the Zen 2 VM (2026-12-07, 3 alternated pairs) an int8 batch-1 decode step at
    // 1024 tokens with an f32 cache took 7.81-7.90 ms in 2 chunks against 7.99-8.09 in 8 (bf16 cache:
    // 6.99-7.06 against 7.04-7.13); the attention alone at 1088 positions 87-89 against 99 us/layer.
    // A single row takes one chunk per thread (of 16 positions at least) however short: below
    // kMinChunk one thread did the whole row while the other waited for it (decoder_layer.cc: the
    // step's next phase needs the whole attention), ~10 us a layer at 48 positions (2026-12-07, Zen 2).
    n_.P = std::max<int64_t>(1, std::min((longest + kMinChunk - 1) / kMinChunk, (4 * threads + B - 1) / B));
    if (B == 1) n_.P = std::min(threads, std::max<int64_t>(1, longest / 16));
    n_.chunk = (longest + n_.P - 1) / n_.P;
    const int64_t H = K * G;
    // the partials' storage, kept by the calling thread from call to call (one call at a time each)
    thread_local std::vector<float> partials;
    thread_local Atomics<int64_t> left;
    const int64_t n = B * n_.P * H;
    partials.resize(n * (2 + D));
    m_ = partials.data(), l_ = m_ + n, o_ = l_ + n;
    left_ = left.fill(B, n_.P);
    units_ = B * n_.P;
    shares_ = B == 1 ? units_ : split_chunks(pool, units_, 1, bytes);  // B == 1: one chunk a share
  }

  int64_t shares() const { return shares_; }

  // Into L2, the first lines of share i's cached K and V rows (up to kWarmCacheBytes of each), by a
  // thread waiting to run it (ffi_common.h: Team), so they are not fetched a block at a time at
  // memory latency when it starts.
  void warm(int64_t i) const {
    const auto [lo, hi] = chunk_range(units_, 1, shares_, i);
    const int64_t row = n_.K * n_.D;
    int64_t left = kWarmCacheBytes;
    for (int64_t u = lo; u < hi && left > 0; ++u) {
      const int64_t b = u / n_.P, p = u % n_.P;
      const int64_t len = attended(pos_[b], n_.S);
      const int64_t s0 = std::min(len, p * n_.chunk), s1 = std::min(len, s0 + n_.chunk);
      const int64_t bytes = std::min<int64_t>(left, (s1 - s0) * row * int64_t(sizeof(T)));
      prefetch_l2(k_ + (b * n_.S + s0) * row, bytes);
      prefetch_l2(v_ + (b * n_.S + s0) * row, bytes);
      left -= bytes;
    }
  }

  void share(int64_t i) {
    const auto [lo, hi] = chunk_range(units_, 1, shares_, i);
    const int64_t H = n_.K * n_.G;
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t b = u / n_.P, p = u % n_.P;
      const int64_t len = attended(pos_[b], n_.S);
      const int64_t s0 = std::min(len, p * n_.chunk), s1 = std::min(len, s0 + n_.chunk);
      const int64_t at = u * H;
      chunk_softmax(n_, q_, k_, v_, scale_, pos_[b] < 0, b, s0, s1, &m_[at], &l_[at], &o_[at * n_.D]);
      if (left_[b].fetch_sub(1) == 1)  // the row's last chunk: all its partials are written
        merge(n_, &m_[b * n_.P * H], &l_[b * n_.P * H], &o_[b * n_.P * H * n_.D], out_ + b * H * n_.D);
    }
  }

 private:
  Dims n_;
  const float* q_;
  const T *k_, *v_;
  const int32_t* pos_;
  const float scale_;
  float* out_;
  float *m_, *l_, *o_;  // per (b, chunk, head): the chunk's max, sum and unnormalized output
  std::atomic<int64_t>* left_;  // chunks of each row not yet done
  int64_t units_ = 1, shares_ = 1;
};

// The plan above run as one call.
template <typename T>
inline void decode_attend(ffi::ThreadPool& pool, int64_t B, int64_t S, int64_t K, int64_t G, int64_t D,
                          const float* q, const T* k, const T* v, const int32_t* pos, float scale, float* out) {
  DecodeAttention<T> att(pool, B, S, K, G, D, q, k, v, pos, scale, out);
  run_split_indexed(pool, 1, 1, att.shares(), [&](int64_t i, int64_t, int64_t) { att.share(i); });
}

}  // namespace attention
}  // namespace meshlm
