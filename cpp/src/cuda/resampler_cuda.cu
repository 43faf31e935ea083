// CUDA Q-Former attention (deem/resampler.h): qk-LayerNorm, scores, softmax with the key mask, hash dropout and
// P·V in one launch forward; the whole backward (dV, dP, dS, dQ, dK and both LayerNorm backwards with their
// parameter-gradient partials) in one launch. One CTA of 8 warps owns one (image, head): every operand of the
// (Lq x Lk x 64) problem lives in shared memory, the four/six GEMMs run on tensor cores through WMMA 16x16x16
// fragments (16-bit inputs, fp32 accumulation), the softmax and LayerNorms run per row on one warp. No atomics,
// no global workspace, no host sync: deterministic and CUDA-graph capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "deem/resampler.h"
#include "dispatch.cuh"
#include "kernel_common.cuh"

namespace deem {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kDim = 64;  // head dim
constexpr int kTile = 16;

int64_t round16(int64_t n) { return (n + kTile - 1) / kTile * kTile; }

// Shared-memory carve-up (bytes) for padded sizes lqp x lkp; the forward and the backward share it.
struct Layout {
  int64_t lqp = 0, lkp = 0;
  int64_t q = 0, k = 0, v = 0, dout = 0, f = 0, p = 0, scratch = 0, rows = 0, flags = 0, total = 0;
  int64_t f_ld = 0;  // leading dimension of the fp32 score buffer (= lkp)
};

Layout layout_for(int64_t queries, int64_t keys) {
  Layout l;
  l.lqp = round16(std::max<int64_t>(queries, 1));
  l.lkp = round16(std::max<int64_t>(keys, 1));
  l.f_ld = l.lkp;
  const int64_t half = 2;  // 16-bit elements
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off += (bytes + 127) / 128 * 128;
    return at;
  };
  l.q = take(l.lqp * kDim * half);
  l.k = take(l.lkp * kDim * half);
  l.v = take(l.lkp * kDim * half);
  l.dout = take(l.lqp * kDim * half);
  l.f = take(std::max({l.lqp * l.lkp, l.lkp * kDim, l.lqp * kDim}) * 4);
  l.p = take(l.lqp * l.lkp * half);
  l.scratch = take(kWarps * 256 * 4);
  l.rows = take(l.lqp * 2 * 4);  // lse, D per query row
  l.flags = take(l.lkp);
  l.total = off;
  return l;
}

template <typename T> __device__ __forceinline__ float f32(T v);
template <> __device__ __forceinline__ float f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ float param(const void* p, int i, bool fp32) {
  return fp32 ? static_cast<const float*>(p)[i] : f32(static_cast<const T*>(p)[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  uint32_t key = 0, threshold = 0;
  float inv_keep = 1.0f;
  bool on = false;
  // keep factor of element (b, h, i, j): 0 or 1/(1-p)
  __device__ __forceinline__ float factor(uint32_t flat) const {
    if (!on) return 1.0f;
    return mix32(flat + key) >= threshold ? inv_keep : 0.0f;
  }
};

__device__ __forceinline__ Dropout make_dropout(const QFormerAttentionProblem& pr, const int64_t* seed) {
  Dropout d;
  if (pr.dropout_p <= 0.0f || seed == nullptr) return d;
  const uint64_t s = static_cast<uint64_t>(*seed);
  d.on = true;
  d.key = mix32(static_cast<uint32_t>(s) ^ mix32(static_cast<uint32_t>(s >> 32)));
  const double t = static_cast<double>(pr.dropout_p) * 4294967296.0;
  d.threshold = t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
  d.inv_keep = 1.0f / (1.0f - pr.dropout_p);
  return d;
}

// Rows [0, padded) of a [rows, 64] 16-bit matrix into shared memory, LayerNorm'ed when `w` is given; rows >= n are 0.
template <typename T>
__device__ void load_rows(T* dst, const T* src, int64_t batch_stride, int64_t row_stride, int b, int h, int n,
                          int padded, const void* w, const void* bias, bool norm_fp32, float eps) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < padded; r += kWarps) {
    float x0 = 0.f, x1 = 0.f;
    if (r < n) {
      const T* row = src + static_cast<int64_t>(b) * batch_stride + static_cast<int64_t>(r) * row_stride + h * kDim;
      x0 = f32(row[lane]);
      x1 = f32(row[lane + 32]);
      if (w != nullptr) {
        const float mean = warp_sum(x0 + x1) * (1.0f / kDim);
        const float d0 = x0 - mean, d1 = x1 - mean;
        const float rstd = rsqrtf(warp_sum(d0 * d0 + d1 * d1) * (1.0f / kDim) + eps);
        x0 = d0 * rstd * param<T>(w, lane, norm_fp32) + param<T>(bias, lane, norm_fp32);
        x1 = d1 * rstd * param<T>(w, lane + 32, norm_fp32) + param<T>(bias, lane + 32, norm_fp32);
      }
    }
    dst[r * kDim + lane] = from_f32<T>(x0);
    dst[r * kDim + lane + 32] = from_f32<T>(x1);
  }
}

