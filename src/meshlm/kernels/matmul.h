// Weight-streaming matmul kernels (int8 weights, or f32 ones packed; f32 activations and
// accumulation), shared by the FFI handlers
// of int8_matmul.cc and the fused decoder layer (decoder_layer.cc).
//
//   matmul_cols:    y = x @ q        q s8 [R, C] row-major
//   matmul_t_rows:  y = x @ q.T      q s8 [C, R] (the tied embedding as the output projection)
//   matmul_packed:  y = x @ q        q s8 or f32 [C / PW, R, PW] panel-major (quant.pack_panels)
//
// Each reads the weight once from memory as int8 and widens it to f32 in registers; one row of x
// FMAs straight from it, more rows widen each small block once into an L1 buffer that every
// register tile of MT rows of x then reads. Unscaled unless a per-column scale is given. Each works
// on a range of output columns: the caller splits them over threads (ffi_common.h: run_split).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ffi_common.h"

// The instruction set the code below is written for, chosen at compile time (-march=native):
// AVX-512 (Zen 4/5, Intel Xeons since Skylake-SP), AVX2 + FMA (Zen 1-3, Intel client parts and
// Xeons before it: the packed kernels in 256-bit registers), else portable loops.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <cpuid.h>
#include <immintrin.h>
#define MESHLM_AVX512 1
#if defined(__AVX512VNNI__)
#define MESHLM_VNNI 1
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MESHLM_AVX2 1
#endif

namespace meshlm {
namespace matmul {

constexpr int MT = 4;    // rows of x per register tile
constexpr int PW = 64;   // columns of q per panel: one cache line of int8
constexpr int CT = 4;    // rows of q per tile (matmul_t_rows; 2 * CT for 1-2 rows of x)
constexpr int RB = 32;   // rows of q per block
constexpr int kPrefetchBytes = 256;

constexpr int64_t kStreamMaxM = 8;  // rows of x up to which a packed matmul is memory-bound (packed_split)
constexpr int64_t kSplitRows = 16;  // a thread's share of a packed weight is a multiple of this many panel rows
constexpr int64_t kWarmBytes = 16 << 10;  // PackedMatmul::warm: of a share's first weights
constexpr int64_t kRangeSplitMaxM = 128;  // rows of x up to which packed_split cuts panels (measured up to there)
constexpr int64_t kWholeRows = 256;    // rows of x per unit of work above kRangeSplitMaxM (PackedMatmul)
constexpr int64_t kWholeShares = 16;   // shares per thread there: many units, each a large piece of work

#if defined(MESHLM_AVX512) || defined(MESHLM_AVX2)

// How far ahead a packed weight stream is prefetched, and into which cache, per CPU. AMD Zen 4:
// into L1, 1024 bytes ahead for int8 and 4096 for f32 (16 panel rows; best of 512-2048 measured
// for int8). Zen 5 (cpuid family 0x1A, 1 MiB L2; 2026-12-07, alternated processes, ratios to Zen
// 4's setting): 4096 bytes into L2 for both, int8 batch 1 -5.1% (faster in 12 of 12 rounds, 3.05
// -> 2.89 ms), at 1024 tokens -4.5% (5 of 5), batch 4 -5.1% (3 of 4), f32 batch 1 unchanged;
// 2048 into L1 -4.5%, 512 into L1 +6.4%, 2048 or 8192 into L2 -4.8% / -3.6%, non-temporal
// (1024) no different. Intel (the 2-core Xeon VM with AMX, 2026-12-06): 8192 bytes into L2 for
// both, measured in alternating runs of the int8 batch-1 decode step: 1024 into L1 6.36 ms, 2048
// 5.75, 4096 5.66; into L2 4096 4.99, 8192 4.76, 16384-32768 no better; batch 4 8.87 -> 7.42-7.77,
// f32 batch 1 21.75 -> 20.5 (presumably a core of this part needs more misses in flight than
// the shorter distance keeps, and L2 has more room for them than L1).
// AVX2 (the Zen 2 VM, 2026-12-06, the decode step in alternating processes): int8 4096 bytes into L2
// (6.1-6.2 ms at batch 1) against 1024 into L1 (6.3-10.0) and none (7.6-8.3); f32 none, -1 (20.3-20.7
// ms), against 4096 into L1 (20.7-21.3) and 16384 into L2 (21.6-22.3). Then (2026-12-07) the same
// 4096 bytes non-temporal (`nta`) when the weights are read once (the decode step's few rows of x):
// streamed into L2, 139 MB a step had pushed everything else out of L2 and L3 (code, activations,
// the KV cache), so the work between the matmuls ran cold; a 28-position attention chunk took 7 us
// in the step against 1.7 with its code and data cached. int8 batch 1, 16-token prompt: 8
// alternated pairs 5.245 -> 4.940 ms (-5.8%, faster in 8), the attention phase 8.9 -> 6.7 us a
// layer; 1024-token prompt 7.52 -> 7.43 (3 pairs); batch 4 (compute-bound) unchanged.
enum class Fill { l1, l2, nta };  // the prefetch hint: into L1, into L2, into L1 without polluting L2/L3

struct StreamAhead {
  int int8_bytes, f32_bytes;  // < 0: no software prefetch (the hardware prefetcher alone)
  Fill fill;                  // for weights read once; those read again from L2 (many rows of x) take l2
  template <typename W>
  int bytes() const { return sizeof(W) == 1 ? int8_bytes : f32_bytes; }
  Fill fill_for(bool read_once) const { return fill == Fill::nta && !read_once ? Fill::l2 : fill; }
};

#ifdef MESHLM_AVX512
// cpuid's family (base + extended): 0x19 Zen 4, 0x1A Zen 5 (GCC 12's __builtin_cpu_is knows no
// Zen 4 or 5).
inline unsigned amd_family() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  unsigned base = (a >> 8) & 0xF;
  return base == 0xF ? base + ((a >> 20) & 0xFF) : base;
}
#endif

inline const StreamAhead& stream_ahead() {
#ifdef MESHLM_AVX512
  static const StreamAhead a = !__builtin_cpu_is("amd") ? StreamAhead{8192, 8192, Fill::l2}
                               : amd_family() >= 0x1A   ? StreamAhead{4096, 4096, Fill::l2}
                                                        : StreamAhead{1024, 4096, Fill::l1};
#else
  static const StreamAhead a{4096, -1, Fill::nta};
#endif
  return a;
}

// The n cache lines from p on, with hint `fill` (_mm_prefetch takes its hint as a constant). One loop
// with the hint picked inside it: GCC 12 deleted the whole if/else chain of three loops of prefetches
// alone (the int8 stream then ran on the hardware prefetcher, ~25% slower).
inline void prefetch_lines(const char* p, int n, Fill fill) {
  for (int l = 0; l < n; ++l, p += 64) switch (fill) {
      case Fill::l2: _mm_prefetch(p, _MM_HINT_T1); break;
      case Fill::nta: _mm_prefetch(p, _MM_HINT_NTA); break;
      default: _mm_prefetch(p, _MM_HINT_T0);
    }
}

#endif

#ifdef MESHLM_AVX512

// Masked loads are much slower than plain ones here (measured ~5x on this Zen core): use them only
// at edges.
inline __m512 widen(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline __m512 widen(__mmask16 k, const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, p)));
}

