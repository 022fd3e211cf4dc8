// C entry points for the ops a compiled decode step calls, so that inductor's C++ wrapper
// (torch.compile's `cpp_wrapper`, qdsl/runtime/compiled.py) calls each one directly
// instead of through its proxy executor, which looks the op up by name and boxes its
// arguments on every call (slower than the Python wrapper it replaces).
//
// The names and argument conventions are inductor's for custom ops with C shims
// (config.aot_inductor.custom_ops_to_c_shims; `aoti_torch_<device>_<op>`): a Tensor is an
// AtenTensorHandle, a Tensor? a pointer to one (null: None), a Tensor[] a pointer and a
// length, a Tensor?[] an array of pointers and a length, an int int64_t, a float double,
// a bool int32_t, the result written through the last argument as a new handle. The
// declarations inductor needs (compiled.C_SHIMS) must match these signatures exactly.
//
// This file is compiled after qdsl_kernels.cpp and qdsl_w4a8.cpp in one translation unit
// (cext.SOURCES), so it calls their functions directly.
#include "qdsl_common.h"
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

namespace {
using torch::aot_inductor::new_tensor_handle;
using torch::aot_inductor::tensor_handle_to_tensor_pointer;

inline const at::Tensor& tensor_of(AtenTensorHandle h) {
  return *tensor_handle_to_tensor_pointer(h);
}

inline c10::optional<at::Tensor> optional_of(const AtenTensorHandle* h) {
  return h ? c10::optional<at::Tensor>(tensor_of(*h)) : c10::nullopt;
}

inline std::vector<at::Tensor> list_of(const AtenTensorHandle* h, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) out.push_back(tensor_of(h[i]));
  return out;
}

inline c10::List<c10::optional<at::Tensor>> optional_list_of(const AtenTensorHandle** h,
                                                            int64_t n) {
  c10::List<c10::optional<at::Tensor>> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) out.push_back(optional_of(h[i]));
  return out;
}
}  // namespace

extern "C" {

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_w8a8_linear(
    AtenTensorHandle xq, AtenTensorHandle x_scale, AtenTensorHandle* x_zp, AtenTensorHandle w,
    AtenTensorHandle w_scale, AtenTensorHandle* w_rowsum, AtenTensorHandle* bias, int64_t isa,
    AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret = new_tensor_handle(w8a8_linear(tensor_of(xq), tensor_of(x_scale), optional_of(x_zp),
                                         tensor_of(w), tensor_of(w_scale),
                                         optional_of(w_rowsum), optional_of(bias), isa));
  });
}

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_w8a8_linear_cat(
    AtenTensorHandle xq, AtenTensorHandle x_scale, AtenTensorHandle* x_zp,
    const AtenTensorHandle* w, int64_t n_w, const AtenTensorHandle* w_scale, int64_t n_scale,
    const AtenTensorHandle** w_rowsum, int64_t n_rowsum, const AtenTensorHandle** bias,
    int64_t n_bias, int64_t isa, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret = new_tensor_handle(w8a8_linear_cat(
        tensor_of(xq), tensor_of(x_scale), optional_of(x_zp), list_of(w, n_w),
        list_of(w_scale, n_scale), optional_list_of(w_rowsum, n_rowsum),
        optional_list_of(bias, n_bias), isa));
  });
}

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_cached_decode_attention(
    AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v, AtenTensorHandle* mask,
    AtenTensorHandle cache_position, double scale, int64_t isa, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret = new_tensor_handle(cached_decode_attention(tensor_of(q), tensor_of(k), tensor_of(v),
                                                     optional_of(mask),
                                                     tensor_of(cache_position), scale, isa));
  });
}

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_w4a8_linear(
    AtenTensorHandle x, AtenTensorHandle packed, AtenTensorHandle scale, int64_t gs,
    AtenTensorHandle* bias, int32_t per_token, int64_t isa, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret = new_tensor_handle(w4a8_linear(tensor_of(x), tensor_of(packed), tensor_of(scale), gs,
                                         optional_of(bias), per_token != 0, isa));
  });
}

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_w4a8_linear_cat(
    AtenTensorHandle x, const AtenTensorHandle* packed, int64_t n_packed,
    const AtenTensorHandle* scale, int64_t n_scale, int64_t gs, const AtenTensorHandle** bias,
    int64_t n_bias, int32_t per_token, int64_t isa, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret = new_tensor_handle(w4a8_linear_cat(tensor_of(x), list_of(packed, n_packed),
                                             list_of(scale, n_scale), gs,
                                             optional_list_of(bias, n_bias), per_token != 0,
                                             isa));
  });
}

}  // extern "C"
