// OpenMP helpers for the CPU kernels. An exception cannot leave an OpenMP region (it terminates the
// process), so every allocation happens before the region: `ThreadScratch` holds one buffer per thread.
#pragma once

#include <algorithm>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#if defined(DEEM_WITH_OPENMP)
#include <omp.h>
#endif

#include "deem/common.h"

namespace deem::detail {

// Threads for a region over `work` independent items: at least 1, at most one per item.
inline int region_threads(int requested, int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(requested, 1), work)));
}

inline int thread_index() {
#if defined(DEEM_WITH_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

template <typename T>
class ThreadScratch {
 public:
  // `threads` zeroed buffers of `per_thread` elements; OutOfMemoryError (naming `what`) if they do not fit.
  ThreadScratch(int threads, int64_t per_thread, const char* what) : per_thread_(per_thread) {
    const double bytes = static_cast<double>(threads) * static_cast<double>(per_thread) * sizeof(T);
    try {
      if (per_thread < 0 || static_cast<uint64_t>(per_thread) > data_.max_size() / std::max(threads, 1)) {
        throw std::bad_alloc();
      }
      data_.resize(static_cast<size_t>(threads) * static_cast<size_t>(per_thread));
    } catch (const std::bad_alloc&) {
      throw OutOfMemoryError(std::string("deem: ") + what + " needs " + std::to_string(bytes / (1 << 20)) +
                             " MiB of scratch (" + std::to_string(threads) + " threads x " +
                             std::to_string(per_thread) + " elements of " + std::to_string(sizeof(T)) +
                             " bytes) and the allocation failed; use fewer threads (torch.set_num_threads) or a "
                             "smaller problem");
    }
  }
  T* get(int thread) { return data_.data() + static_cast<size_t>(thread) * static_cast<size_t>(per_thread_); }

 private:
  int64_t per_thread_;
  std::vector<T> data_;
};

}  // namespace deem::detail
