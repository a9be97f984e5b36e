// Weight-streaming matmuls for XLA:CPU, registered as XLA FFI custom calls (kernels: matmul.h).
//
//   meshlm_int8_matmul:   x f32 [M, R], q s8 [R, C] -> y f32 [M, C] = x @ q
//   meshlm_int8_matmul_t: x f32 [M, R], q s8 [C, R] -> y f32 [M, C] = x @ q.T
//   meshlm_int8_matmul_p: x f32 [M, R], q s8 [C / 64, R, 64] (panel-major), s f32 [C] or [0]
//                         -> y f32 [M, C] = (x @ q) * s
//   meshlm_f32_matmul_p:  the same for q f32 [C / 64, R, 64]
//
// The row-major ones are unscaled: the caller applies the per-column scale. Work is split over the XLA:CPU intra-op
// thread pool (ffi_common.h: run_split).

#include <algorithm>
#include <cstdint>
#include <string>

#include "ffi_common.h"
#include "matmul.h"

namespace {

namespace ffi = xla::ffi;
using meshlm::failed;
using meshlm::run_split;
using meshlm::shape_str;
using namespace meshlm::matmul;

enum class Layout { kRows, kTransposed };

// An empty product: nothing to do (M or C is 0) or y = 0 (R is 0). True when it was one.
bool empty_product(int64_t M, int64_t R, int64_t C, float* y) {
  if (M != 0 && C != 0 && R != 0) return false;
  if (M != 0 && C != 0) std::fill(y, y + M * C, 0.f);
  return true;
}

ffi::Future Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                       ffi::ResultBuffer<ffi::F32> y, Layout layout) {
  auto xd = x.dimensions(), qd = q.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || qd.size() != 2 || yd.size() != 2)
    return failed(ffi::Error::InvalidArgument("int8 matmul wants 2-D x, q, y"));
  const int64_t M = xd[0], R = xd[1];
  int64_t C = 0, q_rows = 0;
  switch (layout) {
    case Layout::kRows: q_rows = qd[0], C = qd[1]; break;
    case Layout::kTransposed: q_rows = qd[1], C = qd[0]; break;
  }
  if (q_rows != R || yd[0] != M || yd[1] != C)
    return failed(ffi::Error::InvalidArgument("int8 matmul shape mismatch: x " + shape_str(xd) + ", q " +
                                              shape_str(qd) + ", y " + shape_str(yd)));
  const float* xp = x.typed_data();
  const int8_t* qp = q.typed_data();
  float* yp = y->typed_data();
  if (empty_product(M, R, C, yp)) return meshlm::done_future();
  switch (layout) {
    case Layout::kTransposed:
      return run_split(pool, C, 2 * CT, R * C,
                       [=](int64_t lo, int64_t hi) { matmul_t_rows(xp, qp, yp, M, R, C, lo, hi); });
    default:
      return run_split(pool, C, PW, R * C,  // PW: 576 columns are 9 units, not 5 (a 3:2 split over 2 threads)
                       [=](int64_t lo, int64_t hi) { matmul_cols(xp, qp, yp, M, R, C, lo, hi); });
  }
}

// x f32 [M, R] @ q [C / PW, R, PW] (packed; int8 or f32) * s (per column; [0]: none) -> y [M, C].
template <ffi::DataType T>
ffi::Future Packed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> q, ffi::Buffer<ffi::F32> s,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = s.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || qd.size() != 3 || yd.size() != 2 || sd.size() != 1 || qd[2] != PW || qd[1] != xd[1] ||
      yd[0] != xd[0] || yd[1] != qd[0] * PW || (sd[0] != 0 && sd[0] != yd[1]))
    return failed(ffi::Error::InvalidArgument("packed matmul shape mismatch: x " + shape_str(xd) + ", q " +
                                              shape_str(qd) + ", s " + shape_str(sd) + ", y " + shape_str(yd)));
  const int64_t M = xd[0], R = xd[1], C = yd[1];
  const float *xp = x.typed_data(), *sp = sd[0] ? s.typed_data() : nullptr;
  const auto* qp = q.typed_data();
  float* yp = y->typed_data();
  if (!empty_product(M, R, C, yp)) packed_split(pool, xp, qp, sp, yp, M, R, C);
  return meshlm::done_future();
}

constexpr auto PackedS8 = Packed<ffi::DataType::S8>;
constexpr auto PackedF32 = Packed<ffi::DataType::F32>;

template <ffi::DataType T>
auto PackedBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

template <Layout L>
ffi::Future Handler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q, ffi::ResultBuffer<ffi::F32> y) {
  return Int8Matmul(pool, x, q, y, L);
}

auto Binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S8>>().Ret<
      ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(meshlm_int8_matmul, Handler<Layout::kRows>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(meshlm_int8_matmul_t, Handler<Layout::kTransposed>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(meshlm_int8_matmul_p, PackedS8, PackedBinding<ffi::DataType::S8>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(meshlm_f32_matmul_p, PackedF32, PackedBinding<ffi::DataType::F32>());
