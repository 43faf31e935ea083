// CUDA fused MMFS core (see deem/mmfs.h): per-image locations broadcast over levels, in-kernel
// softmax with a null slot, per-query image visibility and an optional ignore token.
//
// Forward: a group of G = D/V threads per (n, q, head). Pass 1 reads the visible logits once for
// an online max/sum (lse); pass 2 samples only visible images. Backward kernel A recomputes the
// samples, writes d(location) per image (summed over its levels) and d(logit) with the exact
// row term gbar = sum_j a_j G_j + sink <g, ignore>; d(value) by slice ownership (no global
// atomics; one CTA per (n, image, head, channel chunk)) or by atomics.
#include <algorithm>

#include "deem/mmfs.h"
#include "dispatch.cuh"
#include "grad_value_common.cuh"
#include "point_loops.cuh"

namespace deem {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct Dims : GroupDims {
  int I;  // images; S counts the rows of one image
};

Dims make_dims(const MmfsProblem& pr, int group, int threads) {
  Dims d;
  static_cast<GroupDims&>(d) =
      group_dims(pr.heads, pr.channels, pr.queries, pr.points, pr.levels.count, pr.image_len, group, threads);
  d.I = static_cast<int>(pr.images);
  return d;
}

template <typename acc>
__device__ __forceinline__ acc exp_acc(acc v) { return exp(v); }
template <>
__device__ __forceinline__ float exp_acc<float>(float v) { return __expf(v); }

// log(1 + sum_{visible} exp(z)) for the group's (n, q, head).
template <typename acc>
__device__ __forceinline__ acc group_lse(const acc* __restrict__ logits, const uint8_t* __restrict__ vis,
                                         const Group& grp, const Dims& d, int64_t nq, int m) {
  const int LP = d.L * d.P;
  acc mx = 0, s = 0;  // running max starts at the null slot's logit 0
  for (int i = 0; i < d.I; ++i) {
    if (!vis[i]) continue;
    const acc* z = logits + ((nq * d.I + i) * d.M + m) * LP;
    for (int j = grp.lane; j < LP; j += d.G) {
      const acc v = z[j];
      if (v > mx) {
        s = s * exp_acc(mx - v) + acc(1);
        mx = v;
      } else {
        s += exp_acc(v - mx);
      }
    }
  }
  for (int off = d.G >> 1; off > 0; off >>= 1) {
    const acc omx = __shfl_xor_sync(grp.mask, mx, off, d.G);
    const acc os = __shfl_xor_sync(grp.mask, s, off, d.G);
    const acc nmx = fmax(mx, omx);
    s = s * exp_acc(mx - nmx) + os * exp_acc(omx - nmx);
    mx = nmx;
  }
  return mx + log(s + exp_acc(-mx));
}

template <typename scalar_t, int kBatch>
__global__ void __launch_bounds__(kThreads, gather_min_blocks<scalar_t>(kBatch, GatherKind::kMmfsForward))
    mmfs_forward_kernel(const scalar_t* __restrict__ value, const acc_t<scalar_t>* __restrict__ loc,
                        const acc_t<scalar_t>* __restrict__ logits, const uint8_t* __restrict__ visible,
                        const scalar_t* __restrict__ ignore, scalar_t* __restrict__ out,
                        acc_t<scalar_t>* __restrict__ lse_out, Dims d, const __grid_constant__ LevelTable levels) {
  using acc = acc_t<scalar_t>;
  constexpr int V = Traits<scalar_t>::V;
  const Group grp = Group::make(d.G);
  const GroupTask task = group_task(d, d.threads / d.G);
  if (task.q >= d.Lq) return;
  const int n = task.n, m = task.m, q = task.q;
  const int64_t nq = static_cast<int64_t>(n) * d.Lq + q;
  const int64_t row = nq * d.M + m;
  const uint8_t* vis = visible + nq * d.I;
  const int LP = d.L * d.P;
  const int64_t pix = static_cast<int64_t>(d.M) * d.D;
  const acc lse = group_lse<acc>(logits, vis, grp, d, nq, m);

  acc sum[V];
#pragma unroll
  for (int c = 0; c < V; ++c) sum[c] = acc(0);

  for (int i = 0; i < d.I; ++i) {
    if (!vis[i]) continue;
    const int64_t e = (nq * d.I + i) * d.M + m;
    const acc* xy = loc + e * d.P * 2;
    const acc* z = logits + e * LP;
    const scalar_t* v_i = value + (static_cast<int64_t>(n) * d.I + i) * d.S * pix + static_cast<int64_t>(m) * d.D +
                          grp.lane * V;
    for (int p0 = 0; p0 < d.P; p0 += d.G) {
      const int p = p0 + grp.lane;
      PointChunk<acc> chunk{0, 0, 0, min(d.G, d.P - p0)};  // one location for every level of the image
      if (p < d.P) {
        chunk.x = xy[2 * p];
        chunk.y = xy[2 * p + 1];
      }
      for (int l = 0; l < d.L; ++l) {
        const scalar_t* v_l = v_i + static_cast<int64_t>(levels.start[l]) * pix;
        chunk.a = p < d.P ? exp_acc(z[l * d.P + p] - lse) : acc(0);
        accumulate_points<scalar_t, kBatch>(grp, v_l, pix, levels.height[l], levels.width[l], chunk, sum);
      }
    }
  }
  if (ignore != nullptr) {
    const acc sink = exp_acc(-lse);
    acc ign[V];
    load_vec(ignore + static_cast<int64_t>(m) * d.D + grp.lane * V, ign);
#pragma unroll
    for (int c = 0; c < V; ++c) sum[c] = fma(sink, ign[c], sum[c]);
  }
  store_vec(out + row * d.D + grp.lane * V, sum);
  if (grp.lane == 0) lse_out[row] = lse;
}

template <typename scalar_t, bool kAtomic, int kBatch>
__global__ void __launch_bounds__(kThreads, gather_min_blocks<scalar_t>(kBatch, GatherKind::kBackward))
    mmfs_backward_kernel(const scalar_t* __restrict__ value, const acc_t<scalar_t>* __restrict__ loc,
                         const acc_t<scalar_t>* __restrict__ logits, const uint8_t* __restrict__ visible,
                         const scalar_t* __restrict__ ignore, const acc_t<scalar_t>* __restrict__ lse_in,
                         const scalar_t* __restrict__ grad_out, acc_t<scalar_t>* __restrict__ accum,
                         acc_t<scalar_t>* __restrict__ grad_loc, acc_t<scalar_t>* __restrict__ grad_logits, Dims d,
                         const __grid_constant__ LevelTable levels) {
  using acc = acc_t<scalar_t>;
  constexpr int V = Traits<scalar_t>::V;
  const Group grp = Group::make(d.G);
  const GroupTask task = group_task(d, kThreads / d.G);
  if (task.q >= d.Lq) return;
  const int n = task.n, m = task.m, q = task.q;
  const int64_t nq = static_cast<int64_t>(n) * d.Lq + q;
  const int64_t row = nq * d.M + m;
  const uint8_t* vis = visible + nq * d.I;
  const int LP = d.L * d.P;
  const int64_t pix = static_cast<int64_t>(d.M) * d.D;
  const acc lse = lse_in[row];

  acc g[V];
  {
    acc tmp[V];  // a separate load target keeps ptxas from spilling g (measured with -Xptxas -v)
    load_vec(grad_out + row * d.D + grp.lane * V, tmp);
#pragma unroll
    for (int c = 0; c < V; ++c) g[c] = tmp[c];
  }
  acc gbar = 0;  // this lane's share of sum_j a_j G_j + sink <g, ignore>
  if (ignore != nullptr) {
    acc ign[V];
    load_vec(ignore + static_cast<int64_t>(m) * d.D + grp.lane * V, ign);
    acc dot = 0;
#pragma unroll
    for (int c = 0; c < V; ++c) dot = fma(g[c], ign[c], dot);
    gbar = exp_acc(-lse) * dot;
  }

  for (int i = 0; i < d.I; ++i) {
    const int64_t e = (nq * d.I + i) * d.M + m;
    acc* gxy = grad_loc + e * d.P * 2;
    acc* gz = grad_logits + e * LP;
    if (!vis[i]) {
      for (int j = grp.lane; j < 2 * d.P; j += d.G) gxy[j] = acc(0);
      for (int j = grp.lane; j < LP; j += d.G) gz[j] = acc(0);
      continue;
    }
    const acc* xy = loc + e * d.P * 2;
    const acc* z = logits + e * LP;
    const int64_t image_offset = (static_cast<int64_t>(n) * d.I + i) * d.S * pix + static_cast<int64_t>(m) * d.D +
                                 grp.lane * V;
    const scalar_t* v_i = value + image_offset;
    for (int p0 = 0; p0 < d.P; p0 += d.G) {
      const int p = p0 + grp.lane;
      PointChunk<acc> chunk{0, 0, 0, min(d.G, d.P - p0)};  // one location for every level of the image
      if (p < d.P) {
        chunk.x = xy[2 * p];
        chunk.y = xy[2 * p + 1];
      }
      acc my_dx = 0, my_dy = 0;
      for (int l = 0; l < d.L; ++l) {
        const int H = levels.height[l], W = levels.width[l];
        const int64_t level_offset = static_cast<int64_t>(levels.start[l]) * pix;
        acc* accum_l = kAtomic ? accum + image_offset + level_offset : nullptr;
        chunk.a = p < d.P ? exp_acc(z[l * d.P + p] - lse) : acc(0);
        const PointGrad<acc> pg = backprop_points<scalar_t, kAtomic, kBatch>(grp, v_i + level_offset, accum_l, pix, H, W, g,
                                                                     chunk);
        if (p < d.P) {
          gz[l * d.P + p] = pg.sample;  // G_j; turned into d(logit) once gbar is known
          gbar = fma(chunk.a, pg.sample, gbar);
          my_dx = fma(chunk.a * pg.dx, static_cast<acc>(W), my_dx);
          my_dy = fma(chunk.a * pg.dy, static_cast<acc>(H), my_dy);
        }
      }
      if (p < d.P) {
        gxy[2 * p] = my_dx;
        gxy[2 * p + 1] = my_dy;
      }
    }
  }
  gbar = grp.sum(gbar);
  // d(logit_j) = a_j (G_j - gbar); each lane revisits exactly the entries it wrote.
  for (int i = 0; i < d.I; ++i) {
    if (!vis[i]) continue;
    const int64_t e = (nq * d.I + i) * d.M + m;
    const acc* z = logits + e * LP;
    acc* gz = grad_logits + e * LP;
    for (int p = grp.lane; p < d.P; p += d.G) {
      for (int l = 0; l < d.L; ++l) {
        const int j = l * d.P + p;
        gz[j] = exp_acc(z[j] - lse) * (gz[j] - gbar);
      }
    }
  }
}

// Slice ownership for d(value): CTA (n, image, head, level group, channel chunk); see owner_accumulate.
struct MmfsOwnerSource {
  const float* loc;
  const float* logits;
  const float* lse;
  const uint8_t* visible_mask;
  int n, i, m, I, M, Lq, LP, P, level_begin, group_levels;