// Row blocks walk RB rows of q side by side, a stride-C pattern the hardware prefetcher follows
// poorly: fetch the lines two panels ahead in each row (measured 13 -> 22 GB/s on one core).
inline void prefetch_ahead(const int8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + 64), _MM_HINT_T0);
}

// One row of x: y[c0:c0+w] (+)= x[r0:r1] @ q[r0:r1, c0:c0+w], w <= 16 * NV (== when FULL): NV = 8
// is two cache lines of each row of q per step and 8 independent FMA chains. The first row block
// (r0 == 0) overwrites y, later ones accumulate into it.
template <int NV, bool FULL>
void panel1(const float* x, const int8_t* q, float* y, int64_t C, int64_t r0, int64_t r1, int64_t c0,
            int64_t w) {
  __mmask16 k[NV];
  UNROLL for (int j = 0; j < NV; ++j) k[j] = tail_mask(w - 16 * j);
  __m512 acc[NV];
  UNROLL for (int j = 0; j < NV; ++j)
    acc[j] = r0 == 0 ? _mm512_setzero_ps()
             : FULL  ? _mm512_loadu_ps(y + c0 + 16 * j)
                     : _mm512_maskz_loadu_ps(k[j], y + c0 + 16 * j);
  const int8_t* p = q + r0 * C + c0;
  for (int64_t r = r0; r < r1; ++r, p += C) {
    prefetch_ahead(p);
    const __m512 xb = _mm512_set1_ps(x[r]);
    UNROLL for (int j = 0; j < NV; ++j)
      acc[j] = _mm512_fmadd_ps(xb, FULL ? widen(p + 16 * j) : widen(k[j], p + 16 * j), acc[j]);
  }
  UNROLL for (int j = 0; j < NV; ++j) {
    if (FULL)
      _mm512_storeu_ps(y + c0 + 16 * j, acc[j]);
    else
      _mm512_mask_storeu_ps(y + c0 + 16 * j, k[j], acc[j]);
  }
}

