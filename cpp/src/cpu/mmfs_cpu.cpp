// CPU (OpenMP) fused MMFS core: per-image locations shared by the levels of an image, an
// in-kernel softmax with a null slot, a per-query image mask and an optional ignore token.
// Scratch buffers are allocated before the parallel regions (detail/parallel.h).
#include <algorithm>
#include <cmath>

#include "deem/detail/bilinear.h"
#include "deem/detail/dispatch.h"
#include "deem/detail/parallel.h"
#include "deem/mmfs.h"

namespace deem {
namespace {

using detail::Bilinear;
using detail::Convert;

struct MmfsIndex {
  int64_t N, I, S, M, D, Lq, L, P;
  explicit MmfsIndex(const MmfsProblem& pr)
      : N(pr.batch), I(pr.images), S(pr.image_len), M(pr.heads), D(pr.channels), Lq(pr.queries),
        L(pr.levels.count), P(pr.points) {}
  // [N, Lq, I, M, P, 2] (point pairs), [N, Lq, I, M, L, P]
  int64_t loc(int64_t nq, int64_t i, int64_t m) const { return ((nq * I + i) * M + m) * P; }
  int64_t logit(int64_t nq, int64_t i, int64_t m) const { return ((nq * I + i) * M + m) * L * P; }
  // first element of value row (n, image i, pixel s of the image, head m)
  int64_t value_row(int64_t n, int64_t i, int64_t s, int64_t m) const { return ((n * I * S + i * S + s) * M + m) * D; }
};

// log(1 + sum over visible images of exp(z)), computed stably.
template <typename acc_t>
acc_t row_lse(const acc_t* logits, const uint8_t* visible, const MmfsIndex& ix, int64_t nq, int64_t m) {
  acc_t mx = 0;
  for (int64_t i = 0; i < ix.I; ++i) {
    if (!visible[nq * ix.I + i]) continue;
    const acc_t* z = logits + ix.logit(nq, i, m);
    for (int64_t j = 0; j < ix.L * ix.P; ++j) mx = std::max(mx, z[j]);
  }
  acc_t sum = std::exp(-mx);
  for (int64_t i = 0; i < ix.I; ++i) {
    if (!visible[nq * ix.I + i]) continue;
    const acc_t* z = logits + ix.logit(nq, i, m);
    for (int64_t j = 0; j < ix.L * ix.P; ++j) sum += std::exp(z[j] - mx);
  }
  return mx + std::log(sum);
}

template <typename scalar_t>
void forward_impl(const MmfsProblem& pr, const MmfsForwardArgs& args, int num_threads) {
  using acc_t = deem::acc_t<scalar_t>;
  const MmfsIndex ix(pr);
  const auto* value = static_cast<const scalar_t*>(args.value);
  const auto* loc = static_cast<const acc_t*>(args.locations);
  const auto* logits = static_cast<const acc_t*>(args.logits);
  const auto* ignore = static_cast<const scalar_t*>(args.ignore_token);
  auto* out = static_cast<scalar_t*>(args.output);
  auto* lse_out = static_cast<acc_t*>(args.lse);
  const LevelTable& lv = pr.levels;
  if (ix.N * ix.Lq == 0) return;
  const int threads = detail::region_threads(num_threads, ix.N * ix.Lq);
  detail::ThreadScratch<acc_t> scratch(threads, ix.D, "the CPU MMFS forward");

#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t nq = 0; nq < ix.N * ix.Lq; ++nq) {
    const int64_t n = nq / ix.Lq;
    acc_t* acc = scratch.get(detail::thread_index());
    for (int64_t m = 0; m < ix.M; ++m) {
      std::fill(acc, acc + ix.D, acc_t(0));
      const acc_t lse = row_lse(logits, args.visible, ix, nq, m);
      for (int64_t i = 0; i < ix.I; ++i) {
        if (!args.visible[nq * ix.I + i]) continue;
        const acc_t* xy = loc + 2 * ix.loc(nq, i, m);
        const acc_t* z = logits + ix.logit(nq, i, m);
        for (int64_t l = 0; l < ix.L; ++l) {
          for (int64_t p = 0; p < ix.P; ++p) {
            const acc_t a = std::exp(z[l * ix.P + p] - lse);
            const Bilinear<acc_t> b = detail::bilinear<acc_t>(xy[2 * p], xy[2 * p + 1], lv.height[l], lv.width[l]);
            if (!b.inside) continue;
            for (int k = 0; k < 4; ++k) {
              const acc_t wk = a * b.weight[k];
              if (wk == acc_t(0)) continue;
              const scalar_t* v = value + ix.value_row(n, i, lv.start[l] + b.pixel[k], m);
              for (int64_t c = 0; c < ix.D; ++c) acc[c] += wk * Convert<scalar_t>::load(v[c]);
            }
          }
        }
      }
      if (ignore != nullptr) {
        const acc_t sink = std::exp(-lse);
        for (int64_t c = 0; c < ix.D; ++c) acc[c] += sink * Convert<scalar_t>::load(ignore[m * ix.D + c]);
      }
      scalar_t* o = out + (nq * ix.M + m) * ix.D;
      for (int64_t c = 0; c < ix.D; ++c) o[c] = Convert<scalar_t>::store(acc[c]);
      lse_out[nq * ix.M + m] = lse;
    }
  }
}

template <typename scalar_t>
void backward_impl(const MmfsProblem& pr, const MmfsBackwardArgs& args, int num_threads) {
  using acc_t = deem::acc_t<scalar_t>;
  const MmfsIndex ix(pr);
  const auto* value = static_cast<const scalar_t*>(args.value);
  const auto* loc = static_cast<const acc_t*>(args.locations);
  const auto* logits = static_cast<const acc_t*>(args.logits);
  const auto* ignore = static_cast<const scalar_t*>(args.ignore_token);
  const auto* lse_in = static_cast<const acc_t*>(args.lse);
  const auto* grad_out = static_cast<const scalar_t*>(args.grad_output);
  auto* grad_value = static_cast<scalar_t*>(args.grad_value);
  auto* grad_loc = static_cast<acc_t*>(args.grad_locations);
  auto* grad_logits = static_cast<acc_t*>(args.grad_logits);
  const LevelTable& lv = pr.levels;
  const int64_t LP = ix.L * ix.P;
  if (ix.N * ix.M == 0) return;  // nothing to write: every gradient is empty
  const int threads = detail::region_threads(num_threads, ix.N * ix.M);
  const int64_t rows = ix.I * ix.S;
  // per thread: the d(value) rows of one (n, head) slice over all images, then one query's output gradient
  detail::ThreadScratch<acc_t> scratch(threads, (rows + 1) * ix.D, "the CPU MMFS backward (per-thread d(value) rows)");

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t nm = 0; nm < ix.N * ix.M; ++nm) {
    const int64_t n = nm / ix.M, m = nm % ix.M;
    acc_t* dvalue = scratch.get(detail::thread_index());
    acc_t* g = dvalue + rows * ix.D;
    std::fill(dvalue, dvalue + rows * ix.D, acc_t(0));
    for (int64_t q = 0; q < ix.Lq; ++q) {
      const int64_t nq = n * ix.Lq + q;
      const scalar_t* go = grad_out + (nq * ix.M + m) * ix.D;
      for (int64_t c = 0; c < ix.D; ++c) g[c] = Convert<scalar_t>::load(go[c]);
      const acc_t lse = lse_in[nq * ix.M + m];
      // gbar = <g, out> = sum_j a_j G_j + sink * <g, ignore>: the softmax row term.
      acc_t gbar = 0;
      if (ignore != nullptr) {
        acc_t gs = 0;
        for (int64_t c = 0; c < ix.D; ++c) gs += g[c] * Convert<scalar_t>::load(ignore[m * ix.D + c]);
        gbar = std::exp(-lse) * gs;
      }
      for (int64_t i = 0; i < ix.I; ++i) {
        acc_t* dxy = grad_loc + 2 * ix.loc(nq, i, m);
        acc_t* dz = grad_logits + ix.logit(nq, i, m);
        std::fill(dxy, dxy + 2 * ix.P, acc_t(0));
        if (!args.visible[nq * ix.I + i]) {
          std::fill(dz, dz + LP, acc_t(0));
          continue;
        }
        const acc_t* xy = loc + 2 * ix.loc(nq, i, m);
        const acc_t* z = logits + ix.logit(nq, i, m);
        for (int64_t l = 0; l < ix.L; ++l) {
          for (int64_t p = 0; p < ix.P; ++p) {
            const acc_t a = std::exp(z[l * ix.P + p] - lse);
            const Bilinear<acc_t> b = detail::bilinear<acc_t>(xy[2 * p], xy[2 * p + 1], lv.height[l], lv.width[l]);
            acc_t ga = 0, gx = 0, gy = 0;
            if (b.inside) {
              for (int k = 0; k < 4; ++k) {
                const int64_t s = lv.start[l] + b.pixel[k];
                const scalar_t* v = value + ix.value_row(n, i, s, m);
                acc_t gv = 0;
                for (int64_t c = 0; c < ix.D; ++c) gv += g[c] * Convert<scalar_t>::load(v[c]);
                ga += b.weight[k] * gv;
                gx += b.dx[k] * gv;
                gy += b.dy[k] * gv;
                const acc_t wk = a * b.weight[k];
                if (wk != acc_t(0)) {
                  acc_t* dv = dvalue + (i * ix.S + s) * ix.D;
                  for (int64_t c = 0; c < ix.D; ++c) dv[c] += wk * g[c];
                }
              }
            }
            dz[l * ix.P + p] = ga;  // G_j for now; turned into d(logit) below
            gbar += a * ga;
            dxy[2 * p] += a * gx * static_cast<acc_t>(lv.width[l]);
            dxy[2 * p + 1] += a * gy * static_cast<acc_t>(lv.height[l]);
          }
        }
      }
      for (int64_t i = 0; i < ix.I; ++i) {
        if (!args.visible[nq * ix.I + i]) continue;
        const acc_t* z = logits + ix.logit(nq, i, m);
        acc_t* dz = grad_logits + ix.logit(nq, i, m);
        for (int64_t j = 0; j < LP; ++j) dz[j] = std::exp(z[j] - lse) * (dz[j] - gbar);
      }
    }
    for (int64_t i = 0; i < ix.I; ++i) {
      for (int64_t s = 0; s < ix.S; ++s) {
        scalar_t* dst = grad_value + ix.value_row(n, i, s, m);
        const acc_t* src = dvalue + (i * ix.S + s) * ix.D;
        for (int64_t c = 0; c < ix.D; ++c) dst[c] = Convert<scalar_t>::store(src[c]);
      }
    }
  }
}

}  // namespace

void mmfs_forward_cpu(const MmfsProblem& problem, const MmfsForwardArgs& args, int num_threads) {
  detail::dispatch_value_dtype(problem.value_dtype, [&](auto tag) {
    forward_impl<typename decltype(tag)::type>(problem, args, std::max(1, num_threads));
  });
}

void mmfs_backward_cpu(const MmfsProblem& problem, const MmfsBackwardArgs& args, int num_threads) {
  detail::dispatch_value_dtype(problem.value_dtype, [&](auto tag) {
    backward_impl<typename decltype(tag)::type>(problem, args, std::max(1, num_threads));
  });
}

}  // namespace deem
