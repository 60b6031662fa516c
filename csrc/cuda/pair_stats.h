// Launch interface of the CUDA activation-pair statistics: raw pointers and a stream.
#pragma once

#include <cstdint>

#include "cross_entropy.h"  // DType

namespace spkern {
namespace cuda {

// a, b: (rows, features) contiguous, one dtype; b may be nullptr (b = 0). out: (rows, 5)
// float64 of ||a||^2, ||b||^2, ||a - b||^2, <a, b>, zeros(a) per row.
struct PairStatsArgs {
  const void* a;
  const void* b;
  double* out;
  int64_t rows;
  int64_t features;
  DType dtype;
};

const char* launch_pair_stats(const PairStatsArgs& args, void* stream);

}  // namespace cuda
}  // namespace spkern
