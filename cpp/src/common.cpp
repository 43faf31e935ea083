#include "deem/common.h"
#include "deem/mmfs.h"
#include "deem/msda.h"

namespace deem {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return "float64";
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
  }
  return 0;
}

#ifndef DEEM_WITH_CUDA
namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("deem was built without CUDA kernels (no nvcc at build time, or DEEM_CUDA=OFF)");
}
}  // namespace
bool cuda_kernels_built() { return false; }
int cuda_get_device() { no_cuda(); }
void cuda_set_device(int) { no_cuda(); }
void mmfs_forward_cuda(const MmfsProblem&, const MmfsForwardArgs&, void*) { no_cuda(); }
GradValueStrategy mmfs_grad_value_strategy(const MmfsProblem&, GradValueStrategy) { no_cuda(); }
void mmfs_backward_cuda(const MmfsProblem&, const MmfsBackwardArgs&, GradValueStrategy, void*) { no_cuda(); }
void msda_forward_cuda(const MsdaProblem&, const MsdaForwardArgs&, void*) { no_cuda(); }
GradValueStrategy msda_grad_value_strategy(const MsdaProblem&, GradValueStrategy) { no_cuda(); }
void msda_backward_cuda(const MsdaProblem&, const MsdaBackwardArgs&, GradValueStrategy, void*) { no_cuda(); }
#endif

}  // namespace deem