  __device__ int64_t nq(int q) const { return static_cast<int64_t>(n) * Lq + q; }
  __device__ int items_per_query() const { return group_levels * P; }
  __device__ bool visible(int q) const { return visible_mask[nq(q) * I + i] != 0; }
  __device__ int64_t grad_row(int q) const { return nq(q) * M + m; }
  __device__ float abs_weight_sum(int) const { return 1.f; }  // softmax weights with a null slot: sum < 1
  __device__ void item(int q, int j, float& x, float& y, float& a, int& level) const {
    const int dl = j / P, p = j - dl * P;
    level = level_begin + dl;
    const int64_t e = (nq(q) * I + i) * M + m;
    a = __expf(logits[e * LP + level * P + p] - lse[grad_row(q)]);
    x = loc[(e * P + p) * 2];
    y = loc[(e * P + p) * 2 + 1];
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kOwnerThreads)
    mmfs_grad_value_owner_kernel(const float* __restrict__ loc, const float* __restrict__ logits,
                                 const uint8_t* __restrict__ visible, const float* __restrict__ lse_in,
                                 const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_value, Dims d,
                                 int chunk, const __grid_constant__ LevelTable levels,
                                 const __grid_constant__ OwnerGroups groups) {
  const int n_chunks = d.D / chunk;
  int bid = blockIdx.x;
  const int ck = bid % n_chunks;
  bid /= n_chunks;
  const int gi = bid % groups.count;
  bid /= groups.count;
  const int m = bid % d.M;
  bid /= d.M;
  const int i = bid % d.I, n = bid / d.I;
  const MmfsOwnerSource src{loc, logits, lse_in, visible, n, i, m, d.I, d.M, d.Lq, d.L * d.P, d.P,
                            groups.level_begin[gi], groups.level_end[gi] - groups.level_begin[gi]};
  constexpr bool kFixed = !std::is_same_v<scalar_t, float>;
  owner_accumulate<scalar_t, kFixed>(src, grad_out, grad_value + static_cast<int64_t>(m) * d.D,
                                     (static_cast<int64_t>(n) * d.I + i) * d.S + groups.row_begin[gi],
                                     static_cast<int64_t>(d.M) * d.D, d.Lq, d.D, chunk, ck * chunk, groups.rows[gi],
                                     groups.row_begin[gi], levels);
}

// Tensor cores: CTA (n, image, head, row tile of the image's rows); see tensor_accumulate.
template <typename scalar_t, int kD>
__global__ void __launch_bounds__(kTensorThreads, 2)
    mmfs_grad_value_tensor_kernel(const float* __restrict__ loc, const float* __restrict__ logits,
                                  const uint8_t* __restrict__ visible, const float* __restrict__ lse_in,
                                  const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_value, Dims d,
                                  int tiles, const __grid_constant__ LevelTable levels) {
  const int tile = blockIdx.x % tiles;
  int bid = blockIdx.x / tiles;
  const int m = bid % d.M;
  bid /= d.M;
  const int i = bid % d.I, n = bid / d.I;
  const MmfsOwnerSource src{loc, logits, lse_in, visible, n, i, m, d.I, d.M, d.Lq, d.L * d.P, d.P, 0, d.L};
  tensor_accumulate<scalar_t, kD>(src, grad_out, grad_value + static_cast<int64_t>(m) * kD,
                                  (static_cast<int64_t>(n) * d.I + i) * d.S, static_cast<int64_t>(d.M) * kD, d.Lq,
                                  d.P, static_cast<int>(d.S), tile, levels);
}

}  // namespace
}  // namespace cuda

