// The Q-Former resampler's attention as one fused op (spec/model.md §4, spec/kernels.md §6): per (image b, head h)
//
//   q̂_i = LN_q(q_i), k̂_j = LN_k(k_j)   (LayerNorm over the head dim with affine shared by the heads; optional)
//   P_ij = softmax_j(scale · q̂_i·k̂_j) over the visible keys j (key_mask[b, j] != 0; all keys when none is
//          visible: a uniform row, as the original's additive finfo.min mask gives)
//   out_i = Σ_j P_ij · keep_ij / (1 − p) · v_j       (keep_ij: hash dropout, see dropout_keep below; p = 0: no dropout)
//
// q [B, Lq, H*64], k and v [B, Lk, H*64] (16-bit; the last dim contiguous, rows and batches strided: views of a
// wider projection need no copy); out [B, Lq, H*64] contiguous, lse [B, H, Lq] float32 = log Σ_j exp(scale s_ij),
// saved for the backward. The CUDA kernels use tensor cores (WMMA, fp32 accumulation) with one CTA per (b, h)
// holding the whole (Lq x Lk) problem in shared memory: Lq, Lk <= the limits of qformer_attention_fits.
#pragma once

#include "deem/common.h"

namespace deem {

struct QFormerAttentionProblem {
  int64_t batch = 0;    // B
  int64_t heads = 0;    // H
  int64_t queries = 0;  // Lq
  int64_t keys = 0;     // Lk
  int64_t head_dim = 64;
  int64_t q_strides[2] = {0, 0};  // (batch, row) in elements
  int64_t k_strides[2] = {0, 0};
  int64_t v_strides[2] = {0, 0};
  DType dtype = DType::kBFloat16;  // q, k, v, out, grads (float16 or bfloat16)
  bool q_norm = false, k_norm = false;  // LayerNorm weights/biases given ([64] each)
  bool norm_fp32 = false;               // the LayerNorm parameters are float32 (else of `dtype`)
  bool has_key_mask = false;            // key_mask [B, Lk] uint8
  float eps = 1e-12f;
  float scale = 0.125f;
  float dropout_p = 0.0f;  // with a uint64 seed read on the device
};

struct QFormerAttentionForwardArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* q_weight = nullptr;
  const void* q_bias = nullptr;
  const void* k_weight = nullptr;
  const void* k_bias = nullptr;
  const uint8_t* key_mask = nullptr;
  const int64_t* seed = nullptr;  // [1] on the device (dropout only)
  void* out = nullptr;
  float* lse = nullptr;
};

struct QFormerAttentionBackwardArgs {
  QFormerAttentionForwardArgs fwd;  // the forward's inputs (its out and lse: read, not written)
  const void* grad_out = nullptr;   // [B, Lq, H*64] contiguous
  void* grad_q = nullptr;           // [B, Lq, H*64] contiguous, dtype
  void* grad_k = nullptr;           // [B, Lk, H*64]
  void* grad_v = nullptr;           // [B, Lk, H*64]
  float* grad_norm_partials = nullptr;  // [4, B*H, 64]: d q_weight, d q_bias, d k_weight, d k_bias per (b, h)
};

// Dropout keep decision of element (b, h, i, j), identical on the host, in the PyTorch reference and on the device:
// x = mix32((((b*H + h)*Lq + i)*Lk + j) mod 2^32 + mix32(seed_lo ^ mix32(seed_hi))), keep iff x >= p * 2^32.
inline uint32_t qformer_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Whether the CUDA kernels hold a problem of these sizes (shared memory of one CTA, head dim 64, 16-bit).
bool qformer_attention_fits(int64_t queries, int64_t keys, int64_t head_dim);

void qformer_attention_forward_cuda(const QFormerAttentionProblem& problem, const QFormerAttentionForwardArgs& args,
                                    void* stream);
void qformer_attention_backward_cuda(const QFormerAttentionProblem& problem, const QFormerAttentionBackwardArgs& args,
                                     void* stream);

}  // namespace deem
