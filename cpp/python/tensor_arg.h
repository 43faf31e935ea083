// A tensor received from Python through DLPack, with validation helpers whose errors name the
// tensor and what was expected.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "deem/common.h"

namespace deem::python {

enum class Device : int32_t { kCPU = 1, kCUDA = 2, kOther = -1 };

struct TensorArg {
  std::string name;
  void* data = nullptr;
  Device device = Device::kOther;
  int device_id = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  uint8_t code = 0;              // DLPack type code
  uint8_t bits = 0;
  bool present = false;

  int64_t dim(int i) const { return shape.at(static_cast<size_t>(i)); }
  int ndim() const { return static_cast<int>(shape.size()); }
  std::string shape_str() const;
  std::string dtype_str() const;
  std::string device_str() const;

  bool is_float() const;  // float64/32/16 or bfloat16
  DType float_dtype() const;
  bool is_integer() const;  // int32 / int64
  int64_t integer_at(int64_t flat_index) const;  // host tensors only

  // Checks; each throws ArgumentError naming the tensor.
  void require_ndim(int ndim, const char* layout) const;
  void require_shape(const std::vector<int64_t>& expected, const char* layout) const;
  void require_contiguous() const;
  void require_dtype(DType dtype) const;
  void require_same_device(const TensorArg& other) const;
  void require_host() const;
};

// `obj` is a DLPack capsule ("dltensor" or "dltensor_versioned") or None when `optional`.
TensorArg parse_tensor(pybind11::handle obj, const char* name, bool optional = false);

// Size arithmetic in int64 with overflow checks; each throws ArgumentError naming `what`.
int64_t checked_mul(int64_t a, int64_t b, const std::string& what);
// `v` as an int32 index of the kernels: 0 <= v <= 2^31 - 1.
int32_t index_size(int64_t v, const std::string& what);
// The product of `dims` (0 when any is 0), or an error when it overflows int64.
int64_t element_count(const std::vector<int64_t>& dims, const std::string& what);

}  // namespace deem::python
