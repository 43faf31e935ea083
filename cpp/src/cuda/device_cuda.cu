#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

#include "deem/msda.h"
#include "kernel_common.cuh"
#include "point_loops.cuh"

namespace deem {

bool cuda_kernels_built() { return true; }

int cuda_get_device() {
  int device = 0;
  cuda::check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

void cuda_set_device(int device) { cuda::check_cuda(cudaSetDevice(device), "cudaSetDevice"); }

namespace cuda {

int max_dynamic_smem_bytes() {
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, cuda_get_device()),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return value;
}

int multiprocessor_count() {
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, cuda_get_device()),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  return value;
}

Residency group_kernel_residency(const void* kernel, int threads) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, Residency> cache;
  const int device = cuda_get_device();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find({kernel, device});
  if (it != cache.end()) return it->second;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxL1),
             "cudaFuncSetAttribute(carveout)");
  Residency r;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r.per_sm, kernel, threads, 0),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  r.sms = multiprocessor_count();
  cache.emplace(std::make_pair(kernel, device), r);
  return r;
}

}  // namespace cuda
}  // namespace deem
