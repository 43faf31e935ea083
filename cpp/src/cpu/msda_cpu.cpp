// CPU (OpenMP) multi-scale deformable attention. The forward parallelises over (n, q); the
// backward over (n, head) slices, so each thread owns its d(value) rows: no atomics, deterministic.
// Scratch buffers are allocated before the parallel regions (detail/parallel.h).
#include <algorithm>

#include "deem/detail/bilinear.h"
#include "deem/detail/dispatch.h"
#include "deem/detail/parallel.h"
#include "deem/msda.h"

namespace deem {
namespace {

using detail::Bilinear;
using detail::Convert;

template <typename scalar_t, typename weight_t>
void forward_impl(const MsdaProblem& pr, const MsdaForwardArgs& args, int num_threads) {
  using acc_t = deem::acc_t<scalar_t>;
  const auto* value = static_cast<const scalar_t*>(args.value);
  const auto* loc = static_cast<const acc_t*>(args.locations);
  const auto* weights = static_cast<const weight_t*>(args.weights);
  auto* out = static_cast<scalar_t*>(args.output);
  const int64_t N = pr.batch, S = pr.value_len, M = pr.heads, D = pr.channels, Lq = pr.queries;
  const int64_t L = pr.levels.count, P = pr.points;
  const LevelTable& lv = pr.levels;
  if (N * Lq == 0) return;
  const int threads = detail::region_threads(num_threads, N * Lq);
  detail::ThreadScratch<acc_t> scratch(threads, D, "the CPU forward");

#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t nq = 0; nq < N * Lq; ++nq) {
    const int64_t n = nq / Lq;
    acc_t* acc = scratch.get(detail::thread_index());
    for (int64_t m = 0; m < M; ++m) {
      std::fill(acc, acc + D, acc_t(0));
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t p = 0; p < P; ++p) {
          const int64_t idx = ((nq * M + m) * L + l) * P + p;
          const acc_t a = Convert<weight_t>::load(weights[idx]);
          const Bilinear<acc_t> b = detail::bilinear<acc_t>(loc[2 * idx], loc[2 * idx + 1], lv.height[l], lv.width[l]);
          if (!b.inside || a == acc_t(0)) continue;
          for (int k = 0; k < 4; ++k) {
            const acc_t wk = a * b.weight[k];
            if (wk == acc_t(0)) continue;
            const scalar_t* v = value + ((n * S + lv.start[l] + b.pixel[k]) * M + m) * D;
            for (int64_t c = 0; c < D; ++c) acc[c] += wk * Convert<scalar_t>::load(v[c]);
          }
        }
      }
      scalar_t* o = out + (nq * M + m) * D;
      for (int64_t c = 0; c < D; ++c) o[c] = Convert<scalar_t>::store(acc[c]);
    }
  }
}

