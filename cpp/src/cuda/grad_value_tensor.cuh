// d(value) on tensor cores (the 'tensor' strategy), shared by the generic and the MMFS backward.
//
// Per value slice (n, head) -- for the MMFS core (n, image, head) -- d(value) is a product
//     dV[rows x D] = Wt[rows x Lq] . dO[Lq x D],
// where Wt[r, q] = sum over the points p of query q and their corners k that land on row r of a_p * w_k
// (the bilinear interpolation matrix, transposed). One CTA owns a tile of kRows consecutive rows of one
// slice and all D channels, and walks the queries in steps of kQk:
//   1. build: one thread per (query, level) recomputes that level's P points and adds a * w_k into the
//      tile Wt[kRows x kQk] in shared memory (value dtype). Points of one (query, level) are summed by one
//      thread and different levels never share a row, so no two threads touch one entry: no atomics;
//   2. the dO rows of the step go to shared memory (zero for invisible queries and past Lq);
//   3. mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulators in registers): each warp owns 16*kMT rows x D;
//      then every warp clears the rows of Wt it owns for the next step.
// A step whose tile holds no contribution (e.g. images a causal mask hides) skips 3. The accumulators are
// staged through shared memory and written once as 16-byte vectors in the value dtype: no global atomics, no
// fp32 workspace, no zeroing or cast pass, and the result does not depend on scheduling (deterministic).
// The product is dense: a non-finite output gradient of one query spreads NaN over its tile's rows, where the
// gather strategies give finite rows for pixels the query does not sample.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernel_common.cuh"

