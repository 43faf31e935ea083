// Pieces shared by the d(value) strategies of the generic and the MMFS backward.
#pragma once

#include <algorithm>

#include "kernel_common.cuh"

namespace deem::cuda {

constexpr int kOwnerThreads = 512;
constexpr int kMaxOwnerGroups = 32;

// Slice ownership: level groups whose rows, times a chunk of C channels in fp32, fit in shared
// memory. One CTA accumulates one (batch, head, group, chunk) slice for every query.
struct OwnerGroups {
  int32_t count = 0;
  int32_t level_begin[kMaxOwnerGroups];
  int32_t level_end[kMaxOwnerGroups];
  int32_t row_begin[kMaxOwnerGroups];
  int32_t rows[kMaxOwnerGroups];
};

struct OwnerPlan {
  bool feasible = false;
  int chunk = 0;  // channels per CTA
  int max_rows = 0;
  OwnerGroups groups;
  size_t smem_bytes() const { return static_cast<size_t>(max_rows) * chunk * sizeof(float); }
};

// Largest channel chunk (>= 8, dividing D) for which every level fits; levels are then packed in
// order into as few groups as fit. `row_offset` shifts the rows (unused: groups are per-value).
inline OwnerPlan plan_owner(const LevelTable& levels, int64_t channels, int smem_budget) {
  OwnerPlan plan;
  int max_level_rows = 0;
  for (int l = 0; l < levels.count; ++l) max_level_rows = std::max(max_level_rows, levels.height[l] * levels.width[l]);
  for (int64_t chunk = channels; chunk >= 8; chunk /= 2) {
    if (channels % chunk != 0) continue;
    const int64_t row_budget = smem_budget / static_cast<int64_t>(chunk * sizeof(float));
    if (max_level_rows > row_budget) continue;
    OwnerPlan p;
    p.chunk = static_cast<int>(chunk);
    OwnerGroups& g = p.groups;
    int l = 0;
    while (l < levels.count) {
      if (g.count == kMaxOwnerGroups) break;
      const int begin = l;
      int64_t rows = 0;
      while (l < levels.count && rows + static_cast<int64_t>(levels.height[l]) * levels.width[l] <= row_budget) {
        rows += static_cast<int64_t>(levels.height[l]) * levels.width[l];
        ++l;
      }
      g.level_begin[g.count] = begin;
      g.level_end[g.count] = l;
      g.row_begin[g.count] = levels.start[begin];
      g.rows[g.count] = static_cast<int32_t>(rows);
      p.max_rows = std::max(p.max_rows, static_cast<int>(rows));
      ++g.count;
    }
    if (l < levels.count) continue;  // too many groups
    p.feasible = true;
    return p;
  }
  return plan;
}

// fp32 accumulation buffer -> value dtype.
template <typename scalar_t>
__global__ void cast_accum_kernel(const acc_t<scalar_t>* __restrict__ src, scalar_t* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = from_acc<scalar_t>(src[i]);
  }
}

template <typename scalar_t>
void launch_cast_accum(const acc_t<scalar_t>* src, scalar_t* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65536);
  cast_accum_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(src, dst, n);
  check_launch("cast_accum_kernel");
}

// Zeroed shared-memory slice -> written once to grad_value rows [row0, row0 + rows) of (n, m).
template <typename scalar_t>
__device__ __forceinline__ void owner_write_slice(const float* smem, scalar_t* grad_value, int64_t row_base,
                                                  int rows, int chunk, int c0, int64_t pix_stride) {
  for (int i = threadIdx.x; i < rows * chunk; i += blockDim.x) {
    const int r = i / chunk, c = i - r * chunk;
    grad_value[(row_base + r) * pix_stride + c0 + c] = from_acc<scalar_t>(smem[i]);
  }
}

}  // namespace deem::cuda
