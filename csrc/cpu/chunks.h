// The multi-tensor work table of the CPU kernels (multi_tensor_norms and the fused
// optimizer steps): every tensor cut into chunks of `chunk` elements, so that one large
// tensor and many small ones both keep every thread busy; the chunks' partial sums are
// reduced per tensor in float64, in a fixed order (deterministic).
#pragma once

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace spkern {
namespace cpu {
namespace CPU_CAPABILITY {

// body(tensor index, begin, end) -> its four partial sums; returns the sums per tensor.
// With rows, tensor i's chunks are whole rows of rows[i] elements where rows[i] > 0.
template <typename Body>
std::vector<std::array<double, 4>> chunked_sums(const std::vector<int64_t>& sizes, int64_t chunk, Body body,
                                                const std::vector<int64_t>* rows = nullptr) {
  struct Work {
    int64_t tensor, begin, end;
  };
  std::vector<Work> work;
  for (int64_t i = 0; i < static_cast<int64_t>(sizes.size()); ++i) {
    const int64_t row = rows ? (*rows)[i] : 0;
    const int64_t c = row > 0 ? std::max<int64_t>(1, chunk / row) * row : chunk;
    for (int64_t s = 0; s < sizes[i]; s += c) work.push_back({i, s, std::min(s + c, sizes[i])});
  }
  std::vector<std::array<double, 4>> partial(work.size());
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) partial[w] = body(work[w].tensor, work[w].begin, work[w].end);
  });
  std::vector<std::array<double, 4>> total(sizes.size(), {0, 0, 0, 0});
  for (size_t w = 0; w < work.size(); ++w)
    for (int k = 0; k < 4; ++k) total[work[w].tensor][k] += partial[w][k];
  return total;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace spkern