void mmfs_forward_cuda(const MmfsProblem& pr, const MmfsForwardArgs& args, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  cuda::dispatch_value(pr.value_dtype, [&](auto vt) {
    using scalar_t = typename decltype(vt)::type;
    using acc = acc_t<scalar_t>;
    const cuda::Dims d = cuda::make_dims(pr, cuda::group_size_for<scalar_t>(pr.channels), cuda::kThreads);
    cuda::require_aligned(args.value, "value");
    cuda::require_aligned(args.output, "output");
    cuda::require_aligned(args.ignore_token, "ignore_token");
    const int64_t blocks = static_cast<int64_t>(pr.batch) * d.M * d.q_blocks;
    if (blocks == 0) return;
    const unsigned grid = cuda::grid_blocks(blocks, "mmfs_forward");
    cuda::dispatch_gather_batch<1, 4>([&](auto batch) {
      const auto kernel = cuda::mmfs_forward_kernel<scalar_t, decltype(batch)::value>;
      kernel<<<grid, d.threads, 0, stream>>>(
          static_cast<const scalar_t*>(args.value), static_cast<const acc*>(args.locations),
          static_cast<const acc*>(args.logits), args.visible, static_cast<const scalar_t*>(args.ignore_token),
          static_cast<scalar_t*>(args.output), static_cast<acc*>(args.lse),
          cuda::prepare_group_launch(d, kernel, grid), pr.levels);
    });
    cuda::check_launch("mmfs_forward_kernel");
  });
}

