// The measured table behind the 'auto' d(value) strategy.
//
// strategy_measured.inc is written by benchmarks/strategy_table.py from benchmarks/results/msda_cuda.json: one
// entry per measured case (op, points per query per value slice, value rows per slice, queries), with the
// strategies ordered by their measured backward time on that card. 'auto' takes the entry nearest to a
// problem in (log points per row, log queries) -- the two ratios that set the strategies' relative costs:
// the gather strategies do work per sampled point, the tensor strategy per (query, row) pair -- and runs its
// fastest strategy that applies to the problem. No size rule: moving a crossover means re-measuring.
#pragma once

#include <cmath>
#include <cstdint>

#include "deem/common.h"

namespace deem::cuda {

enum class StrategyOp : int32_t { kMsda = 0, kMmfs = 1 };

struct StrategyFeatures {
  double log_points_per_row;  // log(L * P / rows of one value slice)
  double log_queries;
};

inline StrategyFeatures strategy_features(int64_t points_per_query, int64_t slice_rows, int64_t queries) {
  const double ppr = static_cast<double>(points_per_query > 0 ? points_per_query : 1) /
                     static_cast<double>(slice_rows > 0 ? slice_rows : 1);
  return {std::log(ppr), std::log(static_cast<double>(queries > 0 ? queries : 1))};
}

struct MeasuredStrategies {
  const char* name;  // the benchmark case and dtype it was measured on
  StrategyOp op;
  int64_t points_per_query, slice_rows, queries;
  GradValueStrategy fastest_first[3];  // kAuto marks an unused slot
  float backward_ms[3];                // measured, same order
};

#include "strategy_measured.inc"  // kMeasuredCard, kMeasuredStrategies[]

inline const MeasuredStrategies& nearest_measured(const StrategyFeatures& f, StrategyOp op) {
  const int n = static_cast<int>(sizeof(kMeasuredStrategies) / sizeof(kMeasuredStrategies[0]));
  bool any_of_op = false;
  for (int i = 0; i < n; ++i) any_of_op |= kMeasuredStrategies[i].op == op;
  int best = 0;
  double best_d = 1e300;
  for (int i = 0; i < n; ++i) {
    const MeasuredStrategies& e = kMeasuredStrategies[i];
    if (any_of_op && e.op != op) continue;
    const StrategyFeatures g = strategy_features(e.points_per_query, e.slice_rows, e.queries);
    const double a = f.log_points_per_row - g.log_points_per_row, b = f.log_queries - g.log_queries;
    const double d = a * a + b * b;
    if (d < best_d) {
      best_d = d;
      best = i;
    }
  }
  return kMeasuredStrategies[best];
}

}  // namespace deem::cuda
