// Pieces shared by the d(value) strategies of the generic and the MMFS backward.
#pragma once

#include <algorithm>
#include <type_traits>

#include "grad_value_tensor.cuh"
#include "kernel_common.cuh"
#include "strategy_table.h"

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

// ---------------------------------------------------------------------------------------------
// Slice-ownership kernel. One CTA owns the d(value) rows of one level group (or one image's
// group) for one (batch, head, channel chunk) and scans every (query, level, point) item that can
// touch them. Accumulation is in shared memory:
//   * 16-bit values: fixed point in int32 with native shared-memory integer atomics. The scale is a
//     power of two chosen from an exact bound B >= |any accumulated element| (sum over queries of
//     max|g| * sum|a|), so |sum| * scale <= 2^30: no overflow, resolution B * 2^-30, and the
//     result is deterministic (integer addition is order independent).
//   * 32-bit values: float atomics (a compare-and-swap loop on sm_90).
// Each lane computes the bilinear corners of one item; the warp then walks the staged items with
// lanes mapped to channels, so every corner costs one shared-memory atomic per channel.

constexpr int kStage = 32;  // items staged per warp

struct StagedItem {
  int pixel[4];   // row within the slice (-1: no contribution)
  float weight[4];
  int query;
};

// Source: the policy that enumerates a slice's items.
//   int items_per_query() const;
//   bool visible(int q) const;
//   float abs_weight_sum(int q) const;    // >= sum |a| of the query's items (fixed-point bound)
//   void item(int q, int j, float& x, float& y, float& a, int& level) const;
//   int64_t grad_row(int q) const;        // row of grad_output for (n, q, m)
template <typename scalar_t, bool kFixed, typename Source>
__device__ void owner_accumulate(const Source& src, const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_value,
                                 int64_t grad_value_row0, int64_t pix_stride, int queries, int channels, int chunk,
                                 int c0, int rows, int row0, const LevelTable& levels) {
  extern __shared__ __align__(16) unsigned char owner_smem[];
  using acc_elem = typename std::conditional<kFixed, int, float>::type;
  acc_elem* slice = reinterpret_cast<acc_elem*>(owner_smem);
  const int warps = blockDim.x >> 5;
  StagedItem* stage = reinterpret_cast<StagedItem*>(owner_smem + static_cast<size_t>(rows) * chunk * 4) +
                      (threadIdx.x >> 5) * kStage;
  __shared__ float bound_sum;
  __shared__ int bound_bad;
  for (int k = threadIdx.x; k < rows * chunk; k += blockDim.x) slice[k] = acc_elem(0);
  if (threadIdx.x == 0) {
    bound_sum = 0.f;
    bound_bad = 0;
  }
  __syncthreads();

  float scale = 1.f;
  if constexpr (kFixed) {
    float local = 0.f;
    for (int q = threadIdx.x; q < queries; q += blockDim.x) {
      if (!src.visible(q)) continue;
      const scalar_t* g = grad_out + src.grad_row(q) * channels + c0;
      float gmax = 0.f;
      for (int c = 0; c < chunk; ++c) gmax = fmaxf(gmax, fabsf(to_acc(g[c])));
      local += gmax * src.abs_weight_sum(q);
    }
    for (int off = 16; off > 0; off >>= 1) local += __shfl_xor_sync(0xffffffffu, local, off);
    if ((threadIdx.x & 31) == 0) atomicAdd(&bound_sum, local);
    __syncthreads();
    const float bound = bound_sum;
    if (!isfinite(bound)) {
      if (threadIdx.x == 0) bound_bad = 1;
    } else if (bound > 0.f) {
      int e;
      frexpf(bound, &e);                        // bound < 2^e
      scale = ldexpf(1.f, 30 - max(e, -90));    // bound * scale < 2^30, scale finite
    }
    __syncthreads();
  }

  const int lane = threadIdx.x & 31;
  const int T = min(chunk, 32);       // lanes per staged item during accumulation
  const int per_lane = chunk / T;
  const int sub = lane / T, t = lane % T;
  const int ipq = src.items_per_query();
  const int64_t total = static_cast<int64_t>(queries) * ipq;
  for (int64_t base = static_cast<int64_t>(threadIdx.x >> 5) * kStage; base < total;
       base += static_cast<int64_t>(warps) * kStage) {
    {
      StagedItem it;
      const int64_t idx = base + lane;
      it.query = -1;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        it.pixel[k] = -1;
        it.weight[k] = 0.f;
      }
      if (idx < total) {
        const int q = static_cast<int>(idx / ipq), j = static_cast<int>(idx - static_cast<int64_t>(q) * ipq);
        if (src.visible(q)) {
          float x, y, a;
          int l;
          src.item(q, j, x, y, a, l);
          const detail::Bilinear<float> b = detail::bilinear<float>(x, y, levels.height[l], levels.width[l]);
          if (b.inside && a != 0.f) {
            it.query = q;
            const int level_row = levels.start[l] - row0;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const float w = a * b.weight[k] * scale;
              it.pixel[k] = w != 0.f ? level_row + b.pixel[k] : -1;
              it.weight[k] = w;
            }
          }
        }
      }
      stage[lane] = it;
    }
    __syncwarp();
    int current_q = -1;
    float g[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = sub; i < kStage; i += 32 / T) {
      const StagedItem& it = stage[i];
      const int q = it.query;
      if (q < 0) continue;
      if (q != current_q) {
        current_q = q;
        const scalar_t* go = grad_out + src.grad_row(q) * channels + c0 + t;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) g[kk] = kk < per_lane ? to_acc(go[kk * T]) : 0.f;
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int pix = it.pixel[k];
        if (pix < 0) continue;
        const float w = it.weight[k];
        acc_elem* dst = slice + pix * chunk + t;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          if (kk >= per_lane) break;
          if constexpr (kFixed) {
            atomicAdd(dst + kk * T, __float2int_rn(w * g[kk]));
          } else {
            atomicAdd(dst + kk * T, w * g[kk]);
          }
        }
      }
    }
    __syncwarp();
  }
  __syncthreads();
  const bool bad = kFixed && bound_bad;
  const float inv = 1.f / scale;
  for (int k = threadIdx.x; k < rows * chunk; k += blockDim.x) {
    const int r = k / chunk, c = k - r * chunk;
    const float v = bad ? __int_as_float(0x7fc00000) : static_cast<float>(slice[k]) * inv;
    grad_value[(grad_value_row0 + r) * pix_stride + c0 + c] = from_acc<scalar_t>(v);
  }
}

