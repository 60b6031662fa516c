// Launch interface of the CUDA cross-entropy kernel: raw pointers, sizes and a stream,
// no torch headers, so that the .cu file compiles with nvcc alone.
#pragma once

#include <cstdint>

#include "../constants.h"  // Kind

namespace spkern {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct CrossEntropyArgs {
  const void* logits;     // (rows, C), dtype, unit stride over classes
  int64_t stride_x;
  const int64_t* target;  // (rows,) class indices, when !prob
  const void* target_prob;  // (rows, C) probabilities in dtype, when prob
  int64_t stride_t;
  const float* weight;    // (C,) or nullptr
  const float* scalars;   // (2,): gradient scale, sum of class weights
  float* loss;            // (rows,)
  float* stats;           // (6 or 1, rows)
  int64_t stride_stats;
  void* grad;             // (rows, C) in dtype, or nullptr; may be the logits (in place)
  int64_t stride_g;
  int64_t rows;
  int64_t C;
  int64_t ignore_index;
  float label_smoothing;
  float z_loss;
  float softcap;          // 0 = off
  bool prob;
  bool compute_stats;
  Kind kind;
  DType dtype;
};

// Enqueues the kernel on `stream` (a cudaStream_t). Returns nullptr on success, or the
// CUDA error string.
const char* launch_cross_entropy_fwd(const CrossEntropyArgs& args, void* stream);

}  // namespace cuda
}  // namespace spkern
