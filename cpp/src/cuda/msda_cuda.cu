// CUDA multi-scale deformable attention (generic Deformable-DETR semantics).
//
// Forward/backward mapping: a group of G = D/V threads per (n, q, head), V elements (16 bytes)
// per thread. Groups of one CTA share (n, head) and take consecutive queries, so they read the
// same value slice. The group's lanes load G points' locations and weights at once (coalesced)
// and broadcast them with shuffles; each point costs four 16-byte loads per lane.
// d(value): either vector atomics into an fp32 buffer (kAtomic) or slice ownership (kOwner).
#include <algorithm>

#include "deem/msda.h"
#include "dispatch.cuh"
#include "grad_value_common.cuh"
#include "point_loops.cuh"

namespace deem {
namespace cuda {
namespace {

constexpr int kThreads = 256;

using Dims = GroupDims;

Dims make_dims(const MsdaProblem& pr, int group, int threads) {
  return group_dims(pr.heads, pr.channels, pr.queries, pr.points, pr.levels.count, pr.value_len, group, threads);
}

template <typename scalar_t, typename weight_t, int kBatch>
__global__ void __launch_bounds__(kThreads, gather_min_blocks<scalar_t>(kBatch, GatherKind::kMsdaForward))
    msda_forward_kernel(const scalar_t* __restrict__ value, const acc_t<scalar_t>* __restrict__ loc,
                        const weight_t* __restrict__ weights, scalar_t* __restrict__ out, Dims d,
                        const __grid_constant__ LevelTable levels) {
  using acc = acc_t<scalar_t>;
  constexpr int V = Traits<scalar_t>::V;
  const Group grp = Group::make(d.G);
  const GroupTask task = group_task(d, d.threads / d.G);
  if (task.q >= d.Lq) return;
  const int n = task.n, m = task.m, q = task.q;
  const int64_t row = (static_cast<int64_t>(n) * d.Lq + q) * d.M + m;
  const int64_t LP = static_cast<int64_t>(d.L) * d.P;
  const acc* loc_q = loc + row * LP * 2;
  const weight_t* w_q = weights + row * LP;
  const int64_t pix = static_cast<int64_t>(d.M) * d.D;
  const scalar_t* v_nm = value + static_cast<int64_t>(n) * d.S * pix + static_cast<int64_t>(m) * d.D + grp.lane * V;

  acc sum[V];
#pragma unroll
  for (int c = 0; c < V; ++c) sum[c] = acc(0);

  for (int l = 0; l < d.L; ++l) {
    const scalar_t* v_l = v_nm + static_cast<int64_t>(levels.start[l]) * pix;
    for (int p0 = 0; p0 < d.P; p0 += d.G) {
      const int p = p0 + grp.lane;
      PointChunk<acc> chunk{0, 0, 0, min(d.G, d.P - p0)};
      if (p < d.P) {
        const int idx = l * d.P + p;
        chunk.x = loc_q[2 * idx];
        chunk.y = loc_q[2 * idx + 1];
        chunk.a = to_acc(w_q[idx]);
      }
      accumulate_points<scalar_t, kBatch>(grp, v_l, pix, levels.height[l], levels.width[l], chunk, sum);
    }
  }
  store_vec(out + row * d.D + grp.lane * V, sum);
}

// d(locations), d(weights) for every point; with kAtomic also d(value) into `accum` (zeroed).
template <typename scalar_t, typename weight_t, bool kAtomic, int kBatch>
__global__ void __launch_bounds__(kThreads, gather_min_blocks<scalar_t>(kBatch, GatherKind::kBackward))
    msda_backward_kernel(const scalar_t* __restrict__ value, const acc_t<scalar_t>* __restrict__ loc,
                         const weight_t* __restrict__ weights, const scalar_t* __restrict__ grad_out,
                         acc_t<scalar_t>* __restrict__ accum, acc_t<scalar_t>* __restrict__ grad_loc,
                         weight_t* __restrict__ grad_w, Dims d, const __grid_constant__ LevelTable levels) {
  using acc = acc_t<scalar_t>;
  constexpr int V = Traits<scalar_t>::V;
  const Group grp = Group::make(d.G);
  const GroupTask task = group_task(d, kThreads / d.G);
  if (task.q >= d.Lq) return;
  const int n = task.n, m = task.m, q = task.q;
  const int64_t row = (static_cast<int64_t>(n) * d.Lq + q) * d.M + m;
  const int64_t LP = static_cast<int64_t>(d.L) * d.P;
  const acc* loc_q = loc + row * LP * 2;
  const weight_t* w_q = weights + row * LP;
  acc* gloc_q = grad_loc + row * LP * 2;
  weight_t* gw_q = grad_w + row * LP;
  const int64_t pix = static_cast<int64_t>(d.M) * d.D;
  const int64_t nm_offset = static_cast<int64_t>(n) * d.S * pix + static_cast<int64_t>(m) * d.D + grp.lane * V;
  const scalar_t* v_nm = value + nm_offset;

  acc g[V];
  {
    acc tmp[V];  // a separate load target keeps ptxas from spilling g (measured with -Xptxas -v)
    load_vec(grad_out + row * d.D + grp.lane * V, tmp);
#pragma unroll
    for (int c = 0; c < V; ++c) g[c] = tmp[c];
  }

  for (int l = 0; l < d.L; ++l) {
    const int H = levels.height[l], W = levels.width[l];
    const int64_t level_offset = static_cast<int64_t>(levels.start[l]) * pix;
    const scalar_t* v_l = v_nm + level_offset;
    acc* accum_l = kAtomic ? accum + nm_offset + level_offset : nullptr;
    for (int p0 = 0; p0 < d.P; p0 += d.G) {
      const int p = p0 + grp.lane;
      PointChunk<acc> chunk{0, 0, 0, min(d.G, d.P - p0)};
      if (p < d.P) {
        const int idx = l * d.P + p;
        chunk.x = loc_q[2 * idx];
        chunk.y = loc_q[2 * idx + 1];
        chunk.a = to_acc(w_q[idx]);
      }
      const PointGrad<acc> pg = backprop_points<scalar_t, kAtomic, kBatch>(grp, v_l, accum_l, pix, H, W, g, chunk);
      if (p < d.P) {
        const int idx = l * d.P + p;
        gw_q[idx] = from_acc<weight_t>(pg.sample);
        gloc_q[2 * idx] = chunk.a * pg.dx * static_cast<acc>(W);
        gloc_q[2 * idx + 1] = chunk.a * pg.dy * static_cast<acc>(H);
      }
    }
  }
}

// Slice ownership: CTA (n, m, level group, channel chunk); see owner_accumulate.
template <typename weight_t>
struct MsdaOwnerSource {
  const float* loc;
  const weight_t* weights;
  int n, m, M, Lq, LP, P, level_begin, group_levels;