inline size_t owner_stage_bytes(int threads) { return static_cast<size_t>(threads / 32) * kStage * sizeof(StagedItem); }

// ---------------------------------------------------------------------------------------------
// Host side, shared by both backward launchers.

// Shared memory for one owner CTA's slice on the current device.
inline int owner_budget() {
  return std::min(max_dynamic_smem_bytes() - 4096, 200 * 1024) - static_cast<int>(owner_stage_bytes(kOwnerThreads));
}

// Resolves `requested` for a problem with these levels (of one value slice), head size, value dtype, queries and
// points. 'auto' takes the measured case nearest to the problem in the features that set the strategies' costs
// (strategy_table.h: log of sampled points per value row, log of queries) and runs the fastest strategy measured
// there that applies to this problem.
inline GradValueStrategy choose_grad_value_strategy(const LevelTable& levels, int64_t channels, DType value_dtype,
                                                    int64_t queries, int64_t points, GradValueStrategy requested,
                                                    StrategyOp op) {
  if (value_dtype == DType::kFloat64) return GradValueStrategy::kAtomic;  // fp64 has no shared-memory variant
  const OwnerPlan plan = plan_owner(levels, channels, owner_budget());
  const bool tensor_ok = tensor_feasible(channels, value_dtype);
  if (requested == GradValueStrategy::kOwner) {
    if (!plan.feasible) throw ArgumentError("grad_value strategy 'owner' does not fit this problem in shared memory");
    return GradValueStrategy::kOwner;
  }
  if (requested == GradValueStrategy::kTensor) {
    if (!tensor_ok) {
      throw ArgumentError("grad_value strategy 'tensor' needs float16 or bfloat16 values and D = 32, 64 or 128 "
                          "channels per head");
    }
    return GradValueStrategy::kTensor;
  }
  if (requested == GradValueStrategy::kAtomic) return GradValueStrategy::kAtomic;
  int64_t rows = 0;
  for (int l = 0; l < levels.count; ++l) rows += static_cast<int64_t>(levels.height[l]) * levels.width[l];
  const StrategyFeatures f = strategy_features(levels.count * points, rows, queries);
  const MeasuredStrategies& best = nearest_measured(f, op);
  for (const GradValueStrategy s : best.fastest_first) {
    if (s == GradValueStrategy::kOwner && !plan.feasible) continue;
    if (s == GradValueStrategy::kTensor && !tensor_ok) continue;
    if (s == GradValueStrategy::kAuto) continue;  // unused slot
    return s;
  }
  return GradValueStrategy::kAtomic;
}

// The atomic strategy's accumulation buffer, zeroed on `stream`: d(value) itself when it has the accumulation
// type, else the caller's fp32 workspace (cast into d(value) by `finish_atomic`).
template <typename scalar_t>
acc_t<scalar_t>* start_atomic(void* grad_value, float* workspace, int64_t elems, cudaStream_t stream) {
  acc_t<scalar_t>* accum = nullptr;
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    accum = static_cast<acc_t<scalar_t>*>(grad_value);
  } else {
    if (workspace == nullptr) {
      throw ArgumentError("grad_value_accum: the atomic strategy needs a float32 workspace shaped like value");
    }
    accum = workspace;
  }
  check_cuda(cudaMemsetAsync(accum, 0, elems * sizeof(acc_t<scalar_t>), stream), "cudaMemsetAsync");
  return accum;
}

template <typename scalar_t>
void finish_atomic(const acc_t<scalar_t>* accum, void* grad_value, int64_t elems, cudaStream_t stream) {
  if constexpr (!std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    launch_cast_accum<scalar_t>(accum, static_cast<scalar_t*>(grad_value), elems, stream);
  }
}

// Launches an owner kernel over `slices` (batch x image x head) slices of `plan`'s level groups and chunks.
template <typename Kernel, typename... Args>
void launch_owner(Kernel kernel, const OwnerPlan& plan, int64_t slices, int64_t channels, const char* name,
                  cudaStream_t stream, Args... args) {
  const size_t smem = plan.smem_bytes() + owner_stage_bytes(kOwnerThreads);
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "cudaFuncSetAttribute(owner kernel)");
  const int64_t blocks = slices * plan.groups.count * (channels / plan.chunk);
  if (blocks == 0) return;
  kernel<<<grid_blocks(blocks, name), kOwnerThreads, smem, stream>>>(args...);
  check_launch(name);
}

}  // namespace deem::cuda
