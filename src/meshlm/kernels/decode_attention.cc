// Decode attention for XLA:CPU, registered as an XLA FFI custom call (the kernel: attention.h).
//
//   meshlm_decode_attention: q f32 [B, K, G, D], k, v f32|bf16 [B, S, K, D] (the KV cache as stored),
//                            positions s32 [B]; attribute scale -> o f32 [B, K, G, D]
//
// XLA:CPU's own dots made transposed copies of the whole cache every layer and ran at 2-4 GB/s.

#include <algorithm>
#include <string>

#include "attention.h"
#include "ffi_common.h"

namespace {

namespace ffi = xla::ffi;
using meshlm::failed;
using meshlm::shape_str;

ffi::Future DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                            ffi::AnyBuffer v, ffi::Buffer<ffi::S32> positions,
                            float scale, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = out->dimensions();
  const bool ok = qd.size() == 4 && kd.size() == 4 && vd.size() == 4 && od.size() == 4 &&
                  positions.dimensions().size() == 1;
  if (!ok) return failed(ffi::Error::InvalidArgument("decode attention wants q, k, v, o 4-D, positions 1-D"));
  const int64_t B = qd[0], K = qd[1], G = qd[2], D = qd[3], S = kd[1];
  bool match = kd[0] == B && kd[2] == K && kd[3] == D && positions.dimensions()[0] == B;
  for (int i = 0; i < 4; ++i) match = match && vd[i] == kd[i] && od[i] == qd[i];
  if (!match)
    return failed(ffi::Error::InvalidArgument("decode attention shape mismatch: q " + shape_str(qd) + ", k " +
                                              shape_str(kd) + ", v " + shape_str(vd) + ", o " + shape_str(od)));
  const auto kt = k.element_type();
  if ((kt != ffi::DataType::F32 && kt != ffi::DataType::BF16) || v.element_type() != kt)
    return failed(ffi::Error::InvalidArgument("decode attention wants k and v both f32 or both bf16"));
  float* op = out->typed_data();
  if (B * K * G * D == 0 || S == 0) {
    std::fill(op, op + B * K * G * D, 0.f);
    return meshlm::done_future();
  }
  if (kt == ffi::DataType::F32)
    meshlm::attention::decode_attend(pool, B, S, K, G, D, q.typed_data(), static_cast<const float*>(k.untyped_data()),
                                     static_cast<const float*>(v.untyped_data()), positions.typed_data(), scale, op);
  else
    meshlm::attention::decode_attend(pool, B, S, K, G, D, q.typed_data(),
                                     static_cast<const meshlm::attention::bf16*>(k.untyped_data()),
                                     static_cast<const meshlm::attention::bf16*>(v.untyped_data()),
                                     positions.typed_data(), scale, op);
  return meshlm::done_future();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(meshlm_decode_attention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

