// The Q-Former attention has no compiled CPU kernel: the CPU runs the op's PyTorch reference. Without CUDA these
// entry points say so.
#include "deem/resampler.h"

namespace deem {

#ifndef DEEM_WITH_CUDA
namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("deem was built without CUDA kernels (no nvcc at build time, or DEEM_CUDA=OFF)");
}
}  // namespace
bool qformer_attention_fits(int64_t, int64_t, int64_t) { return false; }
void qformer_attention_forward_cuda(const QFormerAttentionProblem&, const QFormerAttentionForwardArgs&, void*) {
  no_cuda();
}
void qformer_attention_backward_cuda(const QFormerAttentionProblem&, const QFormerAttentionBackwardArgs&, void*) {
  no_cuda();
}
#endif

}  // namespace deem