  __device__ int items_per_query() const { return group_levels * P; }
  __device__ bool visible(int) const { return true; }
  __device__ int64_t grad_row(int q) const { return (static_cast<int64_t>(n) * Lq + q) * M + m; }
  __device__ float abs_weight_sum(int q) const {
    const weight_t* w = weights + grad_row(q) * LP + level_begin * P;
    float s = 0.f;
    for (int j = 0; j < group_levels * P; ++j) s += fabsf(to_acc(w[j]));
    return s;
  }
  __device__ void item(int q, int j, float& x, float& y, float& a, int& level) const {
    const int dl = j / P;
    level = level_begin + dl;
    const int64_t idx = grad_row(q) * LP + level * P + (j - dl * P);
    a = to_acc(weights[idx]);
    x = loc[2 * idx];
    y = loc[2 * idx + 1];
  }
};

template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kOwnerThreads)
    msda_grad_value_owner_kernel(const float* __restrict__ loc, const weight_t* __restrict__ weights,
                                 const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_value, Dims d,
                                 int chunk, const __grid_constant__ LevelTable levels,
                                 const __grid_constant__ OwnerGroups groups) {
  const int n_chunks = d.D / chunk;
  int bid = blockIdx.x;
  const int ck = bid % n_chunks;
  bid /= n_chunks;
  const int gi = bid % groups.count;
  bid /= groups.count;
  const int m = bid % d.M, n = bid / d.M;
  const MsdaOwnerSource<weight_t> src{loc, weights, n, m, d.M, d.Lq, d.L * d.P, d.P, groups.level_begin[gi],
                                      groups.level_end[gi] - groups.level_begin[gi]};
  constexpr bool kFixed = !std::is_same_v<scalar_t, float>;
  owner_accumulate<scalar_t, kFixed>(src, grad_out, grad_value + static_cast<int64_t>(m) * d.D,
                                     static_cast<int64_t>(n) * d.S + groups.row_begin[gi],
                                     static_cast<int64_t>(d.M) * d.D, d.Lq, d.D, chunk, ck * chunk, groups.rows[gi],
                                     groups.row_begin[gi], levels);
}

// Tensor cores: CTA (n, m, row tile); see tensor_accumulate.
template <typename scalar_t, typename weight_t, int kD>
__global__ void __launch_bounds__(kTensorThreads, 2)
    msda_grad_value_tensor_kernel(const float* __restrict__ loc, const weight_t* __restrict__ weights,
                                  const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_value, Dims d,
                                  int tiles, const __grid_constant__ LevelTable levels) {
  const int tile = blockIdx.x % tiles;
  const int nm = blockIdx.x / tiles;
  const int m = nm % d.M, n = nm / d.M;
  const MsdaOwnerSource<weight_t> src{loc, weights, n, m, d.M, d.Lq, d.L * d.P, d.P, 0, d.L};
  tensor_accumulate<scalar_t, kD>(src, grad_out, grad_value + static_cast<int64_t>(m) * kD,
                                  static_cast<int64_t>(n) * d.S, static_cast<int64_t>(d.M) * kD, d.Lq, d.P,
                                  static_cast<int>(d.S), tile, levels);
}

}  // namespace
}  // namespace cuda