inline __m512 load16(const int8_t* p) { return widen(p); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(__mmask16 k, const int8_t* p) { return widen(k, p); }
inline __m512 load16(__mmask16 k, const float* p) { return _mm512_maskz_loadu_ps(k, p); }

// y[m, j] = x[m, :] . row[j][:] for m < NM, j < min(NC, n) (y advanced to the tile's first column);
// rows are int8 (straight from q) or already widened to f32. NC rows at once give NM * NC
// independent FMA chains (latency-bound at NM = 1 otherwise).
template <int NM, int NC, typename W>
void tile_t(const float* x, const W* const* row, float* y, int64_t R, int64_t C, int64_t n) {
  __m512 acc[NM][NC];
  UNROLL for (int m = 0; m < NM; ++m)
    UNROLL for (int j = 0; j < NC; ++j) acc[m][j] = _mm512_setzero_ps();
  int64_t r = 0;
  for (; r + 64 <= R; r += 64) {  // a whole cache line of each int8 row per step
    UNROLL for (int u = 0; u < 4; ++u) {
      __m512 w[NC];
      UNROLL for (int j = 0; j < NC; ++j) w[j] = load16(row[j] + r + 16 * u);
      UNROLL for (int m = 0; m < NM; ++m) {
        __m512 xv = _mm512_loadu_ps(x + m * R + r + 16 * u);
        UNROLL for (int j = 0; j < NC; ++j) acc[m][j] = _mm512_fmadd_ps(xv, w[j], acc[m][j]);
      }
    }
  }
  for (; r < R; r += 16) {
    __mmask16 k = tail_mask(R - r);
    __m512 w[NC];
    UNROLL for (int j = 0; j < NC; ++j) w[j] = load16(k, row[j] + r);
    UNROLL for (int m = 0; m < NM; ++m) {
      __m512 xv = _mm512_maskz_loadu_ps(k, x + m * R + r);
      UNROLL for (int j = 0; j < NC; ++j) acc[m][j] = _mm512_fmadd_ps(xv, w[j], acc[m][j]);
    }
  }
  UNROLL for (int m = 0; m < NM; ++m)
    UNROLL for (int j = 0; j < NC; ++j)
      if (j < n) y[m * C + j] = _mm512_reduce_add_ps(acc[m][j]);
}

inline void widen_row(const int8_t* p, int64_t R, float* out) {
  int64_t r = 0;
  for (; r + 16 <= R; r += 16) _mm512_storeu_ps(out + r, widen(p + r));
  if (r < R) _mm512_mask_storeu_ps(out + r, tail_mask(R - r), widen(tail_mask(R - r), p + r));
}

// buf[0:rows, 0:PW] = f32 of `rows` rows of w int8 each, `stride` apart from p, zero past w:
// converted once, then read from L1 by every tile of rows of x (for M > 1 the conversion would
// otherwise be repeated per tile).
template <bool FULL>
void widen_block(const int8_t* p, int64_t stride, int64_t rows, int64_t w, float* buf) {
  __mmask16 k[4];
  UNROLL for (int j = 0; j < 4; ++j) k[j] = tail_mask(w - 16 * j);
  for (int64_t r = 0; r < rows; ++r, p += stride, buf += PW) {
    prefetch_ahead(p);
    UNROLL for (int j = 0; j < 4; ++j)
      _mm512_storeu_ps(buf + 16 * j, FULL ? widen(p + 16 * j) : widen(k[j], p + 16 * j));
  }
}

// y[:NM, c0:c0+w] (+)= x[:NM, r0:r1] @ q[r0:r1, c0:c0+w], that block already widened into buf
// (PW floats per row of q).
template <int NM, bool FULL>
void panel_f32(const float* x, const float* buf, float* y, int64_t R, int64_t C, int64_t r0, int64_t r1,
               int64_t c0, int64_t w) {
  __mmask16 k[4];
  UNROLL for (int j = 0; j < 4; ++j) k[j] = tail_mask(w - 16 * j);
  __m512 acc[NM][4];
  UNROLL for (int m = 0; m < NM; ++m)
    UNROLL for (int j = 0; j < 4; ++j)
      acc[m][j] = r0 == 0 ? _mm512_setzero_ps()
                  : FULL  ? _mm512_loadu_ps(y + m * C + c0 + 16 * j)
                          : _mm512_maskz_loadu_ps(k[j], y + m * C + c0 + 16 * j);
  for (int64_t r = r0; r < r1; ++r, buf += PW) {
    __m512 w0 = _mm512_loadu_ps(buf), w1 = _mm512_loadu_ps(buf + 16), w2 = _mm512_loadu_ps(buf + 32),
           w3 = _mm512_loadu_ps(buf + 48);
    UNROLL for (int m = 0; m < NM; ++m) {
      __m512 xb = _mm512_set1_ps(x[m * R + r]);
      acc[m][0] = _mm512_fmadd_ps(xb, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xb, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(xb, w2, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(xb, w3, acc[m][3]);
    }
  }
  UNROLL for (int m = 0; m < NM; ++m)
    UNROLL for (int j = 0; j < 4; ++j) {
      if (FULL)
        _mm512_storeu_ps(y + m * C + c0 + 16 * j, acc[m][j]);
      else
        _mm512_mask_storeu_ps(y + m * C + c0 + 16 * j, k[j], acc[m][j]);
    }
}

// One row of x against one packed panel w [R, PW] (contiguous; int8 or f32): y[0:PW] = x @ w. A
// panel is one sequential stream, which the hardware prefetcher follows with a software prefetch
// ahead of it (16 rows)
// (measured over SmolLM2's layer matrices on 2 threads: 3.3 vs 4.5 ms for the row-major q, whose
// column chunks are strided). Two accumulator sets (even and odd rows): 8 independent FMA chains.
template <typename W>
void packed1(const float* x, const W* w, const float* s, float* y, int64_t R) {
  constexpr int kRowBytes = PW * sizeof(W);  // a panel row: 1 (int8) or 4 (f32) cache lines
  const StreamAhead& ahead = stream_ahead();
  __m512 a[2][4];
  UNROLL for (int i = 0; i < 2; ++i)
    UNROLL for (int j = 0; j < 4; ++j) a[i][j] = _mm512_setzero_ps();
  int64_t r = 0;
  for (; r + 2 <= R; r += 2, w += 2 * PW) {
    prefetch_lines(reinterpret_cast<const char*>(w) + ahead.bytes<W>(), 2 * kRowBytes / 64, ahead.fill);
    UNROLL for (int i = 0; i < 2; ++i) {
      const __m512 xb = _mm512_set1_ps(x[r + i]);
      UNROLL for (int j = 0; j < 4; ++j) a[i][j] = _mm512_fmadd_ps(xb, load16(w + i * PW + 16 * j), a[i][j]);
    }
  }
  if (r < R) {
    const __m512 xb = _mm512_set1_ps(x[r]);
    UNROLL for (int j = 0; j < 4; ++j) a[0][j] = _mm512_fmadd_ps(xb, load16(w + 16 * j), a[0][j]);
  }
  UNROLL for (int j = 0; j < 4; ++j) {
    const __m512 sum = _mm512_add_ps(a[0][j], a[1][j]);
    _mm512_storeu_ps(y + 16 * j, s ? _mm512_mul_ps(sum, _mm512_loadu_ps(s + 16 * j)) : sum);
  }
}

// NM <= 4 rows of x (xs apart) against R rows of one packed panel w [R, PW] (contiguous):
// y[m, 0:PW] = x[m] @ w (* s) (y rows ys apart). Each row of the panel is loaded (int8: widened)
// once into registers and FMAd into all NM rows: for a few rows (decode at batch 2-8) this streams
// like one row, where widening into an L1 block first (panels) cost as much again (int8 batch-4
// decode 2.5x batch 1).
template <int NM, typename W>
void packed_rows(const float* x, int64_t xs, const W* w, const float* s, float* y, int64_t ys, int64_t R) {
  constexpr int kRowBytes = PW * sizeof(W);
  const StreamAhead& ahead = stream_ahead();
  __m512 a[NM][4];
  UNROLL for (int m = 0; m < NM; ++m)
    UNROLL for (int j = 0; j < 4; ++j) a[m][j] = _mm512_setzero_ps();
  for (int64_t r = 0; r < R; ++r, w += PW) {
    prefetch_lines(reinterpret_cast<const char*>(w) + ahead.bytes<W>(), kRowBytes / 64, ahead.fill);
    __m512 wv[4];
    UNROLL for (int j = 0; j < 4; ++j) wv[j] = load16(w + 16 * j);
    UNROLL for (int m = 0; m < NM; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * xs + r]);
      UNROLL for (int j = 0; j < 4; ++j) a[m][j] = _mm512_fmadd_ps(xb, wv[j], a[m][j]);
    }
  }
  __m512 sv[4];
  UNROLL for (int j = 0; j < 4; ++j) sv[j] = s ? _mm512_loadu_ps(s + 16 * j) : _mm512_set1_ps(1.f);
  UNROLL for (int m = 0; m < NM; ++m)
    UNROLL for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + m * ys + 16 * j, _mm512_mul_ps(a[m][j], sv[j]));
}

#ifdef MESHLM_VNNI

// One row of x as integers for the int8 dot-product instruction (vpdpbusd: 4 u8 x s8 products
// added into each s32 lane, 64 per instruction): x ~= scale * (2^14 t2 + 2^7 t1 + t0) with t0, t1
// in [0, 127] and t2 in [-128, 127], i.e. x rounded to 22 bits of its row's largest |x| (f32
// keeps 24 of each element's own): the three partial dot products, each exact in s32, then meet
// in f32. Widening int8 to f32 costs two instructions per 16 weights before the FMA; here 64
// weights take three dot products and a share of one shuffle. On the 2-core Intel VM: 66-75 GB/s
// against 54-59 widened on weights in L2, the int8 batch-1 decode step 6-9% faster.
struct RowTerms {
  static constexpr int32_t kMax = (1 << 21) - 1;
  std::vector<int8_t> t;         // [3][Rp]: t0, t1, t2, each zero-padded to Rp, a multiple of 4
  std::vector<int32_t> prefix;   // [3][R + 1]: sums of each term over rows [0, r)
  int64_t R = 0, Rp = 0;
  float scale = 0.f;

  const int8_t* term(int e) const { return t.data() + e * Rp; }
  int32_t sum(int e, int64_t r0, int64_t r1) const { return prefix[e * (R + 1) + r1] - prefix[e * (R + 1) + r0]; }
};

