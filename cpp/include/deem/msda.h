// Multi-scale deformable attention (Deformable-DETR semantics), forward and backward.
//
//   out[n,q,m,c] = sum_{l,p} w[n,q,m,l,p] * bilinear(V_l[n,:,:,m,c], x*W_l - 0.5, y*H_l - 0.5)
//
// value [N,S,M,D], locations [N,Lq,M,L,P,2] (x,y) normalised, weights [N,Lq,M,L,P],
// output [N,Lq,M,D]. Bilinear sampling with zero padding (grid_sample, align_corners=False).
// Locations are float32 (float64 for float64 values); weights have the value dtype or float32.
#pragma once

#include "deem/common.h"

namespace deem {

struct MsdaProblem {
  int64_t batch = 0;      // N
  int64_t value_len = 0;  // S = sum_l H_l * W_l
  int64_t heads = 0;      // M
  int64_t channels = 0;   // D (32, 64 or 128)
  int64_t queries = 0;    // Lq
  int64_t points = 0;     // P (1..16)
  DType value_dtype = DType::kFloat32;
  DType weight_dtype = DType::kFloat32;
  LevelTable levels;
};

struct MsdaForwardArgs {
  const void* value = nullptr;
  const void* locations = nullptr;
  const void* weights = nullptr;
  void* output = nullptr;
};

struct MsdaBackwardArgs {
  const void* value = nullptr;
  const void* locations = nullptr;
  const void* weights = nullptr;
  const void* grad_output = nullptr;
  void* grad_value = nullptr;          // value dtype
  float* grad_value_accum = nullptr;   // CUDA atomic strategy with 16-bit values: zeroed fp32 workspace
  void* grad_locations = nullptr;      // location dtype
  void* grad_weights = nullptr;        // weight dtype
};

void msda_forward_cpu(const MsdaProblem& problem, const MsdaForwardArgs& args, int num_threads);
void msda_backward_cpu(const MsdaProblem& problem, const MsdaBackwardArgs& args, int num_threads);

bool cuda_kernels_built();

// CUDA entry points. `stream` is a cudaStream_t; the kernels run on it and never synchronise.
void msda_forward_cuda(const MsdaProblem& problem, const MsdaForwardArgs& args, void* stream);
// Resolves kAuto for this problem on the current device (kAtomic or kOwner).
GradValueStrategy msda_grad_value_strategy(const MsdaProblem& problem, GradValueStrategy requested);
void msda_backward_cuda(const MsdaProblem& problem, const MsdaBackwardArgs& args,
                        GradValueStrategy strategy, void* stream);

}  // namespace deem
