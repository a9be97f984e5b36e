// Weight-streaming matmuls for XLA:CPU, registered as XLA FFI custom calls (kernels: matmul.h).
//
//   meshlm_int8_matmul:   x f32 [M, R], q s8 [R, C] -> y f32 [M, C] = x @ q
//   meshlm_int8_matmul_t: x f32 [M, R], q s8 [C, R] -> y f32 [M, C] = x @ q.T
//   meshlm_int8_matmul_p: x f32 [M, R], q s8 [C / 64, R, 64] (panel-major) -> y f32 [M, C] = x @ q
//   meshlm_f32_matmul_p:  the same for q f32 [C / 64, R, 64]
//
// Unscaled: the caller applies the per-column scale. Work is split over the XLA:CPU intra-op
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

enum class Layout { kRows, kTransposed, kPacked };

ffi::Future Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                       ffi::ResultBuffer<ffi::F32> y, Layout layout) {
  auto xd = x.dimensions(), qd = q.dimensions(), yd = y->dimensions();
  const size_t q_rank = layout == Layout::kPacked ? 3 : 2;
  if (xd.size() != 2 || qd.size() != q_rank || yd.size() != 2)
    return failed(ffi::Error::InvalidArgument("int8 matmul wants 2-D f32 x and y, a " + std::to_string(q_rank) +
                                              "-D q"));
  const int64_t M = xd[0], R = xd[1];
  int64_t C = 0, q_rows = 0;
  switch (layout) {
    case Layout::kRows: q_rows = qd[0], C = qd[1]; break;
    case Layout::kTransposed: q_rows = qd[1], C = qd[0]; break;
    case Layout::kPacked: q_rows = qd[2] == PW ? qd[1] : -1, C = qd[0] * PW; break;
  }
  if (q_rows != R || yd[0] != M || yd[1] != C)
    return failed(ffi::Error::InvalidArgument("int8 matmul shape mismatch: x " + shape_str(xd) + ", q " +
                                              shape_str(qd) + ", y " + shape_str(yd)));
  const float* xp = x.typed_data();
  const int8_t* qp = q.typed_data();
  float* yp = y->typed_data();
  if (M == 0 || C == 0) return meshlm::done_future();
  if (R == 0) {
    std::fill(yp, yp + M * C, 0.f);
    return meshlm::done_future();
  }
  switch (layout) {
    case Layout::kTransposed:
      return run_split(pool, C, 2 * CT, R * C,
                       [=](int64_t lo, int64_t hi) { matmul_t_rows(xp, qp, yp, M, R, C, lo, hi); });
    case Layout::kPacked:
      return run_split(pool, C, PW, R * C,
                       [=](int64_t lo, int64_t hi) { matmul_packed(xp, qp, nullptr, yp, M, R, C, lo, hi); });
    default:
      return run_split(pool, C, PW, R * C,  // PW: 576 columns are 9 units, not 5 (a 3:2 split over 2 threads)
                       [=](int64_t lo, int64_t hi) { matmul_cols(xp, qp, yp, M, R, C, lo, hi); });
  }
}

// x f32 [M, R] @ q f32 [C / PW, R, PW] (packed) -> y [M, C].
ffi::Future F32Packed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> q,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || qd.size() != 3 || yd.size() != 2 || qd[2] != PW || qd[1] != xd[1] || yd[0] != xd[0] ||
      yd[1] != qd[0] * PW)
    return failed(ffi::Error::InvalidArgument("f32 packed matmul shape mismatch: x " + shape_str(xd) + ", q " +
                                              shape_str(qd) + ", y " + shape_str(yd)));
  const int64_t M = xd[0], R = xd[1], C = yd[1];
  const float *xp = x.typed_data(), *qp = q.typed_data();
  float* yp = y->typed_data();
  if (M == 0 || C == 0) return meshlm::done_future();
  if (R == 0) {
    std::fill(yp, yp + M * C, 0.f);
    return meshlm::done_future();
  }
  return run_split(pool, C, PW, 4 * R * C,
                   [=](int64_t lo, int64_t hi) { matmul_packed(xp, qp, nullptr, yp, M, R, C, lo, hi); });
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(meshlm_int8_matmul_p, Handler<Layout::kPacked>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(meshlm_f32_matmul_p, F32Packed,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<
                                  ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