// The terms of x [R]; false (nothing to use) when x is not finite.
inline bool split_row(const float* x, int64_t R, RowTerms& out) {
  __m512 mx = _mm512_setzero_ps();
  __mmask16 nan = 0;  // max_ps drops a NaN operand: look for them apart
  int64_t k = 0;
  for (; k + 16 <= R; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  float m = _mm512_reduce_max_ps(mx);
  for (; k < R; ++k) {
    m = std::max(m, std::fabs(x[k]));
    nan |= std::isnan(x[k]);
  }
  if (nan || !(m <= std::numeric_limits<float>::max())) return false;  // NaN or inf: the f32 path propagates them
  out.Rp = (R + 3) / 4 * 4;
  out.t.assign(3 * out.Rp, 0);
  out.scale = m / float(RowTerms::kMax);
  const __m512 inv = _mm512_set1_ps(m > 0.f ? float(RowTerms::kMax) / m : 0.f);
  const __m512i hi = _mm512_set1_epi32(RowTerms::kMax), lo = _mm512_set1_epi32(-RowTerms::kMax),
                low7 = _mm512_set1_epi32(127);
  int8_t *t0 = out.t.data(), *t1 = t0 + out.Rp, *t2 = t1 + out.Rp;
  for (k = 0; k < R; k += 16) {
    const __mmask16 km = tail_mask(R - k);
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(km, x + k), inv));  // nearest even
    q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
    _mm_mask_storeu_epi8(t0 + k, km, _mm512_cvtepi32_epi8(_mm512_and_si512(q, low7)));
    _mm_mask_storeu_epi8(t1 + k, km, _mm512_cvtepi32_epi8(_mm512_and_si512(_mm512_srai_epi32(q, 7), low7)));
    _mm_mask_storeu_epi8(t2 + k, km, _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 14)));
  }
  out.R = R;
  out.prefix.assign(3 * (R + 1), 0);  // once per call: every panel's rows then take two lookups
  for (int e = 0; e < 3; ++e)
    for (k = 0; k < R; ++k) out.prefix[e * (R + 1) + k + 1] = out.prefix[e * (R + 1) + k] + out.term(e)[k];
  return true;
}

// Sums within s32 stay exact up to this many rows: |t| <= 128 times w + 128 <= 255, per row.
constexpr int64_t kVnniMaxRows = (int64_t(1) << 31) / (128 * 255);

// y[0:PW] = x[r0:r1] @ w[r0:r1] (* s) for one packed int8 panel w [R, PW], x as its terms. Four
// panel rows (256 bytes) are interleaved into the instruction's order, 4 consecutive rows of one
// column per s32 lane (8 byte/word unpacks: accumulator j then holds columns 16 L + 4 j + i in
// lane 4 L + i, put back in order once at the end), and flipped to u8 (w + 128); the terms are
// the s8 side, so each sum carries 128 * sum(t), subtracted at the end.
inline void packed1_vnni(const RowTerms& xt, const int8_t* w, const float* s, float* y, int64_t r0, int64_t r1) {
  __m512i acc[3][4];
  UNROLL for (int e = 0; e < 3; ++e)
    UNROLL for (int j = 0; j < 4; ++j) acc[e][j] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int8_t* p = w + r0 * PW;
  // acc[e] += the 4 rows (interleaved, flipped) . the terms e of their 4 positions (as one s32)
  auto step = [&](const __m512i* row, const int32_t* t4) {
    const __m512i ab_lo = _mm512_unpacklo_epi8(row[0], row[1]), ab_hi = _mm512_unpackhi_epi8(row[0], row[1]);
    const __m512i cd_lo = _mm512_unpacklo_epi8(row[2], row[3]), cd_hi = _mm512_unpackhi_epi8(row[2], row[3]);
    __m512i v[4] = {_mm512_unpacklo_epi16(ab_lo, cd_lo), _mm512_unpackhi_epi16(ab_lo, cd_lo),
                    _mm512_unpacklo_epi16(ab_hi, cd_hi), _mm512_unpackhi_epi16(ab_hi, cd_hi)};
    UNROLL for (int j = 0; j < 4; ++j) v[j] = _mm512_xor_si512(v[j], flip);
    UNROLL for (int e = 0; e < 3; ++e) {
      const __m512i xb = _mm512_set1_epi32(t4[e]);
      UNROLL for (int j = 0; j < 4; ++j) acc[e][j] = _mm512_dpbusd_epi32(acc[e][j], v[j], xb);
    }
  };
  const StreamAhead& ahead = stream_ahead();
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4, p += 4 * PW) {
    prefetch_lines(reinterpret_cast<const char*>(p) + ahead.int8_bytes, 4, ahead.fill);
    __m512i row[4];
    UNROLL for (int i = 0; i < 4; ++i) row[i] = _mm512_loadu_si512(p + i * PW);
    int32_t t4[3];
    UNROLL for (int e = 0; e < 3; ++e) std::memcpy(&t4[e], xt.term(e) + r, 4);
    step(row, t4);
  }
  if (r < r1) {  // 1-3 rows left: the rest read as zeros, their terms as 0
    const int64_t n = r1 - r;
    __m512i row[4];
    for (int i = 0; i < 4; ++i) row[i] = i < n ? _mm512_loadu_si512(p + i * PW) : _mm512_setzero_si512();
    int32_t t4[3] = {0, 0, 0};
    for (int e = 0; e < 3; ++e) std::memcpy(&t4[e], xt.term(e) + r, n);
    step(row, t4);
  }
  alignas(64) float out[4][16];
  UNROLL for (int j = 0; j < 4; ++j) {
    __m512 f = _mm512_setzero_ps();
    UNROLL for (int e = 2; e >= 0; --e) {
      const __m512i a = _mm512_sub_epi32(acc[e][j], _mm512_set1_epi32(128 * xt.sum(e, r0, r1)));  // the + 128
      f = _mm512_fmadd_ps(f, _mm512_set1_ps(e == 2 ? 0.f : 128.f), _mm512_cvtepi32_ps(a));
    }
    _mm512_store_ps(out[j], _mm512_mul_ps(f, _mm512_set1_ps(xt.scale)));
  }
  UNROLL for (int L = 0; L < 4; ++L)
    UNROLL for (int j = 0; j < 4; ++j) std::memcpy(y + 16 * L + 4 * j, out[j] + 4 * L, 4 * sizeof(float));
  if (s)
    UNROLL for (int j = 0; j < 4; ++j)
      _mm512_storeu_ps(y + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(y + 16 * j), _mm512_loadu_ps(s + 16 * j)));
}

#endif  // MESHLM_VNNI

#else  // portable loops (GCC auto-vectorizes the inner column / row loops for the target ISA); with
// AVX2, intrinsics for the packed kernels, which every single-device pass runs on

template <int NV, bool FULL>
void panel1(const float* x, const int8_t* q, float* y, int64_t C, int64_t r0, int64_t r1, int64_t c0, int64_t w) {
  if (FULL) w = 16 * NV;  // a compile-time trip count for the vectorizer
  float acc[16 * NV] = {};
  if (r0 > 0) std::memcpy(acc, y + c0, w * sizeof(float));
  const int8_t* p = q + r0 * C + c0;
  for (int64_t r = r0; r < r1; ++r, p += C)
    for (int64_t c = 0; c < w; ++c) acc[c] += x[r] * float(p[c]);
  std::memcpy(y + c0, acc, w * sizeof(float));
}

