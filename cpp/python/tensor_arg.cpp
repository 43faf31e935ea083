#include "tensor_arg.h"

#include <sstream>

namespace py = pybind11;

namespace deem::python {
namespace {

// The DLPack ABI (v0.x unversioned and v1.x versioned managed tensors).
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
struct DLPackVersion {
  uint32_t major;
  uint32_t minor;
};
struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned*);
  uint64_t flags;
  DLTensor dl_tensor;
};

constexpr uint8_t kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6;
constexpr int32_t kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3;

[[noreturn]] void fail(const std::string& msg) { throw ArgumentError(msg); }

std::string join(const std::vector<int64_t>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

}  // namespace

std::string TensorArg::shape_str() const { return join(shape); }

std::string TensorArg::dtype_str() const {
  switch (code) {
    case kDLFloat: return bits == 64 ? "float64" : bits == 32 ? "float32" : bits == 16 ? "float16" : "float?";
    case kDLBfloat: return "bfloat16";
    case kDLInt: return "int" + std::to_string(bits);
    case kDLUInt: return "uint" + std::to_string(bits);
    case kDLBool: return "bool";
    default: return "dtype(code=" + std::to_string(code) + ")";
  }
}

std::string TensorArg::device_str() const {
  switch (device) {
    case Device::kCPU: return "cpu";
    case Device::kCUDA: return "cuda:" + std::to_string(device_id);
    default: return "unsupported device";
  }
}

bool TensorArg::is_float() const {
  return (code == kDLFloat && (bits == 64 || bits == 32 || bits == 16)) || (code == kDLBfloat && bits == 16);
}

DType TensorArg::float_dtype() const {
  if (code == kDLBfloat && bits == 16) return DType::kBFloat16;
  if (code == kDLFloat && bits == 64) return DType::kFloat64;
  if (code == kDLFloat && bits == 32) return DType::kFloat32;
  if (code == kDLFloat && bits == 16) return DType::kFloat16;
  fail(name + ": expected a floating-point tensor (float64, float32, float16 or bfloat16), got " + dtype_str());
}

bool TensorArg::is_integer() const { return code == kDLInt && (bits == 32 || bits == 64); }

int64_t TensorArg::integer_at(int64_t flat_index) const {
  if (bits == 64) return static_cast<const int64_t*>(data)[flat_index];
  return static_cast<const int32_t*>(data)[flat_index];
}

void TensorArg::require_ndim(int expected, const char* layout) const {
  if (ndim() != expected) {
    fail(name + ": expected a " + std::to_string(expected) + "-D tensor " + layout + ", got shape " + shape_str());
  }
}

void TensorArg::require_shape(const std::vector<int64_t>& expected, const char* layout) const {
  if (shape != expected) fail(name + ": expected shape " + join(expected) + " " + layout + ", got " + shape_str());
}

void TensorArg::require_contiguous() const {
  for (int64_t d : shape) {
    if (d == 0) return;  // empty tensors are trivially contiguous
  }
  int64_t expected = 1;
  for (int i = ndim() - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) {
      fail(name + ": expected a contiguous tensor, got shape " + shape_str() + " with strides " + join(strides) +
           " (call .contiguous())");
    }
    expected *= shape[i];
  }
}

void TensorArg::require_dtype(DType dtype) const {
  if (!is_float() || float_dtype() != dtype) {
    fail(name + ": expected dtype " + dtype_name(dtype) + ", got " + dtype_str());
  }
}

void TensorArg::require_same_device(const TensorArg& other) const {
  if (device != other.device || device_id != other.device_id) {
    fail(name + ": expected a tensor on " + other.device_str() + " (the device of " + other.name + "), got " +
         device_str());
  }
}

void TensorArg::require_host() const {
  if (device != Device::kCPU) {
    fail(name + ": expected a CPU tensor (shapes are read on the host), got one on " + device_str());
  }
}

TensorArg parse_tensor(py::handle obj, const char* name, bool optional) {
  TensorArg t;
  t.name = name;
  if (obj.is_none()) {
    if (!optional) fail(std::string(name) + ": expected a tensor, got None");
    return t;
  }
  if (!PyCapsule_CheckExact(obj.ptr())) fail(std::string(name) + ": expected a DLPack capsule");
  const char* cname = PyCapsule_GetName(obj.ptr());
  const std::string capsule_name = cname ? cname : "";
  const DLTensor* dl = nullptr;
  if (capsule_name == "dltensor") {
    dl = &static_cast<DLManagedTensor*>(PyCapsule_GetPointer(obj.ptr(), cname))->dl_tensor;
  } else if (capsule_name == "dltensor_versioned") {
    auto* v = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(obj.ptr(), cname));
    if (v->version.major != 1) fail(std::string(name) + ": unsupported DLPack major version");
    dl = &v->dl_tensor;
  } else {
    fail(std::string(name) + ": expected an unconsumed DLPack capsule, got '" + capsule_name + "'");
  }
  t.present = true;
  t.data = static_cast<char*>(dl->data) + dl->byte_offset;
  t.device_id = dl->device.device_id;
  if (dl->device.device_type == kDLCPU || dl->device.device_type == kDLCUDAHost) {
    t.device = Device::kCPU;
  } else if (dl->device.device_type == kDLCUDA) {
    t.device = Device::kCUDA;
  } else {
    fail(std::string(name) + ": unsupported device type " + std::to_string(dl->device.device_type));
  }
  if (dl->dtype.lanes != 1) fail(std::string(name) + ": vector dtypes are not supported");
  t.code = dl->dtype.code;
  t.bits = dl->dtype.bits;
  t.shape.assign(dl->shape, dl->shape + dl->ndim);
  if (dl->strides != nullptr) {
    t.strides.assign(dl->strides, dl->strides + dl->ndim);
  } else {
    t.strides.resize(dl->ndim);
    int64_t s = 1;
    for (int i = dl->ndim - 1; i >= 0; --i) {
      t.strides[i] = s;
      s *= t.shape[i];
    }
  }
  return t;
}

int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
  if (a < 0 || b < 0) fail(what + ": negative size");
  if (a != 0 && b > INT64_MAX / a) {
    fail(what + " = " + std::to_string(a) + " x " + std::to_string(b) + " overflows int64");
  }
  return a * b;
}

int32_t index_size(int64_t v, const std::string& what) {
  if (v < 0 || v > kMaxIndex) {
    fail(what + " = " + std::to_string(v) + " is outside what the kernels index (0 to 2^31 - 1 in int32)");
  }
  return static_cast<int32_t>(v);
}

int64_t element_count(const std::vector<int64_t>& dims, const std::string& what) {
  for (int64_t d : dims) {
    if (d == 0) return 0;
  }
  int64_t n = 1;
  for (int64_t d : dims) n = checked_mul(n, d, what);
  return n;
}

}  // namespace deem::python
