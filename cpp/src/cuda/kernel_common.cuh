// Device helpers shared by the deformable-attention kernels: dtype traits, 16-byte vector
// loads/stores with fp32 conversion, group shuffles and launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "deem/common.h"
#include "deem/detail/bilinear.h"

namespace deem::cuda {

// V elements per thread: 16 bytes for 16/32-bit types, 32 bytes for float64. The accumulation type is
// deem::acc_t<T> (deem/common.h), the one dtype rule of the C++ side.
template <typename T> struct Traits;
template <> struct Traits<float> { static constexpr int V = 4; };
template <> struct Traits<double> { static constexpr int V = 4; };
template <> struct Traits<__half> { static constexpr int V = 8; };
template <> struct Traits<__nv_bfloat16> { static constexpr int V = 8; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Read-only vector loads (ld.global.nc) of V elements, converted to the accumulation type.
__device__ __forceinline__ void load_vec(const float* p, float (&o)[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
}
__device__ __forceinline__ void load_vec(const double* p, double (&o)[4]) {
  const double2 a = __ldg(reinterpret_cast<const double2*>(p));
  const double2 b = __ldg(reinterpret_cast<const double2*>(p) + 1);
  o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
}
__device__ __forceinline__ void load_vec(const __half* p, float (&o)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], 4);
    const float2 f = __half22float2(h);
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load_vec(const __nv_bfloat16* p, float (&o)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = __uint_as_float(w[i] << 16);
    o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// The same loads split in two: `load_raw` issues the load (so several can be in flight before the first use),
// `convert` turns its bits into V accumulation values.
template <typename T> struct RawVec { uint4 bits; };  // 16-bit types: 8 elements
template <> struct RawVec<float> { float4 bits; };
template <> struct RawVec<double> { double2 lo, hi; };

template <typename T>
__device__ __forceinline__ RawVec<T> load_raw(const T* p) {
  return RawVec<T>{__ldg(reinterpret_cast<const uint4*>(p))};
}
template <>
__device__ __forceinline__ RawVec<float> load_raw<float>(const float* p) {
  return RawVec<float>{__ldg(reinterpret_cast<const float4*>(p))};
}
template <>
__device__ __forceinline__ RawVec<double> load_raw<double>(const double* p) {
  return RawVec<double>{__ldg(reinterpret_cast<const double2*>(p)), __ldg(reinterpret_cast<const double2*>(p) + 1)};
}

__device__ __forceinline__ void convert(const RawVec<float>& r, float (&o)[4]) {
  o[0] = r.bits.x; o[1] = r.bits.y; o[2] = r.bits.z; o[3] = r.bits.w;
}
__device__ __forceinline__ void convert(const RawVec<double>& r, double (&o)[4]) {
  o[0] = r.lo.x; o[1] = r.lo.y; o[2] = r.hi.x; o[3] = r.hi.y;
}
__device__ __forceinline__ void convert(const RawVec<__half>& r, float (&o)[8]) {
  const uint32_t w[4] = {r.bits.x, r.bits.y, r.bits.z, r.bits.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], 4);
    const float2 f = __half22float2(h);
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void convert(const RawVec<__nv_bfloat16>& r, float (&o)[8]) {
  const uint32_t w[4] = {r.bits.x, r.bits.y, r.bits.z, r.bits.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = __uint_as_float(w[i] << 16);
    o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void store_vec(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store_vec(double* p, const double (&v)[4]) {
  reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
}
__device__ __forceinline__ void store_vec(__half* p, const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    memcpy(&w[i], &h, 4);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ void store_vec(__nv_bfloat16* p, const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    memcpy(&w[i], &h, 4);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// Vector atomic add of V fp32 (or fp64) values into an accumulation buffer.
__device__ __forceinline__ void atomic_add_vec(float* p, const float (&v)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
#else
#pragma unroll
  for (int i = 0; i < 4; ++i) atomicAdd(p + i, v[i]);
#endif
}
__device__ __forceinline__ void atomic_add_vec(float* p, const float (&v)[8]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  atomicAdd(reinterpret_cast<float4*>(p) + 1, make_float4(v[4], v[5], v[6], v[7]));
#else
#pragma unroll
  for (int i = 0; i < 8; ++i) atomicAdd(p + i, v[i]);
#endif
}
__device__ __forceinline__ void atomic_add_vec(double* p, const double (&v)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) atomicAdd(p + i, v[i]);
}

// A group of G (power of two, <= 32) consecutive lanes works on one (n, q, head). Groups in a warp
// may diverge (different image visibility), so shuffles name only the group's lanes.
struct Group {
  int size;      // G
  int lane;      // lane within the group
  unsigned mask; // the group's lanes in the warp

  __device__ __forceinline__ static Group make(int group_size) {
    Group g;
    g.size = group_size;
    const int warp_lane = threadIdx.x & 31;
    g.lane = warp_lane & (group_size - 1);
    g.mask = group_size == 32 ? 0xffffffffu : (((1u << group_size) - 1u) << (warp_lane & ~(group_size - 1)));
    return g;
  }
  template <typename T>
  __device__ __forceinline__ T broadcast(T v, int src) const {
    return __shfl_sync(mask, v, src, size);
  }
  template <typename T>
  __device__ __forceinline__ T sum(T v) const {
    for (int off = size >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off, size);
    return v;
  }
  template <typename T>
  __device__ __forceinline__ T max(T v) const {
    for (int off = size >> 1; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(mask, v, off, size));
    return v;
  }
};

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("deem: CUDA launch of ") + what + " failed: " + cudaGetErrorString(err));
  }
}

// A grid's x dimension holds at most 2^31 - 1 blocks.
inline unsigned grid_blocks(int64_t blocks, const char* kernel) {
  if (blocks > 2147483647LL) {
    throw ArgumentError(std::string(kernel) + ": the problem needs " + std::to_string(blocks) +
                        " CUDA blocks, more than the grid holds (2^31 - 1); split the batch");
  }
  return static_cast<unsigned>(blocks);
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("deem: ") + what + ": " + cudaGetErrorString(err));
}

// Threads per (n, q, head) for a head of `channels` elements of T; throws for unsupported sizes.
template <typename T>
inline int group_size_for(int64_t channels) {
  constexpr int V = Traits<T>::V;
  const int64_t g = channels / V;
  if (channels % V != 0 || g < 1 || g > 32 || (g & (g - 1)) != 0) {
    throw ArgumentError("value: the CUDA kernels need D = " + std::to_string(V) + " x (1, 2, 4, 8, 16 or 32) channels " +
                        "per head for this dtype, got D = " + std::to_string(channels));
  }
  return static_cast<int>(g);
}

// The kernels load and store 16-byte vectors: base pointers must be 16-byte aligned.
inline void require_aligned(const void* ptr, const char* name) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
    throw ArgumentError(std::string(name) + ": the CUDA kernels need a 16-byte aligned data pointer (a view with an "
                        "offset? pass a .clone())");
  }
}

int max_dynamic_smem_bytes();  // opt-in shared memory per block on the current device
int multiprocessor_count();

}  // namespace deem::cuda