template <int NM, int NC, typename W>
void tile_t(const float* x, const W* const* row, float* y, int64_t R, int64_t C, int64_t n) {
  for (int j = 0; j < NC && j < n; ++j)
    for (int m = 0; m < NM; ++m) {
      float s = 0.f;
      for (int64_t r = 0; r < R; ++r) s += x[m * R + r] * float(row[j][r]);
      y[m * C + j] = s;
    }
}

inline void widen_row(const int8_t* p, int64_t R, float* out) {
  for (int64_t r = 0; r < R; ++r) out[r] = float(p[r]);
}

template <bool FULL>
void widen_block(const int8_t* p, int64_t stride, int64_t rows, int64_t w, float* buf) {
  if (FULL) w = PW;
  for (int64_t r = 0; r < rows; ++r, p += stride, buf += PW)
    for (int64_t c = 0; c < PW; ++c) buf[c] = c < w ? float(p[c]) : 0.f;
}

template <int NM, bool FULL>
void panel_f32(const float* x, const float* buf, float* y, int64_t R, int64_t C, int64_t r0, int64_t r1,
               int64_t c0, int64_t w) {
  if (FULL) w = PW;
  float acc[NM][PW] = {};
  if (r0 > 0)
    for (int m = 0; m < NM; ++m) std::memcpy(acc[m], y + m * C + c0, w * sizeof(float));
  for (int64_t r = r0; r < r1; ++r, buf += PW)
    for (int m = 0; m < NM; ++m) {
      const float xb = x[m * R + r];
      for (int64_t c = 0; c < PW; ++c) acc[m][c] += xb * buf[c];
    }
  for (int m = 0; m < NM; ++m) std::memcpy(y + m * C + c0, acc[m], w * sizeof(float));
}

#ifdef MESHLM_AVX2

// 8 weights widened to f32: int8 sign-extended (vpmovsxbd from memory), f32 as they are.
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

constexpr int64_t kPassRows = 32;  // panel rows per block of passes (8 KiB of f32), see panel_rows

// Rows [b0, b1) of one packed panel w [R, PW] against NM rows of x (xs apart), columns [c0, c0 + 8 NV):
// y[m, c0:c0 + 8 NV] (+)= x[m, b0:b1] @ w[b0:b1, c0:] (y rows ys apart; `first` overwrites). AVX2 has
// 16 registers: NM * NV <= 8 accumulators, NM broadcasts and one weight vector. With ahead >= 0 each
// row prefetches the cache lines that start in this pass's columns `ahead` bytes further on, so the
// passes together fetch every line of the rows ahead once.
template <int NM, int NV, typename W>
void packed_cols(const float* x, int64_t xs, const W* w, float* y, int64_t ys, int64_t b0, int64_t b1, int c0,
                 bool first, int64_t ahead, Fill fill) {
  const int first_line = (c0 * int(sizeof(W)) + 63) / 64 * 64, end = (c0 + 8 * NV) * int(sizeof(W));
  __m256 a[NM][NV];
  UNROLL for (int m = 0; m < NM; ++m)
    UNROLL for (int j = 0; j < NV; ++j) a[m][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + m * ys + c0 + 8 * j);
  const W* p = w + b0 * PW;
  for (int64_t r = b0; r < b1; ++r, p += PW) {
    if (ahead >= 0)
      for (int l = first_line; l < end; l += 64) prefetch_lines(reinterpret_cast<const char*>(p) + ahead + l, 1, fill);
    if constexpr (NM + NM * NV + 1 <= 16) {  // the NM broadcasts held, one weight vector at a time
      __m256 xb[NM];
      UNROLL for (int m = 0; m < NM; ++m) xb[m] = _mm256_broadcast_ss(x + m * xs + r);
      UNROLL for (int j = 0; j < NV; ++j) {
        __m256 wv = load8(p + c0 + 8 * j);
        // one load per weight vector: GCC otherwise folds it into each of the NM FMAs (12 loads per 8
        // FMAs at NM = 4, more than the two load ports keep up with)
        asm("" : "+x"(wv));
        UNROLL for (int m = 0; m < NM; ++m) a[m][j] = _mm256_fmadd_ps(xb[m], wv, a[m][j]);
      }
    } else {  // more rows: the NV weight vectors held, one broadcast at a time
      __m256 wv[NV];
      UNROLL for (int j = 0; j < NV; ++j) {
        wv[j] = load8(p + c0 + 8 * j);
        asm("" : "+x"(wv[j]));
      }
      UNROLL for (int m = 0; m < NM; ++m) {
        const __m256 xb = _mm256_broadcast_ss(x + m * xs + r);
        UNROLL for (int j = 0; j < NV; ++j) a[m][j] = _mm256_fmadd_ps(xb, wv[j], a[m][j]);
      }
    }
  }
  UNROLL for (int m = 0; m < NM; ++m)
    UNROLL for (int j = 0; j < NV; ++j) _mm256_storeu_ps(y + m * ys + c0 + 8 * j, a[m][j]);
}

constexpr int kGroupRows = 6;  // rows of x per register tile (panel_rows)

// Every pass of NM <= kGroupRows rows of x over rows [b0, b1) of a panel: NV column vectors per pass,
// NM * NV <= 12 accumulators (one row of x: the whole 64-column panel row, 8 FMA chains, in one pass).
template <int NM, typename W>
void block_passes(const float* x, int64_t xs, const W* w, float* y, int64_t ys, int64_t b0, int64_t b1, bool first,
                  int64_t ahead, Fill fill) {
  constexpr int NV = NM == 1 ? 8 : NM == 2 ? 4 : 2;
  for (int c0 = 0; c0 < PW; c0 += 8 * NV) packed_cols<NM, NV>(x, xs, w, y, ys, b0, b1, c0, first, ahead, fill);
}