GradValueStrategy mmfs_grad_value_strategy(const MmfsProblem& pr, GradValueStrategy requested) {
  return cuda::choose_grad_value_strategy(pr.levels, pr.channels, pr.value_dtype, pr.queries, pr.points, requested,
                                          cuda::StrategyOp::kMmfs);
}

void mmfs_backward_cuda(const MmfsProblem& pr, const MmfsBackwardArgs& args, GradValueStrategy strategy,
                        void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  strategy = mmfs_grad_value_strategy(pr, strategy);
  cuda::dispatch_value(pr.value_dtype, [&](auto vt) {
    using scalar_t = typename decltype(vt)::type;
    using acc = acc_t<scalar_t>;
    const cuda::Dims d = cuda::make_dims(pr, cuda::group_size_for<scalar_t>(pr.channels), cuda::kThreads);
    cuda::require_aligned(args.value, "value");
    cuda::require_aligned(args.grad_output, "grad_output");
    cuda::require_aligned(args.ignore_token, "ignore_token");
    cuda::require_aligned(args.grad_value_accum, "grad_value_accum");
    const int64_t value_elems = pr.batch * pr.images * pr.image_len * pr.heads * pr.channels;
    const unsigned blocks = cuda::grid_blocks(static_cast<int64_t>(pr.batch) * d.M * d.q_blocks, "mmfs_backward");
    const auto* value = static_cast<const scalar_t*>(args.value);
    const auto* loc = static_cast<const acc*>(args.locations);
    const auto* logits = static_cast<const acc*>(args.logits);
    const auto* ignore = static_cast<const scalar_t*>(args.ignore_token);
    const auto* lse = static_cast<const acc*>(args.lse);
    const auto* gout = static_cast<const scalar_t*>(args.grad_output);
    auto* gloc = static_cast<acc*>(args.grad_locations);
    auto* glogits = static_cast<acc*>(args.grad_logits);

    if (strategy == GradValueStrategy::kAtomic) {
      acc* accum = cuda::start_atomic<scalar_t>(args.grad_value, args.grad_value_accum, value_elems, stream);
      if (blocks > 0) {
        cuda::dispatch_gather_batch<2, 2>([&](auto batch) {
          const auto kernel = cuda::mmfs_backward_kernel<scalar_t, true, decltype(batch)::value>;
          const cuda::Dims ordered = cuda::prepare_group_launch(d, kernel, blocks, /*swizzle_by_default=*/true);
          kernel<<<blocks, cuda::kThreads, 0, stream>>>(value, loc, logits, args.visible, ignore, lse, gout, accum,
                                                        gloc, glogits, ordered, pr.levels);
        });
        cuda::check_launch("mmfs_backward_kernel<atomic>");
      }
      cuda::finish_atomic<scalar_t>(accum, args.grad_value, value_elems, stream);
      return;
    }
    if constexpr (std::is_same_v<scalar_t, double>) {
      throw ArgumentError("grad_value strategy 'owner' is not available for float64");
    } else {
      if (blocks > 0) {
        cuda::dispatch_gather_batch<2, 2>([&](auto batch) {
          const auto kernel = cuda::mmfs_backward_kernel<scalar_t, false, decltype(batch)::value>;
          const cuda::Dims ordered = cuda::prepare_group_launch(d, kernel, blocks, /*swizzle_by_default=*/true);
          kernel<<<blocks, cuda::kThreads, 0, stream>>>(value, loc, logits, args.visible, ignore, lse, gout, nullptr,
                                                        gloc, glogits, ordered, pr.levels);
        });
        cuda::check_launch("mmfs_backward_kernel");
      }
      if constexpr (!std::is_same_v<scalar_t, float>) {
        if (strategy == GradValueStrategy::kTensor) {
          cuda::dispatch_tensor_channels(pr.channels, [&](auto dc) {
            constexpr int kD = decltype(dc)::value;
            const int64_t tiles = cuda::tensor_tiles<kD>(pr.image_len);
            cuda::launch_tensor(cuda::mmfs_grad_value_tensor_kernel<scalar_t, kD>, cuda::TensorTile<kD>::kSmem,
                                pr.batch * pr.images * pr.heads, tiles, "mmfs_grad_value_tensor_kernel", stream, loc,
                                logits, args.visible, lse, gout, static_cast<scalar_t*>(args.grad_value), d,
                                static_cast<int>(tiles), pr.levels);
          });
          return;
        }
      }
      const cuda::OwnerPlan plan = cuda::plan_owner(pr.levels, pr.channels, cuda::owner_budget());
      cuda::launch_owner(cuda::mmfs_grad_value_owner_kernel<scalar_t>, plan, pr.batch * pr.images * pr.heads,
                         pr.channels, "mmfs_grad_value_owner_kernel", stream, loc, logits, args.visible, lse, gout,
                         static_cast<scalar_t*>(args.grad_value), d, plan.chunk, pr.levels, plan.groups);
    }
  });
}

}  // namespace deem
