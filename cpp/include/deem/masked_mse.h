// The fused masked-MSE loss of DEEM's diffusion feedback (spec/kernels.md §7.2, spec/model.md §8.5):
//
//   loss = 1/(B*C*P) * sum_b scale_b * sum_{c,p} (pred[b,c,p] - target[b,c,p])^2 * m[b,p],
//   scale_b = P / (sum_p m[b,p] + eps),
//
// i.e. the mean over images of per-image masked means (the mask broadcast over the C channels; m = 1 without a
// mask). pred [B, C, P] (float64/32/16, bfloat16), target [B, C, P] (pred's dtype or its accumulation dtype),
// mask [B, P] uint8 (nonzero = inside) or absent. The loss and scale [B] are in the accumulation dtype
// (deem::acc_dtype: float64 for float64, else float32). Backward: grad_pred = g * 2 (pred - target) m scale_b / N.
#pragma once

#include "deem/common.h"

namespace deem {

struct MaskedMseProblem {
  int64_t batch = 0;     // B
  int64_t channels = 0;  // C
  int64_t pixels = 0;    // P (the spatial size h*w)
  DType pred_dtype = DType::kFloat32;
  DType target_dtype = DType::kFloat32;
  bool has_mask = false;
  double eps = 1e-8;
};

struct MaskedMseForwardArgs {
  const void* pred = nullptr;
  const void* target = nullptr;
  const uint8_t* mask = nullptr;  // [B, P] or nullptr
  void* loss = nullptr;           // [] accumulation dtype
  void* scale = nullptr;          // [B] accumulation dtype, saved for the backward
  void* workspace = nullptr;      // CUDA: masked_mse_workspace_elements() accumulation-dtype elements
};

struct MaskedMseBackwardArgs {
  const void* pred = nullptr;
  const void* target = nullptr;
  const uint8_t* mask = nullptr;
  const void* scale = nullptr;      // [B] from the forward
  const void* grad_loss = nullptr;  // [] accumulation dtype (read on the device: no host sync)
  void* grad_pred = nullptr;        // [B, C, P] pred dtype
};

void masked_mse_forward_cpu(const MaskedMseProblem& problem, const MaskedMseForwardArgs& args, int num_threads);
void masked_mse_backward_cpu(const MaskedMseProblem& problem, const MaskedMseBackwardArgs& args, int num_threads);

// Elements of the accumulation-dtype workspace the CUDA forward needs (partial sums per image chunk).
int64_t masked_mse_workspace_elements(const MaskedMseProblem& problem);
void masked_mse_forward_cuda(const MaskedMseProblem& problem, const MaskedMseForwardArgs& args, void* stream);
void masked_mse_backward_cuda(const MaskedMseProblem& problem, const MaskedMseBackwardArgs& args, void* stream);

}  // namespace deem
