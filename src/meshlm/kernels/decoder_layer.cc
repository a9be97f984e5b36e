// One whole decoder layer of a decode step on one CPU device, as one XLA FFI custom call: the
// Llama family's serial block (RMSNorm, rotary attention with grouped KV heads, gated SiLU FFN,
// no biases) with weights packed panel-major (matmul.h: matmul_packed), int8 with per-column
// scales or f32 (scales then empty), and an f32 or bf16 cache.
//
//   meshlm_decoder_layer:
//     x f32 [B, E]                    the residual stream, one token per sequence
//     positions s32 [B]               where each token goes in the cache (written when < S)
//     cos, sin f32 [B, R/2]           RoPE at those positions, on the first R dims of each head
//     norm1 f32 [E]                   attention RMSNorm scale
//     w_qkv s8|f32 [(H+2K)D/64, E, 64]  fused q|k|v projection, s_qkv f32 [(H+2K)D] column scales
//     w_o s8|f32 [E/64, HD, 64]       attention output, s_o f32 [E]
//     norm2 f32 [E]                   FFN RMSNorm scale
//     w_gu s8|f32 [2F/64, E, 64]      fused gate|up, s_gu f32 [2F]
//     w_d s8|f32 [E/64, F, 64]        FFN output, s_d f32 [E] (f32 weights: every s_* is [0])
//     k, v f32|bf16 [B, S, K, D]      this layer's cache, updated in place (aliased to results 1, 2);
//                                     a bf16 cache is written rounded to nearest even, as XLA's convert
//     attributes: eps, rope_half (1: rotate halves, 0: interleaved pairs)
//   -> x' f32 [B, E], k', v'
//
// Why one call: a batch-1 step through XLA ran ~330 small fusions and ~150 kernel calls, ~2.5 ms of
// an 8.8 ms step beside ~6.2 ms of weight streaming. Here the elementwise work (norms, RoPE, cache
// writes, SiLU, residuals) runs between the matmuls on the calling thread while the pool helper
// lingers (ffi_common.h), and the matmuls and attention split over both.
// The arithmetic follows meshlm.model / sharded_body.py step by step (f32 throughout, the cache in
// its own dtype), so the result matches the XLA path to f32 rounding.

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "attention.h"
#include "ffi_common.h"
#include "matmul.h"

namespace {

namespace ffi = xla::ffi;
using meshlm::failed;
using meshlm::run_split;
using meshlm::shape_str;
using meshlm::matmul::packed_split;
using meshlm::matmul::PW;
using meshlm::attention::bf16;

using F32 = ffi::Buffer<ffi::F32>;
using W = ffi::AnyBuffer;  // a packed weight: int8 (with column scales) or f32 (scales empty)

// out = x * rsqrt(mean(x^2) + eps) * g over one row of E (as model.apply_norm).
void rms_norm(const float* x, const float* g, float eps, int64_t E, float* out) {
  float ss = 0.f;
  int64_t e = 0;
#ifdef MESHLM_AVX512
  __m512 acc = _mm512_setzero_ps();  // 16 partial sums: one dependent add per element took ~4 cycles
  for (; e + 16 <= E; e += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + e), _mm512_loadu_ps(x + e), acc);
  ss = _mm512_reduce_add_ps(acc);
#elif defined(MESHLM_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; e + 8 <= E; e += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + e), _mm256_loadu_ps(x + e), acc);
  ss = meshlm::attention::hsum(acc);
#endif
  for (; e < E; ++e) ss += x[e] * x[e];
  const float r = 1.f / std::sqrt(ss / float(E) + eps);
  for (int64_t e = 0; e < E; ++e) out[e] = x[e] * r * g[e];
}

// RoPE on the first 2 * R2 dims of each of n heads of D at x (as model.rotary).
void rope(float* x, int64_t n, int64_t D, const float* cos, const float* sin, int64_t R2, bool half) {
  for (int64_t h = 0; h < n; ++h, x += D)
    for (int64_t i = 0; i < R2; ++i) {
      const int64_t ia = half ? i : 2 * i, ib = half ? i + R2 : 2 * i + 1;
      const float a = x[ia], b = x[ib];
      x[ia] = a * cos[i] - b * sin[i];
      x[ib] = b * cos[i] + a * sin[i];
    }
}

// h = silu(g) * u over n elements.
void silu_mul(const float* g, const float* u, float* h, int64_t n) {
  int64_t i = 0;
#ifdef MESHLM_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, meshlm::attention::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    _mm512_storeu_ps(h + i, _mm512_mul_ps(_mm512_mul_ps(x, sig), _mm512_loadu_ps(u + i)));
  }
