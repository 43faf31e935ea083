#include <cuda_runtime.h>

#include "deem/msda.h"
#include "kernel_common.cuh"

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

}  // namespace cuda
}  // namespace deem