void msda_forward_cuda(const MsdaProblem& pr, const MsdaForwardArgs& args, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  cuda::dispatch_value_weight(pr.value_dtype, pr.weight_dtype, [&](auto vt, auto wt) {
    using scalar_t = typename decltype(vt)::type;
    using weight_t = typename decltype(wt)::type;
    const cuda::Dims d = cuda::make_dims(pr, cuda::group_size_for<scalar_t>(pr.channels), cuda::kThreads);
    cuda::require_aligned(args.value, "value");
    cuda::require_aligned(args.output, "output");
    const int64_t blocks = static_cast<int64_t>(pr.batch) * d.M * d.q_blocks;
    if (blocks == 0) return;
    const unsigned grid = cuda::grid_blocks(blocks, "msda_forward");
    cuda::dispatch_gather_batch<1, 4>([&](auto batch) {
      const auto kernel = cuda::msda_forward_kernel<scalar_t, weight_t, decltype(batch)::value>;
      kernel<<<grid, d.threads, 0, stream>>>(
          static_cast<const scalar_t*>(args.value), static_cast<const acc_t<scalar_t>*>(args.locations),
          static_cast<const weight_t*>(args.weights), static_cast<scalar_t*>(args.output),
          cuda::prepare_group_launch(d, kernel, grid), pr.levels);
    });
    cuda::check_launch("msda_forward_kernel");
  });
}

GradValueStrategy msda_grad_value_strategy(const MsdaProblem& pr, GradValueStrategy requested) {
  return cuda::choose_grad_value_strategy(pr.levels, pr.channels, pr.value_dtype, pr.queries, pr.points, requested,
                                          cuda::StrategyOp::kMsda);
}