// As the AVX-512 panel_rows: all M rows of x (xs apart) against rows [r0, r1) of one packed panel,
// y[:, 0:PW] = x[:, r0:r1] @ panel[r0:r1] (* s), y rows ys apart and the partial sums kept in y.
// The panel goes in blocks of kPassRows rows. A few rows of x (memory-bound) take each block
// through every group of kGroupRows rows and every pass before the next block, so it comes from memory once
// and from L1 after; more rows take each group through the whole range, which stays in L2, while
// their rows of y stay in L1. Only the first group prefetches, a block ahead when it makes several
// passes (its passes run from cache and the memory would sit idle behind them), otherwise at the
// one-row distance. Zen 2 host, 2026-12-06, benchmarks/packed_matmul.py (30 FFN pairs, two
// alternating rounds), against GCC's vectorized portable loops: int8 at M = 1, 4, 8, 64, 256 2.7,
// 4.5-4.9, 9.0-12.5, 58-64, 242-245 ms against 4.0-4.4, 14.3-15.0, 27.7-28.4, 229-234, 923-926;
// f32 at M = 1 7.0-7.3 against 8.1-8.3, at M >= 4 no faster (M = 8: 14.2-15.1 either way, twice
// M = 1's time where the memory alone would take the same: its memory and FMAs do not overlap
// well, and neither block size 16-64 nor a prefetch 1-2 blocks ahead into L1 or L2 changed that).
// Groups of 6 rows (12 accumulators, 6 FMAs per weight vector widened) against 4 (8; the FMAs'
// latency then bounds them to 8 per 5 cycles), 2026-12-07, same benchmark, the two alternated in one
// build: f32 at M = 16 and 64 20.4-22.0 and 55-59 ms against 23.1-23.4 and 64-67; int8 14.8-14.9 and
// 52.6-52.7 against 16.6-16.7 and 61-66; the engine's batch-16 decode step (128-token prompts)
// f32 63.2-63.7 ms against 68.8-71.4, int8 44.0-46.8 against 52.1-53.2.
template <typename W>
void panel_rows(const float* x, int64_t xs, const W* panel, const float* s, float* y, int64_t ys, int64_t M,
                int64_t r0, int64_t r1) {
  const StreamAhead& st = stream_ahead();
  const int64_t ahead = M == 1 ? st.bytes<W>() : std::max<int64_t>(st.bytes<W>(), kPassRows * PW * sizeof(W));
  const int64_t block = M == 1 ? std::max<int64_t>(r1 - r0, 1) : kPassRows;  // one row of x: one pass
  const Fill fill = st.fill_for(M <= kStreamMaxM);  // more rows re-read the range from L2
  auto group = [&](int64_t m, int64_t b0) {
    const int64_t b1 = std::min(r1, b0 + block), pf = m == 0 ? ahead : -1;
    const float* xm = x + m * xs;
    float* ym = y + m * ys;
    switch (std::min<int64_t>(kGroupRows, M - m)) {
      case 1: return block_passes<1>(xm, xs, panel, ym, ys, b0, b1, b0 == r0, pf, fill);
      case 2: return block_passes<2>(xm, xs, panel, ym, ys, b0, b1, b0 == r0, pf, fill);
      case 3: return block_passes<3>(xm, xs, panel, ym, ys, b0, b1, b0 == r0, pf, fill);
      case 4: return block_passes<4>(xm, xs, panel, ym, ys, b0, b1, b0 == r0, pf, fill);
      case 5: return block_passes<5>(xm, xs, panel, ym, ys, b0, b1, b0 == r0, pf, fill);
      default: return block_passes<6>(xm, xs, panel, ym, ys, b0, b1, b0 == r0, pf, fill);
    }
  };
  if (M <= kStreamMaxM)
    for (int64_t b0 = r0; b0 < r1; b0 += block)
      for (int64_t m = 0; m < M; m += kGroupRows) group(m, b0);
  else
    for (int64_t m = 0; m < M; m += kGroupRows)
      for (int64_t b0 = r0; b0 < r1; b0 += block) group(m, b0);
  for (int64_t m = 0; m < M; ++m)
    for (int c = 0; c < PW; c += 8) {
      float* ym = y + m * ys + c;
      if (r1 <= r0) _mm256_storeu_ps(ym, _mm256_setzero_ps());  // an empty range
      else if (s) _mm256_storeu_ps(ym, _mm256_mul_ps(_mm256_loadu_ps(ym), _mm256_loadu_ps(s + c)));
    }
}

#else

template <int NM, typename W>
void packed_rows(const float* x, int64_t xs, const W* w, const float* s, float* y, int64_t ys, int64_t R) {
  float acc[NM][PW] = {};
  for (int64_t r = 0; r < R; ++r, w += PW)
    for (int m = 0; m < NM; ++m)
      for (int c = 0; c < PW; ++c) acc[m][c] += x[m * xs + r] * float(w[c]);
  for (int m = 0; m < NM; ++m)
    for (int c = 0; c < PW; ++c) y[m * ys + c] = s ? acc[m][c] * s[c] : acc[m][c];
}

template <typename W>
void packed1(const float* x, const W* w, const float* s, float* y, int64_t R) {
  packed_rows<1>(x, R, w, s, y, PW, R);
}

#endif  // MESHLM_AVX2

#endif

// All M rows of x against the block q[r0:r1, c0:c0+w] (r1 - r0 <= RB), MT rows at a time; the
// block's rows start at p, `stride` apart.
template <bool FULL>
void panels(const float* x, const int8_t* p, int64_t stride, float* y, int64_t M, int64_t R, int64_t C,
            int64_t r0, int64_t r1, int64_t c0, int64_t w) {
  alignas(64) float buf[RB * PW];
  widen_block<FULL>(p, stride, r1 - r0, w, buf);
  int64_t m = 0;
  for (; m + MT <= M; m += MT) panel_f32<MT, FULL>(x + m * R, buf, y + m * C, R, C, r0, r1, c0, w);
  switch (M - m) {
    case 1: panel_f32<1, FULL>(x + m * R, buf, y + m * C, R, C, r0, r1, c0, w); break;
    case 2: panel_f32<2, FULL>(x + m * R, buf, y + m * C, R, C, r0, r1, c0, w); break;
    case 3: panel_f32<3, FULL>(x + m * R, buf, y + m * C, R, C, r0, r1, c0, w); break;
    default: break;
  }
}

// Columns [c_lo, c_hi) of y for all M rows. Row blocks of RB outer, so q streams from memory
// (RB rows side by side, each read sequentially) and y stays in cache between row blocks. One row
// of x FMAs straight from int8; more rows widen each RB x PW block once into an L1 buffer that
// every tile of MT rows of x then reads.
inline void matmul_cols(const float* x, const int8_t* q, float* y, int64_t M, int64_t R, int64_t C,
                 int64_t c_lo, int64_t c_hi) {
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int64_t r1 = std::min<int64_t>(R, r0 + RB);
    if (M == 1) {
      for (int64_t c0 = c_lo; c0 < c_hi; c0 += 2 * PW) {
        const int64_t w = std::min<int64_t>(2 * PW, c_hi - c0);
        if (w == 2 * PW)
          panel1<8, true>(x, q, y, C, r0, r1, c0, w);
        else if (w == PW)  // e.g. 576 = 4.5 x 128 columns: no masked loads for the last 64
          panel1<4, true>(x, q, y, C, r0, r1, c0, w);
        else
          panel1<8, false>(x, q, y, C, r0, r1, c0, w);
      }
      continue;
    }
    for (int64_t c0 = c_lo; c0 < c_hi; c0 += PW) {
      const int64_t w = std::min<int64_t>(PW, c_hi - c0);
      if (w == PW)
        panels<true>(x, q + r0 * C + c0, C, y, M, R, C, r0, r1, c0, w);
      else
        panels<false>(x, q + r0 * C + c0, C, y, M, R, C, r0, r1, c0, w);
    }
  }
}

