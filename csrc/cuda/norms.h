// Launch interface of the CUDA multi-tensor pair norms: raw pointers and a stream.
#pragma once

#include <cstdint>

#include "../constants.h"  // Sum

#include "cross_entropy.h"  // DType

namespace spkern {
namespace cuda {

// One (dtype of a, dtype of b) group of tensors. Chunk w covers elements
// [work_start[w], work_end[w]) of group tensor work_t[w]; group tensor g owns chunks
// [first[g], last[g]) and fills row out_rows[g] of out (T, 4): ||a-b||^2, ||a||^2,
// ||b||^2, <a,b>. All arrays are device memory.
struct MultiNormArgs {
  const int64_t* a_ptrs;
  const int64_t* b_ptrs;  // nullptr: b = 0
  const int64_t* work_t;
  const int64_t* work_start;
  const int64_t* work_end;
  int64_t n_work;
  const int64_t* first;
  const int64_t* last;
  const int64_t* out_rows;
  int64_t n_group;
  float* partial;  // (n_work, 4)
  float* out;
  DType a_dtype;
  DType b_dtype;
};

const char* launch_multi_tensor_norms(const MultiNormArgs& args, void* stream);

}  // namespace cuda
}  // namespace spkern
