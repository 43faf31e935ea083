// CUDA masked-MSE loss. Forward: two launches, both deterministic (fixed-order reductions, no atomics) and
// CUDA-graph capturable (no host sync, no allocation): per (image chunk) partial sums into a workspace, then one
// CTA that folds them into the per-image scales and the loss. Backward: one element-wise launch that reads the
// loss gradient on the device.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "deem/masked_mse.h"
#include "dispatch.cuh"
#include "kernel_common.cuh"

namespace deem {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kElementsPerChunk = 8192;
constexpr int64_t kMaxChunks = 256;

int64_t chunks_for(const MaskedMseProblem& pr) {
  const int64_t per_image = pr.channels * pr.pixels;
  return std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (per_image + kElementsPerChunk - 1) / kElementsPerChunk));
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the CTA in a fixed order; the result is valid in thread 0.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* smem) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? smem[threadIdx.x] : Acc(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();
  return v;
}

// grid (chunks, B): partial sum of (pred - target)^2 m over chunk j of image b's C*P elements, and of m over
// chunk j of its P pixels -> workspace[(b * chunks + j) * 2 + {0, 1}].
template <typename P, typename T>
__global__ void __launch_bounds__(kThreads) partial_kernel(const P* __restrict__ pred, const T* __restrict__ target,
                                                           const uint8_t* __restrict__ mask, int64_t C, int64_t Px,
                                                           acc_t<P>* __restrict__ workspace) {
  using Acc = acc_t<P>;
  __shared__ Acc smem[kThreads / 32];
  const int64_t b = blockIdx.y, j = blockIdx.x, chunks = gridDim.x;
  const int64_t n = C * Px;
  const int64_t per = (n + chunks - 1) / chunks;
  const int64_t lo = j * per, hi = min(n, lo + per);
  const P* pr = pred + b * n;
  const T* tg = target + b * n;
  const uint8_t* mk = mask == nullptr ? nullptr : mask + b * Px;
  Acc se = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const Acc d = to_acc(pr[i]) - static_cast<Acc>(to_acc(tg[i]));
    const Acc m = mk == nullptr ? Acc(1) : (mk[i % Px] != 0 ? Acc(1) : Acc(0));
    se += d * d * m;
  }
  const int64_t pper = (Px + chunks - 1) / chunks;
  const int64_t plo = j * pper, phi = min(Px, plo + pper);
  Acc ms = 0;
  for (int64_t p = plo + threadIdx.x; p < phi; p += blockDim.x) ms += mk == nullptr ? Acc(1) : (mk[p] != 0 ? Acc(1) : Acc(0));
  se = block_sum(se, smem);
  ms = block_sum(ms, smem);
  if (threadIdx.x == 0) {
    workspace[(b * chunks + j) * 2] = se;
    workspace[(b * chunks + j) * 2 + 1] = ms;
  }
}

// One CTA: per image the chunk partials in order -> scale_b; loss = sum_b scale_b * se_b / count.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) finish_kernel(const Acc* __restrict__ workspace, int64_t B, int64_t chunks,
                                                          int64_t Px, Acc eps, Acc inv_count, Acc* __restrict__ scale,
                                                          Acc* __restrict__ loss) {
  __shared__ Acc smem[kThreads / 32];
  Acc total = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    Acc se = 0, ms = 0;
    for (int64_t j = 0; j < chunks; ++j) {
      se += workspace[(b * chunks + j) * 2];
      ms += workspace[(b * chunks + j) * 2 + 1];
    }
    const Acc s = static_cast<Acc>(Px) / (ms + eps);
    scale[b] = s;
    total += s * se;
  }
  total = block_sum(total, smem);
  if (threadIdx.x == 0) *loss = total * inv_count;
}