#elif defined(MESHLM_AVX2)
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, meshlm::attention::exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) h[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// y [M, C] = x [M, R] @ w (packed [C/PW, R, PW], int8 or f32) * s (int8: the column scales; f32:
// none), columns split over the pool.
void matmul(ffi::ThreadPool& pool, const float* x, const ffi::AnyBuffer& w, F32& s, float* y, int64_t M, int64_t R,
            int64_t C) {
  if (w.element_type() == ffi::DataType::S8)
    packed_split(pool, x, static_cast<const int8_t*>(w.untyped_data()), s.typed_data(), y, M, R, C);
  else
    packed_split(pool, x, static_cast<const float*>(w.untyped_data()), nullptr, y, M, R, C);
}

// fn(b) for rows b < B, split over the pool when the rows' `bytes` are worth it (run_split runs
// small work inline): at batch 64 the per-row work between the matmuls was ~5 ms of a step on
// the calling thread alone.
template <typename Fn>
void each_row(ffi::ThreadPool& pool, int64_t B, int64_t bytes, Fn fn) {
  run_split(pool, B, 1, bytes, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) fn(b);
  });
}

bool dims_are(ffi::Span<const int64_t> d, std::initializer_list<int64_t> want) {
  if (d.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want)
    if (d[i++] != w) return false;
  return true;
}