void msda_backward_cuda(const MsdaProblem& pr, const MsdaBackwardArgs& args, GradValueStrategy strategy,
                        void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  strategy = msda_grad_value_strategy(pr, strategy);
  cuda::dispatch_value_weight(pr.value_dtype, pr.weight_dtype, [&](auto vt, auto wt) {
    using scalar_t = typename decltype(vt)::type;
    using weight_t = typename decltype(wt)::type;
    using acc = acc_t<scalar_t>;
    const cuda::Dims d = cuda::make_dims(pr, cuda::group_size_for<scalar_t>(pr.channels), cuda::kThreads);
    cuda::require_aligned(args.value, "value");
    cuda::require_aligned(args.grad_output, "grad_output");
    cuda::require_aligned(args.grad_value_accum, "grad_value_accum");
    const int64_t value_elems = pr.batch * pr.value_len * pr.heads * pr.channels;
    const unsigned blocks = cuda::grid_blocks(static_cast<int64_t>(pr.batch) * d.M * d.q_blocks, "msda_backward");
    const auto* value = static_cast<const scalar_t*>(args.value);
    const auto* loc = static_cast<const acc*>(args.locations);
    const auto* w = static_cast<const weight_t*>(args.weights);
    const auto* gout = static_cast<const scalar_t*>(args.grad_output);
    auto* gloc = static_cast<acc*>(args.grad_locations);
    auto* gw = static_cast<weight_t*>(args.grad_weights);

    if (strategy == GradValueStrategy::kAtomic) {
      acc* accum = cuda::start_atomic<scalar_t>(args.grad_value, args.grad_value_accum, value_elems, stream);
      if (blocks > 0) {
        cuda::dispatch_gather_batch<1, 2>([&](auto batch) {
          const auto kernel = cuda::msda_backward_kernel<scalar_t, weight_t, true, decltype(batch)::value>;
          kernel<<<blocks, cuda::kThreads, 0, stream>>>(value, loc, w, gout, accum, gloc, gw,
                                                        cuda::prepare_group_launch(d, kernel, blocks), pr.levels);
        });
        cuda::check_launch("msda_backward_kernel<atomic>");
      }
      cuda::finish_atomic<scalar_t>(accum, args.grad_value, value_elems, stream);
      return;
    }
    if constexpr (std::is_same_v<scalar_t, double>) {
      throw ArgumentError("grad_value strategy 'owner' is not available for float64");
    } else {
      if (blocks > 0) {
        cuda::dispatch_gather_batch<1, 2>([&](auto batch) {
          const auto kernel = cuda::msda_backward_kernel<scalar_t, weight_t, false, decltype(batch)::value>;
          kernel<<<blocks, cuda::kThreads, 0, stream>>>(value, loc, w, gout, nullptr, gloc, gw,
                                                        cuda::prepare_group_launch(d, kernel, blocks), pr.levels);
        });
        cuda::check_launch("msda_backward_kernel");
      }
      if constexpr (!std::is_same_v<scalar_t, float>) {
        if (strategy == GradValueStrategy::kTensor) {
          cuda::dispatch_tensor_channels(pr.channels, [&](auto dc) {
            constexpr int kD = decltype(dc)::value;
            cuda::launch_tensor(cuda::msda_grad_value_tensor_kernel<scalar_t, weight_t, kD>,
                                cuda::TensorTile<kD>::kSmem, pr.batch * pr.heads, cuda::tensor_tiles<kD>(pr.value_len),
                                "msda_grad_value_tensor_kernel", stream, loc, w, gout,
                                static_cast<scalar_t*>(args.grad_value), d,
                                static_cast<int>(cuda::tensor_tiles<kD>(pr.value_len)), pr.levels);
          });
          return;
        }
      }
      const cuda::OwnerPlan plan = cuda::plan_owner(pr.levels, pr.channels, cuda::owner_budget());
      cuda::launch_owner(cuda::msda_grad_value_owner_kernel<scalar_t, weight_t>, plan, pr.batch * pr.heads,
                         pr.channels, "msda_grad_value_owner_kernel", stream, loc, w, gout,
                         static_cast<scalar_t*>(args.grad_value), d, plan.chunk, pr.levels, plan.groups);
    }
  });
}

}  // namespace deem
