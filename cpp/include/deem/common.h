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
