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
// an 8.8 ms step beside ~6.2 ms of weight streaming. Here the layer is one task of phases
// (ffi_common.h: Team): the matmuls and the attention split over the threads, and the elementwise
// work (norms, RoPE, cache writes, SiLU, residuals) runs between them on whichever thread finished
// the phase before, while the others spin until the next phase opens.
// The arithmetic follows meshlm.model / sharded_body.py step by step (f32 throughout, the cache in
// its own dtype), so the result matches the XLA path to f32 rounding.

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "ffi_common.h"
#include "matmul.h"

namespace {

namespace ffi = xla::ffi;
using meshlm::failed;
using meshlm::shape_str;
using meshlm::matmul::PackedMatmul;
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

bool dims_are(ffi::Span<const int64_t> d, std::initializer_list<int64_t> want) {
  if (d.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want)
    if (d[i++] != w) return false;
  return true;
}

// One call's shapes, inputs and scratch (DecoderLayer) for layer().
struct Step {
  int64_t B, E, S, K, H, D, Cq, F, R2;
  float eps;
  bool rope_half;
  const float* x;
  const int32_t* pos;
  const float *cos, *sin, *g1, *g2, *s_qkv, *s_o, *s_gu, *s_d;  // s_*: null (f32 weights) unless int8
  float *y, *xn, *qkv, *q, *o, *gu, *h, *t;
};

// The layer as one Team (ffi_common.h): each matmul and the attention a phase of shares, the
// per-row work between them serial work of the phase before, or phases of row ranges when the rows
// are worth splitting (at batch 64 that work was ~5 ms of a step on one thread alone). Wt: int8_t
// or float weights; T: float or bf16 cache (kc, vc: the cache as stored).
template <typename Wt, typename T>
void layer(ffi::ThreadPool& pool, const Step& a, const Wt* w_qkv, const Wt* w_o, const Wt* w_gu, const Wt* w_d, T* kc,
           T* vc) {
  const int64_t B = a.B, E = a.E, S = a.S, K = a.K, H = a.H, D = a.D, Cq = a.Cq, F = a.F, R2 = a.R2;
  const int64_t HD = H * D, KD = K * D;
  auto scales = [](const float* s) { return std::is_same_v<Wt, int8_t> ? s : nullptr; };
  PackedMatmul<Wt> mm_qkv(pool, a.xn, w_qkv, scales(a.s_qkv), a.qkv, B, E, Cq);
  PackedMatmul<Wt> mm_o(pool, a.o, w_o, scales(a.s_o), a.t, B, HD, E);
  PackedMatmul<Wt> mm_gu(pool, a.xn, w_gu, scales(a.s_gu), a.gu, B, E, 2 * F);
  PackedMatmul<Wt> mm_d(pool, a.h, w_d, scales(a.s_d), a.t, B, F, E);
  meshlm::attention::DecodeAttention<T> att(pool, B, S, K, H / K, D, a.q, kc, vc, a.pos, 1.f / std::sqrt(float(D)),
                                            a.o);
  // the matmuls' scratch, reused across calls (at batch 64 the four hold 1 MB: fresh pages every call)
  thread_local std::vector<float> cut;
  cut.resize(mm_qkv.scratch() + mm_o.scratch() + mm_gu.scratch() + mm_d.scratch());
  float* c = cut.data();
  for (PackedMatmul<Wt>* mm : {&mm_qkv, &mm_o, &mm_gu, &mm_d}) mm->use(c), c += mm->scratch();
  meshlm::Team& team = meshlm::Team::local();
  auto matmul = [&](PackedMatmul<Wt>& mm) {
    team.then([&mm] { mm.prepare(); });
    team.phase(mm.shares(), [&mm](int64_t i) { mm.share(i); }, [&mm](int64_t i) { mm.warm(i); });
    team.then([&mm] { mm.finish(); });
  };
  // attention half: y = x + (attend(rope(norm(x) @ w_qkv)) @ w_o)
  team.rows(pool, B, B * E * 8, [&a, E](int64_t b) { rms_norm(a.x + b * E, a.g1, a.eps, E, a.xn + b * E); });
  matmul(mm_qkv);
  team.rows(pool, B, B * Cq * 8, [&a, kc, vc, Cq, HD, KD, H, K, D, R2, S](int64_t b) {
    float* row = a.qkv + b * Cq;  // each row writes only its own cache row
    const float *cb = a.cos + b * R2, *sb = a.sin + b * R2;
    rope(row, H, D, cb, sb, R2, a.rope_half);
    rope(row + HD, K, D, cb, sb, R2, a.rope_half);
    std::copy(row, row + HD, a.q + b * HD);
    if (a.pos[b] >= 0 && a.pos[b] < S) {
      meshlm::attention::store_row(row + HD, kc + (b * S + a.pos[b]) * KD, KD);
      meshlm::attention::store_row(row + HD + KD, vc + (b * S + a.pos[b]) * KD, KD);
    }
  });
  team.phase(att.shares(), [&att](int64_t i) { att.share(i); }, [&att](int64_t i) { att.warm(i); });
  matmul(mm_o);
  // FFN half: y += (silu(norm(y) @ w_gate) * (norm(y) @ w_up)) @ w_d
  team.rows(pool, B, B * E * 12, [&a, E](int64_t b) {
    for (int64_t e = b * E; e < (b + 1) * E; ++e) a.y[e] = a.x[e] + a.t[e];
    rms_norm(a.y + b * E, a.g2, a.eps, E, a.xn + b * E);
  });
  matmul(mm_gu);
  team.rows(pool, B, B * F * 12, [&a, F](int64_t b) { silu_mul(a.gu + b * 2 * F, a.gu + b * 2 * F + F, a.h + b * F, F); });
  matmul(mm_d);
  team.rows(pool, B, B * E * 8, [&a, E](int64_t b) {
    for (int64_t e = b * E; e < (b + 1) * E; ++e) a.y[e] += a.t[e];
  });
  team.run(pool);
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
  const int64_t HD = H * D;

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

  const Step st{B, E, S, K, H, D, Cq, F, R2, eps, rope_half != 0, xp, pos, cos.typed_data(), sin.typed_data(),
                norm1.typed_data(), norm2.typed_data(), s_qkv.typed_data(), s_o.typed_data(), s_gu.typed_data(),
                s_d.typed_data(), y, xn, qkv, q, o, gu, h, t};
  auto with_cache = [&](auto* w) {
    using Wt = std::remove_pointer_t<decltype(w)>;
    const Wt *wq = static_cast<const Wt*>(w_qkv.untyped_data()), *wo = static_cast<const Wt*>(w_o.untyped_data()),
             *wgu = static_cast<const Wt*>(w_gu.untyped_data()), *wd = static_cast<const Wt*>(w_d.untyped_data());
    if (ct == ffi::DataType::F32)
      layer(pool, st, wq, wo, wgu, wd, static_cast<float*>(k_out->untyped_data()),
            static_cast<float*>(v_out->untyped_data()));
    else
      layer(pool, st, wq, wo, wgu, wd, static_cast<bf16*>(k_out->untyped_data()),
            static_cast<bf16*>(v_out->untyped_data()));
  };
  if (int8)
    with_cache(static_cast<int8_t*>(nullptr));
  else
    with_cache(static_cast<float*>(nullptr));
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
