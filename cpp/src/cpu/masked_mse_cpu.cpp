// CPU masked-MSE loss: images in parallel (OpenMP), sums in float64 whatever the input dtype, a fixed summation
// order (deterministic for any thread count).
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "deem/detail/dispatch.h"
#include "deem/detail/half_cpu.h"
#include "deem/detail/parallel.h"
#include "deem/masked_mse.h"

namespace deem {
namespace {

using detail::BFloat16;
using detail::Half;

inline double as_double(double v) { return v; }
inline double as_double(float v) { return v; }
inline double as_double(Half v) { return detail::to_float(v); }
inline double as_double(BFloat16 v) { return detail::to_float(v); }

template <typename T> T from_double(double v);
template <> double from_double<double>(double v) { return v; }
template <> float from_double<float>(double v) { return static_cast<float>(v); }
template <> Half from_double<Half>(double v) { return detail::half_from_float(static_cast<float>(v)); }
template <> BFloat16 from_double<BFloat16>(double v) { return detail::bf16_from_float(static_cast<float>(v)); }

// scale_b = P / (sum m + eps), rounded as the accumulation dtype computes it.
template <typename Acc>
Acc image_scale(int64_t pixels, double mask_sum, double eps) {
  return static_cast<Acc>(pixels) / (static_cast<Acc>(mask_sum) + static_cast<Acc>(eps));
}

template <typename P, typename T>
void forward(const MaskedMseProblem& pr, const MaskedMseForwardArgs& a, int num_threads) {
  using Acc = acc_t<P>;
  const auto* pred = static_cast<const P*>(a.pred);
  const auto* target = static_cast<const T*>(a.target);
  const uint8_t* mask = a.mask;
  const int64_t B = pr.batch, C = pr.channels, Px = pr.pixels;
  auto* scale = static_cast<Acc*>(a.scale);
  std::vector<double> weighted(static_cast<size_t>(B));
  const int threads = detail::region_threads(num_threads, B);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    double mask_sum = static_cast<double>(Px), se = 0.0;
    if (mask != nullptr) {
      mask_sum = 0.0;
      for (int64_t p = 0; p < Px; ++p) mask_sum += mask[b * Px + p] != 0 ? 1.0 : 0.0;
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t row = (b * C + c) * Px;
      for (int64_t p = 0; p < Px; ++p) {
        if (mask != nullptr && mask[b * Px + p] == 0) continue;
        const double d = as_double(pred[row + p]) - as_double(target[row + p]);
        se += d * d;
      }
    }
    const Acc s = image_scale<Acc>(Px, mask_sum, pr.eps);
    scale[b] = s;
    weighted[static_cast<size_t>(b)] = static_cast<double>(s) * se;
  }
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) total += weighted[static_cast<size_t>(b)];
  const double count = static_cast<double>(B) * static_cast<double>(C) * static_cast<double>(Px);
  *static_cast<Acc*>(a.loss) = count > 0 ? static_cast<Acc>(total / count) : std::numeric_limits<Acc>::quiet_NaN();
}

template <typename P, typename T>
void backward(const MaskedMseProblem& pr, const MaskedMseBackwardArgs& a, int num_threads) {
  using Acc = acc_t<P>;
  const auto* pred = static_cast<const P*>(a.pred);
  const auto* target = static_cast<const T*>(a.target);
  const auto* scale = static_cast<const Acc*>(a.scale);
  auto* grad = static_cast<P*>(a.grad_pred);
  const int64_t B = pr.batch, C = pr.channels, Px = pr.pixels;
  const double count = static_cast<double>(B) * static_cast<double>(C) * static_cast<double>(Px);
  const double g = static_cast<double>(*static_cast<const Acc*>(a.grad_loss)) * 2.0 / count;
  const int threads = detail::region_threads(num_threads, B * C);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t bc = 0; bc < B * C; ++bc) {
    const int64_t b = bc / C;
    const double k = g * static_cast<double>(scale[b]);
    for (int64_t p = 0; p < Px; ++p) {
      const int64_t i = bc * Px + p;
      const bool inside = a.mask == nullptr || a.mask[b * Px + p] != 0;
      grad[i] = from_double<P>(inside ? k * (as_double(pred[i]) - as_double(target[i])) : 0.0);
    }
  }
}

// f(Tag<pred_t>, Tag<target_t>): the target has the pred dtype or its accumulation dtype.
template <typename F>
void dispatch(const MaskedMseProblem& pr, F&& f) {
  detail::dispatch_value_dtype(pr.pred_dtype, [&](auto pt) {
    using P = typename decltype(pt)::type;
    if (pr.target_dtype == pr.pred_dtype) {
      f(pt, detail::Tag<P>{});
    } else if (pr.target_dtype == acc_dtype(pr.pred_dtype)) {
      f(pt, detail::Tag<acc_t<P>>{});
    } else {
      throw ArgumentError(std::string("target: unsupported dtype ") + dtype_name(pr.target_dtype));
    }
  });
}

}  // namespace

void masked_mse_forward_cpu(const MaskedMseProblem& pr, const MaskedMseForwardArgs& a, int num_threads) {
  dispatch(pr, [&](auto pt, auto tt) {
    forward<typename decltype(pt)::type, typename decltype(tt)::type>(pr, a, num_threads);
  });
}

void masked_mse_backward_cpu(const MaskedMseProblem& pr, const MaskedMseBackwardArgs& a, int num_threads) {
  dispatch(pr, [&](auto pt, auto tt) {
    backward<typename decltype(pt)::type, typename decltype(tt)::type>(pr, a, num_threads);
  });
}

#ifndef DEEM_WITH_CUDA
namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("deem was built without CUDA kernels (no nvcc at build time, or DEEM_CUDA=OFF)");
}
}  // namespace
int64_t masked_mse_workspace_elements(const MaskedMseProblem&) { no_cuda(); }
void masked_mse_forward_cuda(const MaskedMseProblem&, const MaskedMseForwardArgs&, void*) { no_cuda(); }
void masked_mse_backward_cuda(const MaskedMseProblem&, const MaskedMseBackwardArgs&, void*) { no_cuda(); }
#endif

}  // namespace deem
