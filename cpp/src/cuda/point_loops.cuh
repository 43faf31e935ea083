// The per-point inner loops shared by the generic (msda_cuda.cu) and the MMFS (mmfs_cuda.cu) kernels.
//
// A group of G lanes works on one (n, q, head); each lane holds V channels of the head. The caller loads a
// chunk of up to G points of one level with one point per lane (location x, y and weight a, all in the
// accumulation type) and the helpers walk the chunk: lane j's point is broadcast to the group, its bilinear
// corners are computed once, and every lane handles its own channels of the four 16-byte corner loads.
#pragma once

#include <cstdlib>
#include <string>
#include <type_traits>

#include "kernel_common.cuh"

namespace deem::cuda {

// Sizes a group kernel reads, passed by value (kernel parameter space). The bindings checked that every size
// fits int32; S counts the value rows of one batch slice (all levels, or the levels of one image).
struct GroupDims {
  int M, D, Lq, P, L, G, q_blocks, threads;
  int64_t S;
  // CTA order (see group_task): `wave` CTAs run at once, `per_sm` of them on each multiprocessor; 0: off.
  int wave, per_sm, blocks;
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
  d.wave = d.per_sm = d.blocks = 0;
  return d;
}

// Whether a group kernel orders its CTAs so that the CTAs resident on one multiprocessor share (n, head):
// DEEM_CTA_SWIZZLE=0 or 1 for every kernel (for measuring it), else the launcher's default. The defaults follow
// one H200 measurement (2026-12-02, benchmarks/RESULTS.md): the swizzle with batches of 4 (forward) / 2
// (backward) points ran the forward up to 1.2x slower and the generic backward 3% slower than neither, and the
// MMFS backward 6% faster; so only the MMFS backward uses them.
inline bool cta_swizzle_enabled(bool by_default) {
  const char* v = std::getenv("DEEM_CTA_SWIZZLE");
  if (v == nullptr || *v == '\0') return by_default;
  return std::string(v) == "1";
}

// f(std::integral_constant<int, B>) with the gather kernels' points per batch: DEEM_GATHER_BATCH = 1, 2 or 4
// (for measuring them), else kDefault; at most kMax (the backward's live state spills past 2). The launchers'
// defaults: 2 for the MMFS backward, else 1 (see cta_swizzle_enabled for the measurement).
template <int kDefault, int kMax, typename F>
void dispatch_gather_batch(F&& f) {
  const char* v = std::getenv("DEEM_GATHER_BATCH");
  const int b = v == nullptr || *v == '\0' ? kDefault : std::atoi(v);
  if (b <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (b == 2 || kMax < 4) {
    f(std::integral_constant<int, (kMax < 2 ? 1 : 2)>{});
  } else {
    f(std::integral_constant<int, (kMax < 4 ? 2 : 4)>{});
  }
}

// Resident CTAs of 256 threads per multiprocessor that a gather kernel with kBatch points per batch is built for
// (a register cap; 4 * kBatch 16-byte loads are live at once), by kind of kernel. float64 (tests only): none.
enum class GatherKind { kMsdaForward, kMmfsForward, kBackward };
template <typename scalar_t>
constexpr int gather_min_blocks(int batch, GatherKind kind) {
  if (sizeof(scalar_t) == 8) return 1;
  switch (kind) {
    case GatherKind::kMsdaForward: return batch >= 4 ? 2 : batch == 2 ? 3 : 4;
    case GatherKind::kMmfsForward: return batch >= 4 ? 2 : 1;  // more live state (softmax, per-image pointers)
    case GatherKind::kBackward: return batch >= 2 ? 2 : 1;
  }
  return 1;
}

// CTAs of `kernel` (with `threads` threads) resident per multiprocessor, and the multiprocessor count, of the
// current device; the carve-out is set to all L1 on first use (group kernels use no shared memory, and their
// gathers live on L1 hits). Cached per (kernel, device).
struct Residency {
  int per_sm = 0, sms = 0;
};
Residency group_kernel_residency(const void* kernel, int threads);

// Prepares a launch of the group kernel `kernel` with `blocks` CTAs of d.threads threads (the CTA order).
template <typename DimsT, typename Kernel>
inline DimsT prepare_group_launch(DimsT d, Kernel kernel, int64_t blocks, bool swizzle_by_default = false) {
  d.blocks = static_cast<int>(blocks);  // the caller checked grid_blocks()
  d.wave = d.per_sm = 0;
  const Residency r = group_kernel_residency(reinterpret_cast<const void*>(kernel), d.threads);
  if (!cta_swizzle_enabled(swizzle_by_default) || r.per_sm <= 1) return d;
  d.per_sm = r.per_sm;
  d.wave = r.per_sm * r.sms;
  return d;
}

// The (batch n, head m, query q) of this thread's group. CTAs are dealt to the multiprocessors in launch
// order, one per multiprocessor in turn, so the CTAs that run together on one multiprocessor are those
// `wave / per_sm` apart. Those get consecutive tiles of `groups_per_block` queries of one (n, head) and read
// the same value slice through one L1 (levels in the outer loop: the slice of one image or level stays hot).
// The ordering only moves work between CTAs; any dealing order gives the same results.
struct GroupTask {
  int n, m, q;
};

__device__ __forceinline__ GroupTask group_task(const GroupDims& d, int groups_per_block) {
  int b = static_cast<int>(blockIdx.x);
  if (d.wave > 0) {
    const int wave = b / d.wave;
    if ((wave + 1) * static_cast<int64_t>(d.wave) <= d.blocks) {  // full waves only: a bijection on them
      const int j = b - wave * d.wave;
      const int sms = d.wave / d.per_sm;
      b = wave * d.wave + (j % sms) * d.per_sm + j / sms;
    }
  }
  const int nm = b / d.q_blocks;
  GroupTask t;
  t.q = (b - nm * d.q_blocks) * groups_per_block + static_cast<int>(threadIdx.x) / d.G;
  t.n = nm / d.M;
  t.m = nm - t.n * d.M;
  return t;
}

// The group's chunk of points of one level, one per lane (lanes >= count hold zeros).
template <typename acc>
struct PointChunk {
  acc x, y, a;
  int count;
};

// Forward: sum += a_j * bilinear(V_l, x_j, y_j) over the chunk. `v_l` points at this lane's channels of
// the level's first pixel; pixels are `pix` elements apart. Points go in batches of kBatch: the batch's
// 4 * kBatch corner loads are issued before the first is used (loads in flight hide the L1/L2 latency).
// Slots past the chunk get weight 0 and load pixel 0 (always valid).
template <typename scalar_t, int kBatch>
__device__ __forceinline__ void accumulate_points(const Group& grp, const scalar_t* __restrict__ v_l, int64_t pix,
                                                  int height, int width, const PointChunk<acc_t<scalar_t>>& chunk,
                                                  acc_t<scalar_t> (&sum)[Traits<scalar_t>::V]) {
  using acc = acc_t<scalar_t>;
  constexpr int V = Traits<scalar_t>::V;
#pragma unroll(kBatch == 1 ? 2 : 1)
  for (int j0 = 0; j0 < chunk.count; j0 += kBatch) {
    RawVec<scalar_t> raw[kBatch][4];
    acc wk[kBatch][4];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int j = j0 + u;
      const int src = j < chunk.count ? j : 0;
      const acc x = grp.broadcast(chunk.x, src), y = grp.broadcast(chunk.y, src);
      const acc a = j < chunk.count ? grp.broadcast(chunk.a, src) : acc(0);
      const detail::Bilinear<acc> b = detail::bilinear<acc>(x, y, height, width);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        wk[u][k] = a * b.weight[k];
        raw[u][k] = load_raw(v_l + static_cast<int64_t>(b.pixel[k]) * pix);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        acc vk[V];
        convert(raw[u][k], vk);
#pragma unroll
        for (int c = 0; c < V; ++c) sum[c] = fma(wk[u][k], vk[c], sum[c]);
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
// `v_l`); otherwise `accum_l` is unused and may be null. Points go in batches of kBatch as in the forward: the
// batch's corner loads are in flight together and its 3 * kBatch group reductions interleave.
template <typename scalar_t, bool kAtomic, int kBatch>
__device__ __forceinline__ PointGrad<acc_t<scalar_t>> backprop_points(
    const Group& grp, const scalar_t* __restrict__ v_l, acc_t<scalar_t>* __restrict__ accum_l, int64_t pix,
    int height, int width, const acc_t<scalar_t> (&g)[Traits<scalar_t>::V], const PointChunk<acc_t<scalar_t>> chunk) {
  using acc = acc_t<scalar_t>;
  constexpr int V = Traits<scalar_t>::V;
  PointGrad<acc> mine{acc(0), acc(0), acc(0)};
#pragma unroll(kBatch == 1 ? 2 : 1)
  for (int j0 = 0; j0 < chunk.count; j0 += kBatch) {
    detail::Bilinear<acc> b[kBatch];
    acc a[kBatch];
    RawVec<scalar_t> raw[kBatch][4];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int j = j0 + u;
      const int src = j < chunk.count ? j : 0;
      const acc x = grp.broadcast(chunk.x, src), y = grp.broadcast(chunk.y, src);
      a[u] = j < chunk.count ? grp.broadcast(chunk.a, src) : acc(0);
      b[u] = detail::bilinear<acc>(x, y, height, width);
#pragma unroll
      for (int k = 0; k < 4; ++k) raw[u][k] = load_raw(v_l + static_cast<int64_t>(b[u].pixel[k]) * pix);
    }
    acc ga[kBatch], gx[kBatch], gy[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      ga[u] = gx[u] = gy[u] = acc(0);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        acc vk[V];
        convert(raw[u][k], vk);
        acc dot = 0;
#pragma unroll
        for (int c = 0; c < V; ++c) dot = fma(g[c], vk[c], dot);
        ga[u] = fma(b[u].weight[k], dot, ga[u]);
        gx[u] = fma(b[u].dx[k], dot, gx[u]);
        gy[u] = fma(b[u].dy[k], dot, gy[u]);
      }
    }
    for (int off = grp.size >> 1; off > 0; off >>= 1) {
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        ga[u] += __shfl_xor_sync(grp.mask, ga[u], off, grp.size);
        gx[u] += __shfl_xor_sync(grp.mask, gx[u], off, grp.size);
        gy[u] += __shfl_xor_sync(grp.mask, gy[u], off, grp.size);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (grp.lane == j0 + u) {
        mine.sample = ga[u];
        mine.dx = gx[u];
        mine.dy = gy[u];
      }
      if constexpr (kAtomic) {
        if (b[u].inside && a[u] != acc(0)) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const acc wk = a[u] * b[u].weight[k];
            if (wk == acc(0)) continue;
            acc t[V];
#pragma unroll
            for (int c = 0; c < V; ++c) t[c] = wk * g[c];
            atomic_add_vec(accum_l + static_cast<int64_t>(b[u].pixel[k]) * pix, t);
          }
        }
      }
    }
  }
  return mine;
}

}  // namespace deem::cuda