// Key visibility flags; returns whether any key is visible (else every key counts, with equal scores).
__device__ bool load_flags(uint8_t* flags, const uint8_t* key_mask, int b, int keys, int padded) {
  bool any = false;
  for (int j = threadIdx.x; j < padded; j += kThreads) {
    const bool vis = j < keys && (key_mask == nullptr || key_mask[static_cast<int64_t>(b) * keys + j] != 0);
    flags[j] = vis ? 1 : 0;
    any = any || vis;
  }
  const bool any_visible = __syncthreads_or(any) != 0;
  if (!any_visible) {
    for (int j = threadIdx.x; j < padded; j += kThreads) flags[j] = j < keys ? 1 : 0;
  }
  __syncthreads();
  return any_visible;
}

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major>;
template <typename T>
using FragAT = wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::col_major>;
template <typename T>
using FragB = wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major>;
template <typename T>
using FragBT = wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float>;

// C[m, n] = A[m, :] · B[n, :] (B given row-major by rows n: "A Bᵀ"), A [M, K] ld lda, B [N, K] ld ldb.
template <typename T>
__device__ __forceinline__ void mma_abt(FragC& acc, const T* a, int lda, const T* bt, int ldb, int ksteps) {
  wmma::fill_fragment(acc, 0.0f);
  FragA<T> fa;
  FragBT<T> fb;
  for (int k = 0; k < ksteps; ++k) {
    wmma::load_matrix_sync(fa, a + k * kTile, lda);
    wmma::load_matrix_sync(fb, bt + k * kTile, ldb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

// C = A · B with A [M, K] row-major (ld lda) and B [K, N] row-major (ld ldb).
template <typename T>
__device__ __forceinline__ void mma_ab(FragC& acc, const T* a, int lda, const T* b, int ldb, int ksteps) {
  wmma::fill_fragment(acc, 0.0f);
  FragA<T> fa;
  FragB<T> fb;
  for (int k = 0; k < ksteps; ++k) {
    wmma::load_matrix_sync(fa, a + k * kTile, lda);
    wmma::load_matrix_sync(fb, b + static_cast<int64_t>(k) * kTile * ldb, ldb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

// C = Aᵀ · B with A stored [K, M] row-major (ld lda) and B [K, N] row-major (ld ldb).
template <typename T>
__device__ __forceinline__ void mma_atb(FragC& acc, const T* a, int lda, const T* b, int ldb, int ksteps) {
  wmma::fill_fragment(acc, 0.0f);
  FragAT<T> fa;
  FragB<T> fb;
  for (int k = 0; k < ksteps; ++k) {
    wmma::load_matrix_sync(fa, a + static_cast<int64_t>(k) * kTile * lda, lda);
    wmma::load_matrix_sync(fb, b + static_cast<int64_t>(k) * kTile * ldb, ldb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

// S = Q̂ K̂ᵀ (unscaled) into the fp32 buffer.
template <typename T>
__device__ void scores(float* f, int ldf, const T* qs, const T* ks, int lqp, int lkp) {
  const int warp = threadIdx.x / 32;
  const int tn = lkp / kTile, tiles = (lqp / kTile) * tn;
  for (int t = warp; t < tiles; t += kWarps) {
    const int m = t / tn, n = t % tn;
    FragC acc;
    mma_abt(acc, qs + m * kTile * kDim, kDim, ks + n * kTile * kDim, kDim, kDim / kTile);
    wmma::store_matrix_sync(f + m * kTile * ldf + n * kTile, acc, ldf, wmma::mem_row_major);
  }
}

__device__ __forceinline__ float effective_score(float s, float scale, bool any_visible) {
  return any_visible ? s * scale : 0.0f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(QFormerAttentionProblem pr, QFormerAttentionForwardArgs a, Layout l) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem + l.q);
  T* ks = reinterpret_cast<T*>(smem + l.k);
  T* vs = reinterpret_cast<T*>(smem + l.v);
  float* f = reinterpret_cast<float*>(smem + l.f);
  T* ps = reinterpret_cast<T*>(smem + l.p);
  float* scratch = reinterpret_cast<float*>(smem + l.scratch);
  uint8_t* flags = smem + l.flags;
  const int b = blockIdx.x / pr.heads, h = blockIdx.x % pr.heads;
  const int Lq = static_cast<int>(pr.queries), Lk = static_cast<int>(pr.keys);
  const int lqp = static_cast<int>(l.lqp), lkp = static_cast<int>(l.lkp), ldf = static_cast<int>(l.f_ld);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t hd = pr.heads * kDim;

  const bool any_visible = load_flags(flags, a.key_mask, b, Lk, lkp);
  load_rows<T>(qs, static_cast<const T*>(a.q), pr.q_strides[0], pr.q_strides[1], b, h, Lq, lqp,
               pr.q_norm ? a.q_weight : nullptr, a.q_bias, pr.norm_fp32, pr.eps);
  load_rows<T>(ks, static_cast<const T*>(a.k), pr.k_strides[0], pr.k_strides[1], b, h, Lk, lkp,
               pr.k_norm ? a.k_weight : nullptr, a.k_bias, pr.norm_fp32, pr.eps);
  load_rows<T>(vs, static_cast<const T*>(a.v), pr.v_strides[0], pr.v_strides[1], b, h, Lk, lkp, nullptr, nullptr,
               false, 0.f);
  __syncthreads();
  scores(f, ldf, qs, ks, lqp, lkp);
  __syncthreads();

  const Dropout drop = make_dropout(pr, a.seed);
  for (int i = warp; i < lqp; i += kWarps) {
    if (i >= Lq) {
      for (int j = lane; j < lkp; j += 32) ps[i * lkp + j] = from_f32<T>(0.f);
      continue;
    }
    float mx = -INFINITY;
    for (int j = lane; j < lkp; j += 32) {
      if (flags[j]) mx = fmaxf(mx, effective_score(f[i * ldf + j], pr.scale, any_visible));
    }
    mx = warp_max(mx);
    float sum = 0.f;
    for (int j = lane; j < lkp; j += 32) {
      if (flags[j]) sum += __expf(effective_score(f[i * ldf + j], pr.scale, any_visible) - mx);
    }
    const float lse = mx + __logf(warp_sum(sum));
    const uint32_t row = static_cast<uint32_t>(((static_cast<int64_t>(b) * pr.heads + h) * Lq + i) * Lk);
    for (int j = lane; j < lkp; j += 32) {
      float p = 0.f;
      if (flags[j]) p = __expf(effective_score(f[i * ldf + j], pr.scale, any_visible) - lse) * drop.factor(row + j);
      ps[i * lkp + j] = from_f32<T>(p);
    }
    if (lane == 0) a.lse[(static_cast<int64_t>(b) * pr.heads + h) * Lq + i] = lse;
  }
  __syncthreads();

  // out = P' V, through the warp's scratch tile
  float* tile = scratch + warp * 256;
  T* out = static_cast<T*>(a.out);
  const int tiles = (lqp / kTile) * (kDim / kTile);
  for (int t = warp; t < tiles; t += kWarps) {
    const int m = t / (kDim / kTile), n = t % (kDim / kTile);
    FragC acc;
    mma_ab(acc, ps + m * kTile * lkp, lkp, vs + n * kTile, kDim, lkp / kTile);
    wmma::store_matrix_sync(tile, acc, kTile, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int i = m * kTile + e / kTile, c = n * kTile + e % kTile;
      if (i < Lq) out[(static_cast<int64_t>(b) * Lq + i) * hd + h * kDim + c] = from_f32<T>(tile[e]);
    }
    __syncwarp();
  }
}

// LayerNorm backward of rows [0, n) whose output gradients are g [rows, 64] fp32 (shared); writes dx (dtype T)
// and adds this CTA's d weight / d bias into partial[0..63] / partial[64..127] (through the scratch).
template <typename T>
__device__ void norm_backward(const float* g, const T* src, int64_t batch_stride, int64_t row_stride, int b, int h,
                              int n, const void* w, bool norm_fp32, float eps, T* dst, int64_t dst_row, float* scratch,
                              float* partial_w, float* partial_b) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float gw0 = 0.f, gw1 = 0.f, gb0 = 0.f, gb1 = 0.f;
  for (int r = warp; r < n; r += kWarps) {
    const float g0 = g[r * kDim + lane], g1 = g[r * kDim + lane + 32];
    float d0 = g0, d1 = g1;
    if (w != nullptr) {
      const T* row = src + static_cast<int64_t>(b) * batch_stride + static_cast<int64_t>(r) * row_stride + h * kDim;
      const float x0 = f32(row[lane]), x1 = f32(row[lane + 32]);
      const float mean = warp_sum(x0 + x1) * (1.0f / kDim);
      const float c0 = x0 - mean, c1 = x1 - mean;
      const float rstd = rsqrtf(warp_sum(c0 * c0 + c1 * c1) * (1.0f / kDim) + eps);
      const float xh0 = c0 * rstd, xh1 = c1 * rstd;
      const float dx0 = g0 * param<T>(w, lane, norm_fp32), dx1 = g1 * param<T>(w, lane + 32, norm_fp32);
      const float m1 = warp_sum(dx0 + dx1) * (1.0f / kDim);
      const float m2 = warp_sum(dx0 * xh0 + dx1 * xh1) * (1.0f / kDim);
      d0 = rstd * (dx0 - m1 - xh0 * m2);
      d1 = rstd * (dx1 - m1 - xh1 * m2);
      gw0 += g0 * xh0;
      gw1 += g1 * xh1;
      gb0 += g0;
      gb1 += g1;
    }
    T* out = dst + (static_cast<int64_t>(b) * n + r) * dst_row + h * kDim;
    out[lane] = from_f32<T>(d0);
    out[lane + 32] = from_f32<T>(d1);
  }
  if (w == nullptr) return;  // uniform over the CTA: no barrier divergence
  float* mine = scratch + warp * 256;
  mine[lane] = gw0;
  mine[lane + 32] = gw1;
  mine[64 + lane] = gb0;
  mine[64 + lane + 32] = gb1;
  __syncthreads();
  if (threadIdx.x < 128) {
    float s = 0.f;
    for (int k = 0; k < kWarps; ++k) s += scratch[k * 256 + threadIdx.x];
    if (threadIdx.x < 64) {
      partial_w[threadIdx.x] = s;
    } else {
      partial_b[threadIdx.x - 64] = s;
    }
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(QFormerAttentionProblem pr, QFormerAttentionBackwardArgs a, Layout l) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem + l.q);
  T* ks = reinterpret_cast<T*>(smem + l.k);
  T* vs = reinterpret_cast<T*>(smem + l.v);
  T* dos = reinterpret_cast<T*>(smem + l.dout);
  float* f = reinterpret_cast<float*>(smem + l.f);
  T* ps = reinterpret_cast<T*>(smem + l.p);
  float* scratch = reinterpret_cast<float*>(smem + l.scratch);
  float* lse_rows = reinterpret_cast<float*>(smem + l.rows);
  float* d_rows = lse_rows + l.lqp;
  uint8_t* flags = smem + l.flags;
  const QFormerAttentionForwardArgs& fa = a.fwd;
  const int b = blockIdx.x / pr.heads, h = blockIdx.x % pr.heads;
  const int bh = blockIdx.x;
  const int Lq = static_cast<int>(pr.queries), Lk = static_cast<int>(pr.keys);
  const int lqp = static_cast<int>(l.lqp), lkp = static_cast<int>(l.lkp), ldf = static_cast<int>(l.f_ld);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t hd = pr.heads * kDim;
  float* tile = scratch + warp * 256;

  const bool any_visible = load_flags(flags, fa.key_mask, b, Lk, lkp);
  load_rows<T>(qs, static_cast<const T*>(fa.q), pr.q_strides[0], pr.q_strides[1], b, h, Lq, lqp,
               pr.q_norm ? fa.q_weight : nullptr, fa.q_bias, pr.norm_fp32, pr.eps);
  load_rows<T>(ks, static_cast<const T*>(fa.k), pr.k_strides[0], pr.k_strides[1], b, h, Lk, lkp,
               pr.k_norm ? fa.k_weight : nullptr, fa.k_bias, pr.norm_fp32, pr.eps);
  load_rows<T>(vs, static_cast<const T*>(fa.v), pr.v_strides[0], pr.v_strides[1], b, h, Lk, lkp, nullptr, nullptr,
               false, 0.f);
  load_rows<T>(dos, static_cast<const T*>(a.grad_out), Lq * hd, hd, b, h, Lq, lqp, nullptr, nullptr, false, 0.f);
  // D_i = <dO_i, O_i> and the saved lse
  const T* out = static_cast<const T*>(fa.out);
  for (int i = warp; i < lqp; i += kWarps) {
    float d = 0.f, lse = 0.f;
    if (i < Lq) {
      const T* o = out + (static_cast<int64_t>(b) * Lq + i) * hd + h * kDim;
      d = warp_sum(f32(o[lane]) * f32(dos[i * kDim + lane]) + f32(o[lane + 32]) * f32(dos[i * kDim + lane + 32]));
      lse = fa.lse[static_cast<int64_t>(bh) * Lq + i];
    }
    if (lane == 0) {
      d_rows[i] = d;
      lse_rows[i] = lse;
    }
  }
  __syncthreads();
  scores(f, ldf, qs, ks, lqp, lkp);
  __syncthreads();

  // P (fp32, before dropout) in f; P' = P * keep / (1 - p) (16-bit) in ps
  const Dropout drop = make_dropout(pr, fa.seed);
  for (int i = warp; i < lqp; i += kWarps) {
    const uint32_t row = static_cast<uint32_t>((static_cast<int64_t>(bh) * Lq + i) * Lk);
    for (int j = lane; j < lkp; j += 32) {
      float p = 0.f;
      if (i < Lq && flags[j]) p = __expf(effective_score(f[i * ldf + j], pr.scale, any_visible) - lse_rows[i]);
      f[i * ldf + j] = p;
      ps[i * lkp + j] = from_f32<T>(i < Lq ? p * drop.factor(row + j) : 0.f);
    }
  }
  __syncthreads();

  // dV = P'ᵀ dO
  T* gv = static_cast<T*>(a.grad_v);
  int tiles = (lkp / kTile) * (kDim / kTile);
  for (int t = warp; t < tiles; t += kWarps) {
    const int m = t / (kDim / kTile), n = t % (kDim / kTile);
    FragC acc;
    mma_atb(acc, ps + m * kTile, lkp, dos + n * kTile, kDim, lqp / kTile);
    wmma::store_matrix_sync(tile, acc, kTile, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int j = m * kTile + e / kTile, c = n * kTile + e % kTile;
      if (j < Lk) gv[(static_cast<int64_t>(b) * Lk + j) * hd + h * kDim + c] = from_f32<T>(tile[e]);
    }
    __syncwarp();
  }
  __syncthreads();

  // dS = P ⊙ (dP − D), dP = (dO Vᵀ) ⊙ keep / (1 − p); 16-bit into ps (each warp reads and writes only its tile)
  tiles = (lqp / kTile) * (lkp / kTile);
  for (int t = warp; t < tiles; t += kWarps) {
    const int m = t / (lkp / kTile), n = t % (lkp / kTile);
    FragC acc;
    mma_abt(acc, dos + m * kTile * kDim, kDim, vs + n * kTile * kDim, kDim, kDim / kTile);
    wmma::store_matrix_sync(tile, acc, kTile, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int i = m * kTile + e / kTile, j = n * kTile + e % kTile;
      float ds = 0.f;
      if (any_visible && i < Lq && j < Lk) {  // an all-masked row is uniform whatever its scores: no gradient
        const uint32_t flat = static_cast<uint32_t>((static_cast<int64_t>(bh) * Lq + i) * Lk + j);
        ds = f[i * ldf + j] * (tile[e] * drop.factor(flat) - d_rows[i]);
      }
      ps[i * lkp + j] = from_f32<T>(ds);
    }
    __syncwarp();
  }
  __syncthreads();

  // dQ̂ = scale dS K̂ -> f as [lqp, 64] fp32; then the q LayerNorm backward
  tiles = (lqp / kTile) * (kDim / kTile);
  for (int t = warp; t < tiles; t += kWarps) {
    const int m = t / (kDim / kTile), n = t % (kDim / kTile);
    FragC acc;
    mma_ab(acc, ps + m * kTile * lkp, lkp, ks + n * kTile, kDim, lkp / kTile);
    for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= pr.scale;
    wmma::store_matrix_sync(f + m * kTile * kDim + n * kTile, acc, kDim, wmma::mem_row_major);
  }
  __syncthreads();
  const int64_t parts = static_cast<int64_t>(gridDim.x) * kDim;
  float* pw = a.grad_norm_partials;
  norm_backward<T>(f, static_cast<const T*>(fa.q), pr.q_strides[0], pr.q_strides[1], b, h, Lq,
                   pr.q_norm ? fa.q_weight : nullptr, pr.norm_fp32, pr.eps, static_cast<T*>(a.grad_q), hd, scratch,
                   pw == nullptr ? nullptr : pw + 0 * parts + bh * kDim, pw == nullptr ? nullptr : pw + parts + bh * kDim);
  __syncthreads();

  // dK̂ = scale dSᵀ Q̂ -> f as [lkp, 64] fp32; then the k LayerNorm backward
  tiles = (lkp / kTile) * (kDim / kTile);
  for (int t = warp; t < tiles; t += kWarps) {
    const int m = t / (kDim / kTile), n = t % (kDim / kTile);
    FragC acc;
    mma_atb(acc, ps + m * kTile, lkp, qs + n * kTile, kDim, lqp / kTile);
    for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= pr.scale;
    wmma::store_matrix_sync(f + m * kTile * kDim + n * kTile, acc, kDim, wmma::mem_row_major);
  }
  __syncthreads();
  norm_backward<T>(f, static_cast<const T*>(fa.k), pr.k_strides[0], pr.k_strides[1], b, h, Lk,
                   pr.k_norm ? fa.k_weight : nullptr, pr.norm_fp32, pr.eps, static_cast<T*>(a.grad_k), hd, scratch,
                   pw == nullptr ? nullptr : pw + 2 * parts + bh * kDim,
                   pw == nullptr ? nullptr : pw + 3 * parts + bh * kDim);
}

template <typename F>
void dispatch16(DType dtype, F&& f) {
  if (dtype == DType::kFloat16) {
    f(Tag<__half>{});
  } else if (dtype == DType::kBFloat16) {
    f(Tag<__nv_bfloat16>{});
  } else {
    throw ArgumentError(std::string("q: the CUDA Q-Former attention needs float16 or bfloat16, got ") +
                        dtype_name(dtype));
  }
}

}  // namespace
}  // namespace cuda

bool qformer_attention_fits(int64_t queries, int64_t keys, int64_t head_dim) {
  if (head_dim != cuda::kDim || queries < 1 || keys < 1 || queries > 4096 || keys > 4096) return false;
  return cuda::layout_for(queries, keys).total <= cuda::max_dynamic_smem_bytes();
}

namespace {

void check_problem(const QFormerAttentionProblem& pr) {
  if (!qformer_attention_fits(pr.queries, pr.keys, pr.head_dim)) {
    throw ArgumentError("q: the CUDA Q-Former attention holds head_dim 64 and (Lq, Lk) whose tiles fit one CTA's "
                        "shared memory; got Lq = " + std::to_string(pr.queries) + ", Lk = " + std::to_string(pr.keys) +
                        ", head_dim = " + std::to_string(pr.head_dim));
  }
  if (pr.batch * pr.heads > 2147483647LL) throw ArgumentError("q: B * H exceeds the CUDA grid");
  if (pr.batch * pr.heads * pr.queries * pr.keys > 4294967295LL && pr.dropout_p > 0) {
    throw ArgumentError("q: dropout indexes B * H * Lq * Lk in 32 bits; split the batch");
  }
}

}  // namespace

void qformer_attention_forward_cuda(const QFormerAttentionProblem& pr, const QFormerAttentionForwardArgs& a,
                                    void* stream_ptr) {
  using namespace cuda;
  check_problem(pr);
  if (pr.batch == 0) return;
  const Layout l = layout_for(pr.queries, pr.keys);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch16(pr.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_cuda(cudaFuncSetAttribute(forward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(l.total)),
               "cudaFuncSetAttribute(qformer forward)");
    forward_kernel<T><<<static_cast<unsigned>(pr.batch * pr.heads), kThreads, l.total, stream>>>(pr, a, l);
    check_launch("qformer_attention forward_kernel");
  });
}

void qformer_attention_backward_cuda(const QFormerAttentionProblem& pr, const QFormerAttentionBackwardArgs& a,
                                     void* stream_ptr) {
  using namespace cuda;
  check_problem(pr);
  if (pr.batch == 0) return;
  const Layout l = layout_for(pr.queries, pr.keys);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch16(pr.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_cuda(cudaFuncSetAttribute(backward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(l.total)),
               "cudaFuncSetAttribute(qformer backward)");
    backward_kernel<T><<<static_cast<unsigned>(pr.batch * pr.heads), kThreads, l.total, stream>>>(pr, a, l);
    check_launch("qformer_attention backward_kernel");
  });
}

}  // namespace deem