// Columns [c_lo, c_hi) of y = rows [c_lo, c_hi) of q, 2 * CT at a time, read once from memory. With
// more than 2 rows of x those q rows are widened once into an f32 buffer (L1) that every tile of
// MT rows of x then reads; rows past C - 1 repeat row C - 1 and are not stored.
inline void matmul_t_rows(const float* x, const int8_t* q, float* y, int64_t M, int64_t R, int64_t C,
                   int64_t c_lo, int64_t c_hi) {
  constexpr int NC = 2 * CT;
  std::vector<float> buf(M > 2 ? NC * R : 0);
  const float* frow[NC];
  for (int j = 0; j < NC; ++j) frow[j] = buf.data() + j * R;
  for (int64_t c0 = c_lo; c0 < c_hi; c0 += NC) {
    const int8_t* row[NC];
    for (int j = 0; j < NC; ++j) row[j] = q + std::min(c0 + j, C - 1) * R;
    const int64_t n = std::min<int64_t>(NC, c_hi - c0);
    if (M == 1) tile_t<1, NC>(x, row, y + c0, R, C, n);
    if (M == 2) tile_t<2, NC>(x, row, y + c0, R, C, n);
    if (M <= 2) continue;
    for (int j = 0; j < NC; ++j) widen_row(row[j], R, buf.data() + j * R);
    int64_t m = 0;
    for (; m + MT <= M; m += MT) {
      tile_t<MT, CT>(x + m * R, frow, y + m * C + c0, R, C, n);
      tile_t<MT, CT>(x + m * R, frow + CT, y + m * C + c0 + CT, R, C, n - CT);
    }
    const float* xm = x + m * R;
    float* ym = y + m * C + c0;
    switch (M - m) {
      case 1: tile_t<1, NC>(xm, frow, ym, R, C, n); break;
      case 2: tile_t<2, NC>(xm, frow, ym, R, C, n); break;
      case 3:
        tile_t<3, CT>(xm, frow, ym, R, C, n);
        tile_t<3, CT>(xm, frow + CT, ym + CT, R, C, n - CT);
        break;
      default: break;
    }
  }
}

// All M rows of x (xs apart) against rows [r0, r1) of one packed panel: y[:, 0:PW] = x[:, r0:r1] @
// panel[r0:r1] (* s), y rows ys apart. Rows of x 4 at a time, each panel row from registers
// (packed_rows): the panel is streamed from memory by the first 4 rows and from L2 by the rest.
// Widening blocks into L1 first and tiling them (panels, as the row-major kernel does) was slower
// at every M measured, 2-256: int8 8.5 vs 2.2 ms at M = 4, 112-142 vs 81 at 256
// (benchmarks/packed_matmul.py).
// f32 with AVX-512 and more than kStreamMaxM rows (compute-bound): 6 rows at a time, 24 of the 32
// registers accumulating, 24 FMAs per panel row loaded against 16 (Zen 5, 2026-12-08, 4 FFN pairs,
// alternated builds, with the chunk split of PackedMatmul): M = 64 / 128 / 256 at 30 layers 16.6 /
// 29.6-31.2 / 60-61 ms against 20.1-21.1 / 38.9-39.8 / 79.5-86.3 with 4 rows; at M = 4096 4 rows
// took 170-171 ms against 120-145. int8 keeps 4: 6 was faster only at large M (M = 16384 481-526
// against 540-546 ms) and slower below (M = 16 / 256 at 8 layers 2.1 / 21.4-23.3 against 1.4-1.8 /
// 19.4-20.8), where int8 decodes and prefills. Row blocks of the panel sized for L1
// (8-128 KiB) made no difference either way (f32 M = 4096: 115-125 ms with and without) and are not kept.
#ifndef MESHLM_AVX2
template <typename W>
void panel_rows(const float* x, int64_t xs, const W* panel, const float* s, float* y, int64_t ys, int64_t M,
                int64_t r0, int64_t r1) {
  x += r0;
  panel += r0 * PW;
  const int64_t n = r1 - r0;
  int64_t m = 0;
#ifdef MESHLM_AVX512
  if constexpr (std::is_same_v<W, float>)  // f32 compute-bound: 6 rows at a time (see above)
    if (M > kStreamMaxM)
      for (; m + 6 <= M; m += 6) packed_rows<6>(x + m * xs, xs, panel, s, y + m * ys, ys, n);
#endif
  for (; m + 4 <= M; m += 4) packed_rows<4>(x + m * xs, xs, panel, s, y + m * ys, ys, n);
  switch (M - m) {
    case 1: packed1(x + m * xs, panel, s, y + m * ys, n); break;
    case 2: packed_rows<2>(x + m * xs, xs, panel, s, y + m * ys, ys, n); break;
    case 3: packed_rows<3>(x + m * xs, xs, panel, s, y + m * ys, ys, n); break;
    default: break;
  }
}
#endif

// y = x @ q (* s) for q (int8 or f32) packed panel-major [C / PW, R, PW]: panel p holds columns
// [p PW, (p + 1) PW) of every row, contiguous, so the weight is one sequence of C / PW * R panel
// rows. The work is split over the pool's threads (ffi_common.h: run_split) by panel rows:
// - a few rows of x (memory-bound) take one contiguous, equal share of the weight per thread, each
//   one sequential stream. A share may start or end inside a panel: its partial sum goes to
//   scratch, and finish() adds the pieces of each cut panel once all shares are done. Split by
//   whole panels instead, SmolLM2's 9-panel matrices gave one thread 5 panels and the other 4, and
//   the caller waited 2.6 us per kernel call of 34; int8 batch-1 decode took 4.16-4.98 ms per step
//   against 3.90-4.86 split by bytes (4 pairs of processes, alternated: 6% less). Claimed a panel or two
//   at a time, the two threads' reads interleaved and every panel started a new stream: a layer
//   took 156 vs 124 us, a step 4.7-5.1 vs 4.2-4.5 ms (best of 15 x 20 steps).
// - more rows are compute-bound: up to kRangeSplitMaxM the same equal row ranges, kChunksPerThread
//   per thread, claimed in turn (a helper that joins late takes fewer). Whole panels had left one
//   thread a panel more of the 9-panel matrices: on the Zen 2 VM (2026-12-07,
//   benchmarks/packed_matmul.py, two alternating rounds) ranges took f32 at M = 16, 64, 128
//   19.6-20.4, 51.4-55.2, 97-107 ms against 21.8-22.1, 58.4-58.7, 109-110; int8 13.1-14.4,
//   50.6-50.8, 105-107 against 14.9-15.9, 53-55, 110-113.
// - above kRangeSplitMaxM (AVX-512 only) units of one whole panel times kWholeRows rows of x, in
//   chunk-major order: a chunk of x (256 rows of SmolLM2's [M, 576] f32: 576 KiB) stays in L2
//   while every panel passes it. Whole panels over all of x (the split before 2026-12-08) read x
//   again for each panel, from memory once x outgrew the L3 (38 MB at M = 16384): Zen 5, 4 FFN
//   pairs, alternated builds, f32 M = 4096 / 16384 115-133 / 487-550 ms against 162-172 / 776-828
//   (XLA's GEMM 125-150 / 669-714); int8 (4 rows) 134-137 / 540-546 against 124-143 / 551-574.
// PackedMatmul is that split as a plan (prepare, shares, finish): packed_split runs it as one call,
// decoder_layer.cc as phases of a whole layer (ffi_common.h: Team).
template <typename W>
class PackedMatmul {
 public:
  PackedMatmul(ffi::ThreadPool& pool, const float* x, const W* q, const float* s, float* y, int64_t M, int64_t R,
               int64_t C)
      : x_(x), q_(q), s_(s), y_(y), M_(M), R_(R), C_(C), whole_(M > kRangeSplitMaxM) {
    const int64_t bytes = R * C * int64_t(sizeof(W));
    if (whole_) {  // whole panels times chunks of kWholeRows rows of x, chunk-major, claimed in turn
      panels_ = C / PW;
      units_ = panels_ * ((M + kWholeRows - 1) / kWholeRows), align_ = 1;
      shares_ = split_chunks(pool, units_, 1, bytes, kWholeShares);
      return;
    }
    units_ = C / PW * R, align_ = kSplitRows;
    shares_ = split_chunks(pool, units_, kSplitRows, bytes, M > kStreamMaxM ? kChunksPerThread : 1);
  }

