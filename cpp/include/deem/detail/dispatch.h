// Dtype dispatch for host code: calls f(Tag<scalar_t>{}) with the C++ type of a DType.
#pragma once

#include <string>
#include <utility>

#include "deem/common.h"
#include "deem/detail/half_cpu.h"

namespace deem::detail {

template <typename T>
struct Tag {
  using type = T;
};

// Host-side storage types: Half and BFloat16 are 16-bit PODs with CPU conversions.
template <typename F>
void dispatch_value_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat64: f(Tag<double>{}); return;
    case DType::kFloat32: f(Tag<float>{}); return;
    case DType::kFloat16: f(Tag<Half>{}); return;
    case DType::kBFloat16: f(Tag<BFloat16>{}); return;
  }
  throw ArgumentError(std::string("unsupported dtype ") + dtype_name(dtype));
}

}  // namespace deem::detail
