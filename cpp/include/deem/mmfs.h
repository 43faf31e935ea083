// The fused DEEM "MMFS core": deformable attention over n_img images x L levels with
//  * one location per (image, point) shared by the levels of that image,
//  * raw logits and an in-kernel softmax with a null slot of logit 0:
//        a_j = exp(z_j) / (1 + sum_{visible k} exp(z_k)),  sink weight s = 1 / (1 + sum exp z),
//  * a per-query image mask: invisible images are skipped before their data is read,
//  * an optional per-head ignore token added with the sink weight: out += s * ignore[m].
//
// value [N, n_img*S_img, M, D]   (images concatenated, each image's levels in table order)
// locations [N, Lq, n_img, M, P, 2]   logits [N, Lq, n_img, M, L, P]   visible [N, Lq, n_img] (uint8)
// output [N, Lq, M, D] (value dtype), lse [N, Lq, M] float32 = log(1 + sum exp z), saved for backward.
#pragma once

#include "deem/common.h"

namespace deem {

struct MmfsProblem {
  int64_t batch = 0;      // N
  int64_t images = 0;     // n_img
  int64_t image_len = 0;  // S_img = sum_l H_l * W_l
  int64_t heads = 0;      // M
  int64_t channels = 0;   // D
  int64_t queries = 0;    // Lq
  int64_t points = 0;     // P
  DType value_dtype = DType::kFloat32;  // locations/logits are float32 (float64 for float64 values)
  bool has_ignore_token = false;
  LevelTable levels;  // the levels of one image
};

struct MmfsForwardArgs {
  const void* value = nullptr;
  const void* locations = nullptr;
  const void* logits = nullptr;
  const uint8_t* visible = nullptr;
  const void* ignore_token = nullptr;  // [M, D] value dtype, optional
  void* output = nullptr;
  void* lse = nullptr;  // [N, Lq, M], location dtype
};

struct MmfsBackwardArgs {
  const void* value = nullptr;
  const void* locations = nullptr;
  const void* logits = nullptr;
  const uint8_t* visible = nullptr;
  const void* ignore_token = nullptr;
  const void* lse = nullptr;
  const void* grad_output = nullptr;
  void* grad_value = nullptr;         // value dtype
  float* grad_value_accum = nullptr;  // CUDA atomic strategy with 16-bit values
  void* grad_locations = nullptr;     // location dtype
  void* grad_logits = nullptr;        // logit dtype
};

void mmfs_forward_cpu(const MmfsProblem& problem, const MmfsForwardArgs& args, int num_threads);
void mmfs_backward_cpu(const MmfsProblem& problem, const MmfsBackwardArgs& args, int num_threads);

void mmfs_forward_cuda(const MmfsProblem& problem, const MmfsForwardArgs& args, void* stream);
GradValueStrategy mmfs_grad_value_strategy(const MmfsProblem& problem, GradValueStrategy requested);
void mmfs_backward_cuda(const MmfsProblem& problem, const MmfsBackwardArgs& args,
                        GradValueStrategy strategy, void* stream);

}  // namespace deem
