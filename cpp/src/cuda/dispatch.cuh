// Dtype dispatch for CUDA host code: f(Tag<T>) with T in {double, float, __half, __nv_bfloat16}.
#pragma once

#include <string>

#include "deem/detail/dispatch.h"
#include "kernel_common.cuh"

namespace deem::cuda {

using detail::Tag;

template <typename F>
void dispatch_value(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat64: f(Tag<double>{}); return;
    case DType::kFloat32: f(Tag<float>{}); return;
    case DType::kFloat16: f(Tag<__half>{}); return;
    case DType::kBFloat16: f(Tag<__nv_bfloat16>{}); return;
  }
  throw ArgumentError(std::string("unsupported dtype ") + dtype_name(dtype));
}

// f(Tag<scalar_t>, Tag<weight_t>) with weights of the value dtype or of its accumulation type.
template <typename F>
void dispatch_value_weight(DType value, DType weight, F&& f) {
  dispatch_value(value, [&](auto vt) {
    using scalar_t = typename decltype(vt)::type;
    if (weight == value) {
      f(vt, Tag<scalar_t>{});
    } else if constexpr (!std::is_same_v<acc_t<scalar_t>, scalar_t>) {
      if (weight == DType::kFloat32) {
        f(vt, Tag<float>{});
        return;
      }
      throw ArgumentError(std::string("attention_weights: unsupported dtype ") + dtype_name(weight));
    } else {
      throw ArgumentError(std::string("attention_weights: unsupported dtype ") + dtype_name(weight));
    }
  });
}

}  // namespace deem::cuda
