// Framework-free types shared by every deem kernel family.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace deem {

enum class DType : int32_t { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

const char* dtype_name(DType dtype);
int dtype_size(DType dtype);

// Bad arguments: surfaces in Python as ValueError.
struct ArgumentError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A host allocation of the kernels failed: surfaces in Python as MemoryError (with this message).
struct OutOfMemoryError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The dtype rule, C++ side: locations, logits, the softmax and every accumulation run in float64 for
// float64 values and in float32 for everything else. `acc_dtype` names it for a DType and `acc_t<T>`
// for a storage type (float, double, and each 16-bit type of the CPU or CUDA code).
constexpr DType acc_dtype(DType value) { return value == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }
template <typename T> struct Accumulate { using type = float; };
template <> struct Accumulate<double> { using type = double; };
template <typename T> using acc_t = typename Accumulate<T>::type;

// The kernels index dimensions, level sizes and level starts in int32.
constexpr int64_t kMaxIndex = 2147483647;

// Levels of a feature pyramid, passed to kernels by value (kernel parameter space), so that no
// device-side shape tensor is read and launches stay CUDA-graph capturable.
constexpr int kMaxLevels = 256;
struct LevelTable {
  int32_t count = 0;
  int32_t height[kMaxLevels];
  int32_t width[kMaxLevels];
  int32_t start[kMaxLevels];  // first row of the level in the flattened value
};

// Which algorithm accumulates d(value) on the GPU.
enum class GradValueStrategy : int32_t {
  kAuto = 0,
  kAtomic = 1,  // fp32 workspace, vector atomics from every (query, head)
  kOwner = 2,   // one CTA owns a (batch, head, level group, channel chunk) slice in shared memory
  kTensor = 3,  // one CTA owns a (batch, head, row tile) of d(value) = Wt . dO on tensor cores (16-bit values)
};

}  // namespace deem

namespace deem {
// Device helpers (no-ops that throw when built without CUDA).
int cuda_get_device();
void cuda_set_device(int device);

// Restores the calling thread's current CUDA device on scope exit.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) : previous_(cuda_get_device()) {
    if (device != previous_) cuda_set_device(device);
  }
  ~CudaDeviceGuard() {
    try { cuda_set_device(previous_); } catch (...) {}
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_;
};
}  // namespace deem