  int64_t shares() const { return shares_; }
  // Floats of scratch the shares need (the partial sums of cut panels), given to use() before any.
  int64_t scratch() const { return whole_ ? 0 : shares_ * 2 * M_ * PW; }
  void use(float* cut) { cut_ = cut; }

  // Before any share, once x holds its values (VNNI: the rows' integer terms).
  void prepare() {
#ifdef MESHLM_VNNI
    if constexpr (std::is_same_v<W, int8_t>) vnni_ = !whole_ && M_ == 1 && R_ <= kVnniMaxRows && split_row(x_, R_, terms_);
#endif
  }

  // The first kWarmBytes of share i's weights into L2 (a thread waiting to run it: ffi_common.h Team).
  void warm(int64_t i) const {
    const auto [lo, hi] = chunk_range(units_, align_, shares_, i);
    const int64_t first = whole_ ? lo % panels_ * R_ : lo, rows = whole_ ? R_ : hi - lo;  // panel rows
    prefetch_l2(q_ + first * PW, std::min<int64_t>(rows * PW * int64_t(sizeof(W)), kWarmBytes));
  }

  // Share i < shares(): its panel rows [lo, hi) (chunk_range); a panel it cuts goes to its scratch.
  void share(int64_t i) {
    const auto [lo, hi] = chunk_range(units_, align_, shares_, i);
    if (whole_) {
      for (int64_t u = lo; u < hi; ++u) {
        const int64_t p = u % panels_, m0 = u / panels_ * kWholeRows, m1 = std::min(M_, m0 + kWholeRows);
        panel_rows(x_ + m0 * R_, R_, q_ + p * R_ * PW, s_ ? s_ + p * PW : nullptr, y_ + m0 * C_ + p * PW, C_,
                   m1 - m0, 0, R_);
      }
      return;
    }
    float *head = cut_ + (2 * i) * M_ * PW, *tail = head + M_ * PW;
    for (int64_t p = lo / R_; p * R_ < hi; ++p) {
      const int64_t r0 = std::max<int64_t>(lo - p * R_, 0), r1 = std::min<int64_t>(hi - p * R_, R_);
      if (r0 == 0 && r1 == R_)
        rows(p, 0, R_, s_ ? s_ + p * PW : nullptr, y_ + p * PW, C_);
      else
        rows(p, r0, r1, nullptr, r0 > 0 ? head : tail, PW);
    }
  }

  // After every share: the cut panels put together from their pieces, then scaled. Shares cover the
  // rows in order, so a panel's piece from its row 0 (a share's tail) comes first and is copied, the
  // others (a share's head) are added after it, and the piece that reaches its last row completes it.
  void finish() {
    if (whole_) return;
    const int64_t M = M_, C = C_, R = R_;
    auto piece = [&](int64_t p, const float* part, bool add, bool last_piece) {
      for (int64_t m = 0; m < M; ++m) {
        float* yp = y_ + m * C + p * PW;
        const float* pp = part + m * PW;
        for (int64_t c = 0; c < PW; ++c) yp[c] = add ? yp[c] + pp[c] : pp[c];
        if (last_piece && s_)
          for (int64_t c = 0; c < PW; ++c) yp[c] *= s_[p * PW + c];
      }
    };
    for (int64_t i = 0; i < shares_; ++i) {
      const auto [lo, hi] = chunk_range(units_, align_, shares_, i);
      if (lo == hi) continue;
      const int64_t first = lo / R, last = (hi - 1) / R;
      const float *head = cut_ + (2 * i) * M * PW, *tail = head + M * PW;
      if (lo % R != 0) piece(first, head, true, last != first || hi % R == 0);  // starts inside `first`
      if (hi % R != 0 && (last != first || lo % R == 0)) piece(last, tail, false, false);  // [its row 0, inside)
    }
  }

 private:
  // rows [r0, r1) of panel p into yp (rows of y ys apart), scaled by sp unless null
  void rows(int64_t p, int64_t r0, int64_t r1, const float* sp, float* yp, int64_t ys) {
#ifdef MESHLM_VNNI
    if constexpr (std::is_same_v<W, int8_t>)
      if (vnni_) return packed1_vnni(terms_, q_ + p * R_ * PW, sp, yp, r0, r1);
#endif
    panel_rows(x_, R_, q_ + p * R_ * PW, sp, yp, ys, M_, r0, r1);
  }

  const float* x_;
  const W* q_;
  const float* s_;
  float* y_;
  const int64_t M_, R_, C_;
  const bool whole_;
  int64_t units_ = 0, align_ = 1, shares_ = 1, panels_ = 1;
  float* cut_ = nullptr;  // per share: the partial sums of its first and last panels (use)
#ifdef MESHLM_VNNI
  RowTerms terms_;  // one row of int8 weights: integer dot products (packed1_vnni)
  bool vnni_ = false;
#endif
};

template <typename W>
void packed_split(ffi::ThreadPool& pool, const float* x, const W* q, const float* s, float* y, int64_t M, int64_t R,
                  int64_t C) {
  PackedMatmul<W> mm(pool, x, q, s, y, M, R, C);
  std::vector<float> cut(mm.scratch());
  mm.use(cut.data());
  mm.prepare();
  run_split_indexed(pool, 1, 1, mm.shares(), [&](int64_t i, int64_t, int64_t) { mm.share(i); });
  mm.finish();
}

}  // namespace matmul
}  // namespace meshlm
