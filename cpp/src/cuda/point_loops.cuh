// The per-point inner loops shared by the generic (msda_cuda.cu) and the MMFS (mmfs_cuda.cu) kernels.
//
// A group of G lanes works on one (n, q, head); each lane holds V channels of the head. The caller loads a
// chunk of up to G points of one level with one point per lane (location x, y and weight a, all in the
// accumulation type) and the helpers walk the chunk: lane j's point is broadcast to the group, its bilinear
// corners are computed once, and every lane handles its own channels of the four 16-byte corner loads.
#pragma once

#include "kernel_common.cuh"

namespace deem::cuda {

// Sizes a group kernel reads, passed by value (kernel parameter space). The bindings checked that every size
// fits int32; S counts the value rows of one batch slice (all levels, or the levels of one image).
struct GroupDims {
  int M, D, Lq, P, L, G, q_blocks, threads;
  int64_t S;
};

inline GroupDims group_dims(int64_t heads, int64_t channels, int64_t queries, int64_t points, int levels,
                            int64_t rows, int group, int threads) {
  GroupDims d;
  d.M = static_cast<int>(heads);
  d.D = static_cast<int>(channels);
  d.Lq = static_cast<int>(queries);
  d.P = static_cast<int>(points);
  d.L = levels;
  d.G = group;
  d.S = rows;
  d.threads = threads;
  const int64_t groups_per_block = threads / group;
  d.q_blocks = static_cast<int>((queries + groups_per_block - 1) / groups_per_block);  // Lq < 2^31: fits
  return d;
}

// The (batch n, head m, query q) of this thread's group. The CTAs of one (n, head) take consecutive tiles of
// `groups_per_block` queries, so they read the same value slice.
struct GroupTask {
  int n, m, q;
};

__device__ __forceinline__ GroupTask group_task(int q_blocks, int groups_per_block, int group, int heads) {
  const int nm = blockIdx.x / q_blocks;
  GroupTask t;
  t.q = (blockIdx.x - nm * q_blocks) * groups_per_block + threadIdx.x / group;
  t.n = nm / heads;
  t.m = nm - t.n * heads;
  return t;
}

// The group's chunk of points of one level, one per lane (lanes >= count hold zeros).
template <typename acc>
struct PointChunk {
  acc x, y, a;
  int count;
};

// Forward: sum += a_j * bilinear(V_l, x_j, y_j) over the chunk. `v_l` points at this lane's channels of
// the level's first pixel; pixels are `pix` elements apart.
template <typename scalar_t>
__device__ __forceinline__ void accumulate_points(const Group& grp, const scalar_t* __restrict__ v_l, int64_t pix,
                                                  int height, int width, const PointChunk<acc_t<scalar_t>>& chunk,
                                                  acc_t<scalar_t> (&sum)[Traits<scalar_t>::V]) {
  using acc = acc_t<scalar_t>;
  constexpr int V = Traits<scalar_t>::V;
#pragma unroll 2
  for (int j = 0; j < chunk.count; ++j) {
    const acc x = grp.broadcast(chunk.x, j), y = grp.broadcast(chunk.y, j), a = grp.broadcast(chunk.a, j);
    const detail::Bilinear<acc> b = detail::bilinear<acc>(x, y, height, width);
    acc vk[4][V];
#pragma unroll
    for (int k = 0; k < 4; ++k) load_vec(v_l + static_cast<int64_t>(b.pixel[k]) * pix, vk[k]);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const acc wk = a * b.weight[k];
#pragma unroll
      for (int c = 0; c < V; ++c) sum[c] = fma(wk, vk[k][c], sum[c]);
    }
  }
}

// The group-reduced gradients of one point, held by the lane that loaded it.
template <typename acc>
struct PointGrad {
  acc sample;  // G = <g, bilinear sample>: d(out)/d(weight) against the output gradient g
  acc dx, dy;  // d G / d x_im, d G / d y_im (image-space coordinates; the caller scales by W, H)
};

// Backward over the chunk: lane j receives point j's PointGrad (all reductions over the group's channels).
// With kAtomic, a_j * w_k * g is also added to the four corners of the fp32 buffer `accum_l` (laid out like
// `v_l`); otherwise `accum_l` is unused and may be null.
template <typename scalar_t, bool kAtomic>
__device__ __forceinline__ PointGrad<acc_t<scalar_t>> backprop_points(
    const Group& grp, const scalar_t* __restrict__ v_l, acc_t<scalar_t>* __restrict__ accum_l, int64_t pix,
    int height, int width, const acc_t<scalar_t> (&g)[Traits<scalar_t>::V], const PointChunk<acc_t<scalar_t>> chunk) {
  using acc = acc_t<scalar_t>;
  constexpr int V = Traits<scalar_t>::V;
  PointGrad<acc> mine{acc(0), acc(0), acc(0)};
#pragma unroll 2
  for (int j = 0; j < chunk.count; ++j) {
    const acc x = grp.broadcast(chunk.x, j), y = grp.broadcast(chunk.y, j), a = grp.broadcast(chunk.a, j);
    const detail::Bilinear<acc> b = detail::bilinear<acc>(x, y, height, width);
    acc ga = 0, gx = 0, gy = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      acc vk[V];
      load_vec(v_l + static_cast<int64_t>(b.pixel[k]) * pix, vk);
      acc dot = 0;
#pragma unroll
      for (int c = 0; c < V; ++c) dot = fma(g[c], vk[c], dot);
      ga = fma(b.weight[k], dot, ga);
      gx = fma(b.dx[k], dot, gx);
      gy = fma(b.dy[k], dot, gy);
    }
    ga = grp.sum(ga);
    gx = grp.sum(gx);
    gy = grp.sum(gy);
    if (grp.lane == j) {
      mine.sample = ga;
      mine.dx = gx;
      mine.dy = gy;
    }
    if constexpr (kAtomic) {
      if (b.inside && a != acc(0)) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const acc wk = a * b.weight[k];
          if (wk == acc(0)) continue;
          acc t[V];
#pragma unroll
          for (int c = 0; c < V; ++c) t[c] = wk * g[c];
          atomic_add_vec(accum_l + static_cast<int64_t>(b.pixel[k]) * pix, t);
        }
      }
    }
  }
  return mine;
}

}  // namespace deem::cuda