namespace deem::cuda {

constexpr int kTensorThreads = 256;
constexpr int kTensorWarps = kTensorThreads / 32;
constexpr int kTensorQk = 128;  // queries per step (the GEMM's K tile)

template <int kD>
struct TensorTile {
  static_assert(kD == 32 || kD == 64 || kD == 128, "tensor d(value): D must be 32, 64 or 128");
  static constexpr int kMT = kD <= 64 ? 2 : 1;          // m16 tiles per warp (register budget: 4*kMT*kD/8)
  static constexpr int kNT = kD / 8;                    // n8 tiles
  static constexpr int kRows = kTensorWarps * 16 * kMT;  // rows of the slice per CTA
  static constexpr int kWStride = kTensorQk + 8;         // halves per Wt row (+16 B: conflict-free ldmatrix)
  static constexpr int kGStride = kD + 8;                // halves per dO row
  static constexpr int kOStride = kD + 8;                // halves per staged output row
  static constexpr size_t kWBytes = static_cast<size_t>(kRows) * kWStride * 2;
  static constexpr size_t kGBytes = static_cast<size_t>(kTensorQk) * kGStride * 2;
  static constexpr size_t kSmem = kWBytes + kGBytes;
  static_assert(static_cast<size_t>(kRows) * kOStride * 2 <= kWBytes, "output staging reuses the Wt tile");
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a . b for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t pack2(__half lo, __half hi) {
  const __half2 h = __halves2half2(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  const __nv_bfloat162 h = __halves2bfloat162(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

// Source: the same policy the owner strategy uses (grad_value_common.cuh), built over all levels
// (level_begin 0), so item(q, l * P + p, ...) is point p of level l of query q.
// `grad_value` points at the slice's head (channel 0 of head m), `row0` is the slice's first value row and
// `pix` the stride between value rows; `levels` are the slice's levels (starts relative to the slice).
template <typename scalar_t, int kD, typename Source>
__device__ __forceinline__ void tensor_accumulate(const Source& src, const scalar_t* __restrict__ grad_out,
                                                  scalar_t* __restrict__ grad_value, int64_t row0, int64_t pix,
                                                  int queries, int points, int slice_rows, int tile,
                                                  const LevelTable& levels) {
  using Tile = TensorTile<kD>;
  constexpr int kMT = Tile::kMT, kNT = Tile::kNT, kRows = Tile::kRows;
  extern __shared__ __align__(16) unsigned char tensor_smem[];
  scalar_t* wt = reinterpret_cast<scalar_t*>(tensor_smem);
  scalar_t* gs = reinterpret_cast<scalar_t*>(tensor_smem + Tile::kWBytes);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r0 = tile * kRows;
  const int rows_here = min(kRows, slice_rows - r0);

  // The levels whose rows meet [r0, r0 + rows_here) (levels are consecutive: starts are prefix sums).
  int lb = 0;
  while (lb < levels.count && levels.start[lb] + levels.height[lb] * levels.width[lb] <= r0) ++lb;
  int le = lb;
  while (le < levels.count && levels.start[le] < r0 + rows_here) ++le;
  const int items = kTensorQk * (le - lb);

  {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    uint4* w4 = reinterpret_cast<uint4*>(wt);
    for (int k = tid; k < static_cast<int>(Tile::kWBytes / 16); k += kTensorThreads) w4[k] = zero;
  }

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

  const int warp_row = warp * 16 * kMT;
  const bool warp_active = warp_row < rows_here;
  for (int q0 = 0; q0 < queries; q0 += kTensorQk) {
    __syncthreads();  // the previous step's MMAs and clears are done
    // dO rows of this step.
    constexpr int kVec = kD / 8;  // 16-byte vectors per row
    for (int k = tid; k < kTensorQk * kVec; k += kTensorThreads) {
      const int qq = k / kVec, c8 = k - qq * kVec;
      const int q = q0 + qq;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (q < queries && src.visible(q)) {
        v = __ldg(reinterpret_cast<const uint4*>(grad_out + src.grad_row(q) * kD) + c8);
      }
      *reinterpret_cast<uint4*>(gs + qq * Tile::kGStride + c8 * 8) = v;
    }
    // Wt entries of this step: one thread per (query, level).
    int any = 0;
    for (int it = tid; it < items; it += kTensorThreads) {
      const int qq = it % kTensorQk, lv = lb + it / kTensorQk;
      const int q = q0 + qq;
      if (q >= queries || !src.visible(q)) continue;
      const int base = levels.start[lv] - r0;
      const int H = levels.height[lv], W = levels.width[lv];
      for (int p = 0; p < points; ++p) {
        float x, y, a;
        int l;
        src.item(q, lv * points + p, x, y, a, l);
        const detail::Bilinear<float> b = detail::bilinear<float>(x, y, H, W);
        if (!b.inside || a == 0.f) continue;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float w = a * b.weight[k];
          const int r = base + b.pixel[k];
          if (w == 0.f || r < 0 || r >= kRows) continue;
          scalar_t* cell = wt + r * Tile::kWStride + qq;
          *cell = from_acc<scalar_t>(to_acc(*cell) + w);
          any = 1;
        }
      }
    }
    if (!__syncthreads_or(any) || !warp_active) continue;
#pragma unroll 2
    for (int ks = 0; ks < kTensorQk / 16; ++ks) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        const scalar_t* p = wt + (warp_row + i * 16 + (lane & 15)) * Tile::kWStride + ks * 16 + (lane >> 4) * 8;
        ldmatrix_x4(a[i], p);
      }
#pragma unroll
      for (int j = 0; j < kNT; j += 2) {
        uint32_t b[4];
        const int mi = lane >> 3;
        const scalar_t* p = gs + (ks * 16 + (mi & 1) * 8 + (lane & 7)) * Tile::kGStride + (j + (mi >> 1)) * 8;
        ldmatrix_x4_trans(b, p);
#pragma unroll
        for (int i = 0; i < kMT; ++i) {
          mma_16816<scalar_t>(acc[i][j], a[i], b[0], b[1]);
          mma_16816<scalar_t>(acc[i][j + 1], a[i], b[2], b[3]);
        }
      }
    }
    __syncwarp();
    {  // clear this warp's rows for the next step
      const uint4 zero = make_uint4(0, 0, 0, 0);
      constexpr int kRowVec = kTensorQk / 8;
      for (int k = lane; k < 16 * kMT * kRowVec; k += 32) {
        const int r = k / kRowVec, c = k - r * kRowVec;
        *reinterpret_cast<uint4*>(wt + (warp_row + r) * Tile::kWStride + c * 8) = zero;
      }
    }
  }

  // Stage the accumulators in the value dtype, then write whole rows with 16-byte stores.
  __syncthreads();
  scalar_t* os = wt;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const int r = warp_row + i * 16 + g, c = j * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(os + r * Tile::kOStride + c) =
          pack2(from_acc<scalar_t>(acc[i][j][0]), from_acc<scalar_t>(acc[i][j][1]));
      *reinterpret_cast<uint32_t*>(os + (r + 8) * Tile::kOStride + c) =
          pack2(from_acc<scalar_t>(acc[i][j][2]), from_acc<scalar_t>(acc[i][j][3]));
    }
  __syncthreads();
  constexpr int kVec = kD / 8;
  for (int k = tid; k < rows_here * kVec; k += kTensorThreads) {
    const int r = k / kVec, c8 = k - r * kVec;
    *reinterpret_cast<uint4*>(grad_value + (row0 + r0 + r) * pix + c8 * 8) =
        *reinterpret_cast<const uint4*>(os + r * Tile::kOStride + c8 * 8);
  }
}

// Host side: the tiles of one slice, and whether the strategy applies.
template <int kD>
inline int64_t tensor_tiles(int64_t slice_rows) {
  return (slice_rows + TensorTile<kD>::kRows - 1) / TensorTile<kD>::kRows;
}

inline bool tensor_feasible(int64_t channels, DType value_dtype) {
  return (value_dtype == DType::kFloat16 || value_dtype == DType::kBFloat16) &&
         (channels == 32 || channels == 64 || channels == 128);
}

// f(std::integral_constant<int, D>) for the head sizes the tensor strategy compiles.
template <typename F>
void dispatch_tensor_channels(int64_t channels, F&& f) {
  switch (channels) {
    case 32: f(std::integral_constant<int, 32>{}); return;
    case 64: f(std::integral_constant<int, 64>{}); return;
    case 128: f(std::integral_constant<int, 128>{}); return;
  }
  throw ArgumentError("grad_value strategy 'tensor' needs D = 32, 64 or 128 channels per head, got D = " +
                      std::to_string(channels));
}

template <typename Kernel, typename... Args>
void launch_tensor(Kernel kernel, size_t smem, int64_t slices, int64_t tiles, const char* name, cudaStream_t stream,
                   Args... args) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "cudaFuncSetAttribute(tensor kernel)");
  const int64_t blocks = slices * tiles;
  if (blocks == 0) return;
  kernel<<<grid_blocks(blocks, name), kTensorThreads, smem, stream>>>(args...);
  check_launch(name);
}

}  // namespace deem::cuda