template <typename P, typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(const P* __restrict__ pred, const T* __restrict__ target,
                                                            const uint8_t* __restrict__ mask,
                                                            const acc_t<P>* __restrict__ scale,
                                                            const acc_t<P>* __restrict__ grad_loss, int64_t C,
                                                            int64_t Px, int64_t total, acc_t<P> two_over_count,
                                                            P* __restrict__ grad) {
  using Acc = acc_t<P>;
  const Acc g = *grad_loss * two_over_count;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t b = i / (C * Px), p = i % Px;
    const bool inside = mask == nullptr || mask[b * Px + p] != 0;
    const Acc d = to_acc(pred[i]) - static_cast<Acc>(to_acc(target[i]));
    grad[i] = from_acc<P>(inside ? g * scale[b] * d : Acc(0));
  }
}

template <typename F>
void dispatch(const MaskedMseProblem& pr, F&& f) {
  dispatch_value(pr.pred_dtype, [&](auto pt) {
    using P = typename decltype(pt)::type;
    if (pr.target_dtype == pr.pred_dtype) {
      f(pt, Tag<P>{});
    } else if constexpr (!std::is_same_v<acc_t<P>, P>) {
      if (pr.target_dtype != acc_dtype(pr.pred_dtype)) {
        throw ArgumentError(std::string("target: unsupported dtype ") + dtype_name(pr.target_dtype));
      }
      f(pt, Tag<acc_t<P>>{});
    } else {
      throw ArgumentError(std::string("target: unsupported dtype ") + dtype_name(pr.target_dtype));
    }
  });
}

}  // namespace
}  // namespace cuda

int64_t masked_mse_workspace_elements(const MaskedMseProblem& pr) { return pr.batch * cuda::chunks_for(pr) * 2; }

void masked_mse_forward_cuda(const MaskedMseProblem& pr, const MaskedMseForwardArgs& a, void* stream_ptr) {
  using namespace cuda;
  if (pr.batch == 0 || pr.channels * pr.pixels == 0) throw ArgumentError("masked_mse: the CUDA forward needs B*C*P > 0");
  if (pr.batch > 65535) throw ArgumentError("masked_mse: at most 65535 images per call on CUDA");
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t chunks = chunks_for(pr);
  const double count = static_cast<double>(pr.batch) * static_cast<double>(pr.channels) * static_cast<double>(pr.pixels);
  dispatch(pr, [&](auto pt, auto tt) {
    using P = typename decltype(pt)::type;
    using T = typename decltype(tt)::type;
    using Acc = acc_t<P>;
    auto* ws = static_cast<Acc*>(a.workspace);
    partial_kernel<P, T><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(pr.batch)), kThreads, 0, stream>>>(
        static_cast<const P*>(a.pred), static_cast<const T*>(a.target), a.mask, pr.channels, pr.pixels, ws);
    check_launch("masked_mse partial_kernel");
    finish_kernel<Acc><<<1, kThreads, 0, stream>>>(ws, pr.batch, chunks, pr.pixels, static_cast<Acc>(pr.eps),
                                                   static_cast<Acc>(1.0 / count), static_cast<Acc*>(a.scale),
                                                   static_cast<Acc*>(a.loss));
    check_launch("masked_mse finish_kernel");
  });
}

void masked_mse_backward_cuda(const MaskedMseProblem& pr, const MaskedMseBackwardArgs& a, void* stream_ptr) {
  using namespace cuda;
  const int64_t total = pr.batch * pr.channels * pr.pixels;
  if (total == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(multiprocessor_count()) * 16);
  dispatch(pr, [&](auto pt, auto tt) {
    using P = typename decltype(pt)::type;
    using T = typename decltype(tt)::type;
    using Acc = acc_t<P>;
    backward_kernel<P, T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const P*>(a.pred), static_cast<const T*>(a.target), a.mask, static_cast<const Acc*>(a.scale),
        static_cast<const Acc*>(a.grad_loss), pr.channels, pr.pixels, total,
        static_cast<Acc>(2.0 / static_cast<double>(total)), static_cast<P*>(a.grad_pred));
    check_launch("masked_mse backward_kernel");
  });
}

}  // namespace deem