ffi::Future DecoderLayer(ffi::ThreadPool pool, F32 x, ffi::Buffer<ffi::S32> positions, F32 cos, F32 sin, F32 norm1,
                         W w_qkv, F32 s_qkv, W w_o, F32 s_o, F32 norm2, W w_gu, F32 s_gu, W w_d, F32 s_d,
                         ffi::AnyBuffer k_in, ffi::AnyBuffer v_in, float eps, int32_t rope_half,
                         ffi::ResultBuffer<ffi::F32> x_out, ffi::Result<ffi::AnyBuffer> k_out,
                         ffi::Result<ffi::AnyBuffer> v_out) {
  auto xd = x.dimensions(), kd = k_in.dimensions(), qkv_d = w_qkv.dimensions(), gu_d = w_gu.dimensions();
  if (xd.size() != 2 || kd.size() != 4 || qkv_d.size() != 3 || gu_d.size() != 3 || cos.dimensions().size() != 2)
    return failed(ffi::Error::InvalidArgument("decoder layer wants x [B, E], a [B, S, K, D] cache, packed weights"));
  const int64_t B = xd[0], E = xd[1], S = kd[1], K = kd[2], D = kd[3];
  const int64_t Cq = qkv_d[0] * PW, H = Cq / D - 2 * K, F = gu_d[0] * PW / 2, R2 = cos.dimensions()[1];
  const auto wt = w_qkv.element_type();
  const bool int8 = wt == ffi::DataType::S8;
  const int64_t ns = int8 ? 1 : 0;  // scales: one per column (int8), none (f32)
  const bool types = (int8 || wt == ffi::DataType::F32) && w_o.element_type() == wt &&
                     w_gu.element_type() == wt && w_d.element_type() == wt;
  if (!types)
    return failed(ffi::Error::InvalidArgument("decoder layer wants four packed weights, all int8 or all f32"));
  const auto ct = k_in.element_type();
  if ((ct != ffi::DataType::F32 && ct != ffi::DataType::BF16) || v_in.element_type() != ct ||
      k_out->element_type() != ct || v_out->element_type() != ct)
    return failed(ffi::Error::InvalidArgument("decoder layer wants the k and v cache both f32 or both bf16"));
  const bool ok = H > 0 && H % K == 0 && (H + 2 * K) * D == Cq && 2 * R2 <= D && kd[0] == B &&
                  dims_are(positions.dimensions(), {B}) && dims_are(cos.dimensions(), {B, R2}) &&
                  dims_are(sin.dimensions(), {B, R2}) && dims_are(norm1.dimensions(), {E}) &&
                  dims_are(norm2.dimensions(), {E}) && dims_are(qkv_d, {Cq / PW, E, PW}) &&
                  dims_are(s_qkv.dimensions(), {ns * Cq}) && dims_are(w_o.dimensions(), {E / PW, H * D, PW}) &&
                  dims_are(s_o.dimensions(), {ns * E}) && dims_are(gu_d, {2 * F / PW, E, PW}) &&
                  dims_are(s_gu.dimensions(), {ns * 2 * F}) && dims_are(w_d.dimensions(), {E / PW, F, PW}) &&
                  dims_are(s_d.dimensions(), {ns * E}) && E % PW == 0 && dims_are(v_in.dimensions(), {B, S, K, D}) &&
                  dims_are(x_out->dimensions(), {B, E}) && dims_are(k_out->dimensions(), {B, S, K, D}) &&
                  dims_are(v_out->dimensions(), {B, S, K, D});
  if (!ok)
    return failed(ffi::Error::InvalidArgument("decoder layer shape mismatch: x " + shape_str(xd) + ", cache " +
                                              shape_str(kd) + ", w_qkv " + shape_str(qkv_d) + ", w_o " +
                                              shape_str(w_o.dimensions()) + ", w_gu " + shape_str(gu_d) +
                                              ", w_d " + shape_str(w_d.dimensions()) + ", cos " +
                                              shape_str(cos.dimensions())));
  if (B == 0) return meshlm::done_future();
  const float* xp = x.typed_data();
  const int32_t* pos = positions.typed_data();
  float* y = x_out->typed_data();
  const int64_t HD = H * D, KD = K * D;

  // scratch reused across calls (one per calling thread: simulated devices may call concurrently)
  thread_local std::vector<float> scratch;
  scratch.resize(B * (E + Cq + 2 * HD + 2 * F + F + E));
  float* xn = scratch.data();   // [B, E] normed input
  float* qkv = xn + B * E;      // [B, Cq]
  float* q = qkv + B * Cq;      // [B, HD] roped queries
  float* o = q + B * HD;        // [B, HD] attention output
  float* gu = o + B * HD;       // [B, 2F]
  float* h = gu + 2 * B * F;    // [B, F]
  float* t = h + B * F;         // [B, E] an output projection

  // attention half: y = x + (attend(rope(norm(x) @ w_qkv)) @ w_o)
  const float *g1 = norm1.typed_data(), *g2 = norm2.typed_data();
  each_row(pool, B, B * E * 8, [&](int64_t b) { rms_norm(xp + b * E, g1, eps, E, xn + b * E); });
  matmul(pool, xn, w_qkv, s_qkv, qkv, B, E, Cq);
  auto attend = [&](auto* kc, auto* vc) {  // kc, vc: float* or bf16*, the cache as stored
    each_row(pool, B, B * Cq * 8, [&](int64_t b) {  // each row writes only its own cache row
      float* row = qkv + b * Cq;
      const float *cb = cos.typed_data() + b * R2, *sb = sin.typed_data() + b * R2;
      rope(row, H, D, cb, sb, R2, rope_half != 0);
      rope(row + HD, K, D, cb, sb, R2, rope_half != 0);
      std::copy(row, row + HD, q + b * HD);
      if (pos[b] >= 0 && pos[b] < S) {
        meshlm::attention::store_row(row + HD, kc + (b * S + pos[b]) * KD, KD);
        meshlm::attention::store_row(row + HD + KD, vc + (b * S + pos[b]) * KD, KD);
      }
    });
    meshlm::attention::decode_attend(pool, B, S, K, H / K, D, q, kc, vc, pos, 1.f / std::sqrt(float(D)), o);
  };
  if (ct == ffi::DataType::F32)
    attend(static_cast<float*>(k_out->untyped_data()), static_cast<float*>(v_out->untyped_data()));
  else
    attend(static_cast<bf16*>(k_out->untyped_data()), static_cast<bf16*>(v_out->untyped_data()));
  matmul(pool, o, w_o, s_o, t, B, HD, E);

  // FFN half: y += (silu(norm(y) @ w_gate) * (norm(y) @ w_up)) @ w_d
  each_row(pool, B, B * E * 12, [&](int64_t b) {
    for (int64_t e = b * E; e < (b + 1) * E; ++e) y[e] = xp[e] + t[e];
    rms_norm(y + b * E, g2, eps, E, xn + b * E);
  });
  matmul(pool, xn, w_gu, s_gu, gu, B, E, 2 * F);
  each_row(pool, B, B * F * 12, [&](int64_t b) { silu_mul(gu + b * 2 * F, gu + b * 2 * F + F, h + b * F, F); });
  matmul(pool, h, w_d, s_d, t, B, F, E);
  each_row(pool, B, B * E * 8, [&](int64_t b) {
    for (int64_t e = b * E; e < (b + 1) * E; ++e) y[e] += t[e];
  });
  return meshlm::done_future();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(meshlm_decoder_layer, DecoderLayer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()                      // x
                                  .Arg<ffi::Buffer<ffi::S32>>()    // positions
                                  .Arg<F32>()                      // cos
                                  .Arg<F32>()                      // sin
                                  .Arg<F32>()                      // norm1
                                  .Arg<W>()                        // w_qkv
                                  .Arg<F32>()                      // s_qkv
                                  .Arg<W>()                        // w_o
                                  .Arg<F32>()                      // s_o
                                  .Arg<F32>()                      // norm2
                                  .Arg<W>()                        // w_gu
                                  .Arg<F32>()                      // s_gu
                                  .Arg<W>()                        // w_d
                                  .Arg<F32>()                      // s_d
                                  .Arg<ffi::AnyBuffer>()           // k cache
                                  .Arg<ffi::AnyBuffer>()           // v cache
                                  .Attr<float>("eps")
                                  .Attr<int32_t>("rope_half")
                                  .Ret<F32>()                      // x'
                                  .Ret<ffi::AnyBuffer>()           // k cache (aliased)
                                  .Ret<ffi::AnyBuffer>());         // v cache (aliased)

// Which of the headers' code paths this library was compiled with (matmul.h and attention.h pick
// the same one): "avx512", "avx2" or "portable".
extern "C" const char* meshlm_kernel_isa() {
#if defined(MESHLM_AVX512)
  return "avx512";
#elif defined(MESHLM_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}