template <typename scalar_t, typename weight_t>
void backward_impl(const MsdaProblem& pr, const MsdaBackwardArgs& args, int num_threads) {
  using acc_t = deem::acc_t<scalar_t>;
  const auto* value = static_cast<const scalar_t*>(args.value);
  const auto* loc = static_cast<const acc_t*>(args.locations);
  const auto* weights = static_cast<const weight_t*>(args.weights);
  const auto* grad_out = static_cast<const scalar_t*>(args.grad_output);
  auto* grad_value = static_cast<scalar_t*>(args.grad_value);
  auto* grad_loc = static_cast<acc_t*>(args.grad_locations);
  auto* grad_w = static_cast<weight_t*>(args.grad_weights);
  const int64_t N = pr.batch, S = pr.value_len, M = pr.heads, D = pr.channels, Lq = pr.queries;
  const int64_t L = pr.levels.count, P = pr.points;
  const LevelTable& lv = pr.levels;
  if (N * M == 0) return;  // nothing to write: every gradient is empty
  const int threads = detail::region_threads(num_threads, N * M);
  // per thread: the d(value) rows of one (n, head) slice, then the output gradient of one query
  detail::ThreadScratch<acc_t> scratch(threads, (S + 1) * D, "the CPU backward (per-thread d(value) rows)");

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t nm = 0; nm < N * M; ++nm) {
    const int64_t n = nm / M, m = nm % M;
    acc_t* dvalue = scratch.get(detail::thread_index());
    acc_t* g = dvalue + S * D;
    std::fill(dvalue, dvalue + S * D, acc_t(0));
    for (int64_t q = 0; q < Lq; ++q) {
      const int64_t nq = n * Lq + q;
      const scalar_t* go = grad_out + (nq * M + m) * D;
      for (int64_t c = 0; c < D; ++c) g[c] = Convert<scalar_t>::load(go[c]);
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t p = 0; p < P; ++p) {
          const int64_t idx = ((nq * M + m) * L + l) * P + p;
          const acc_t a = Convert<weight_t>::load(weights[idx]);
          const Bilinear<acc_t> b = detail::bilinear<acc_t>(loc[2 * idx], loc[2 * idx + 1], lv.height[l], lv.width[l]);
          acc_t ga = 0, gx = 0, gy = 0;
          if (b.inside) {
            for (int k = 0; k < 4; ++k) {
              const int64_t row = (n * S + lv.start[l] + b.pixel[k]) * M + m;
              const scalar_t* v = value + row * D;
              acc_t gv = 0;
              for (int64_t c = 0; c < D; ++c) gv += g[c] * Convert<scalar_t>::load(v[c]);
              ga += b.weight[k] * gv;
              gx += b.dx[k] * gv;
              gy += b.dy[k] * gv;
              const acc_t wk = a * b.weight[k];
              if (wk != acc_t(0)) {
                acc_t* dv = dvalue + static_cast<int64_t>(lv.start[l] + b.pixel[k]) * D;
                for (int64_t c = 0; c < D; ++c) dv[c] += wk * g[c];
              }
            }
          }
          grad_w[idx] = Convert<weight_t>::store(ga);
          grad_loc[2 * idx] = a * gx * static_cast<acc_t>(lv.width[l]);
          grad_loc[2 * idx + 1] = a * gy * static_cast<acc_t>(lv.height[l]);
        }
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      scalar_t* dst = grad_value + ((n * S + s) * M + m) * D;
      const acc_t* src = dvalue + s * D;
      for (int64_t c = 0; c < D; ++c) dst[c] = Convert<scalar_t>::store(src[c]);
    }
  }
}

// Calls f(Tag<scalar_t>, Tag<weight_t>) for the problem's dtypes; weights share the value dtype
// or are float32 (float64 values need float64 weights).
template <typename F>
void dispatch(const MsdaProblem& pr, F&& f) {
  detail::dispatch_value_dtype(pr.value_dtype, [&](auto value_tag) {
    using scalar_t = typename decltype(value_tag)::type;
    using acc_t = deem::acc_t<scalar_t>;
    if (pr.weight_dtype == pr.value_dtype) {
      f(value_tag, detail::Tag<scalar_t>{});
    } else if (pr.weight_dtype == DType::kFloat32 && sizeof(acc_t) == 4) {
      f(value_tag, detail::Tag<float>{});
    } else {
      throw ArgumentError(std::string("attention_weights: expected dtype ") + dtype_name(pr.value_dtype) +
                          " or float32, got " + dtype_name(pr.weight_dtype));
    }
  });
}

}  // namespace

void msda_forward_cpu(const MsdaProblem& problem, const MsdaForwardArgs& args, int num_threads) {
  dispatch(problem, [&](auto v, auto w) {
    forward_impl<typename decltype(v)::type, typename decltype(w)::type>(problem, args, std::max(1, num_threads));
  });
}

void msda_backward_cpu(const MsdaProblem& problem, const MsdaBackwardArgs& args, int num_threads) {
  dispatch(problem, [&](auto v, auto w) {
    backward_impl<typename decltype(v)::type, typename decltype(w)::type>(problem, args, std::max(1, num_threads));
  });
}

}  // namespace deem
