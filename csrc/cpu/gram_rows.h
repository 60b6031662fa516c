// The rows of a Gram product, w += (a_r - b_r) ((a_r - b_r) . v) for rows r of a and b:
// each row is used twice while it is in L1 (csrc/cpu/gram.cpp; the fused optimizer steps
// of csrc/cpu/optim.cpp run it on the rows they have just written, still in cache).
#pragma once

#include "kernels.h"

#include "convert.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <vector>

namespace spkern {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// (x - y) . v over n floats (y optional: 0).
inline float dot_difference(const float* x, const float* y, const float* v, int64_t n) {
  using fVec = at::vec::Vectorized<float>;
  fVec acc(0.f);
  float tail = 0.f;
  int64_t i = 0;
  for (; i + fVec::size() <= n; i += fVec::size()) {
    fVec d = fVec::loadu(x + i);
    if (y) d = d - fVec::loadu(y + i);
    acc = at::vec::fmadd(d, fVec::loadu(v + i), acc);
  }
  for (; i < n; ++i) tail += (y ? x[i] - y[i] : x[i]) * v[i];
  return at::vec::vec_reduce_all<float>(std::plus<fVec>(), acc) + tail;
}

// w += u (x - y) over n floats (y optional: 0).
inline void axpy_difference(float u, const float* x, const float* y, float* w, int64_t n) {
  using fVec = at::vec::Vectorized<float>;
  const fVec uv(u);
  int64_t i = 0;
  for (; i + fVec::size() <= n; i += fVec::size()) {
    fVec d = fVec::loadu(x + i);
    if (y) d = d - fVec::loadu(y + i);
    at::vec::fmadd(uv, d, fVec::loadu(w + i)).store(w + i);
  }
  for (; i < n; ++i) w[i] += u * (y ? x[i] - y[i] : x[i]);
}

// w += u d
inline void axpy(float u, const float* d, float* w, int64_t n) { axpy_difference(u, d, nullptr, w, n); }

// acc += sum over the rows r in [r0, r1) of the (rows, n) matrices a and b (b may be
// null: 0) of (a_r - b_r) ((a_r - b_r) . v): u_r = (a_r - b_r) . v, then acc += u_r (a_r -
// b_r), the row read twice while it is in L1 (reduced precision converted once, into
// scratch, which holds 2 n floats).
template <typename TA, typename TB>
void gram_rows_into(const TA* a, const TB* b, const float* v, int64_t r0, int64_t r1, int64_t n, float* acc,
                    float* scratch) {
  float *abuf = scratch, *bbuf = abuf + n;
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = as_float(a + r * n, abuf, n);
    const float* y = b ? as_float(b + r * n, bbuf, n) : nullptr;
    axpy_difference(dot_difference(x, y, v, n), x, y, acc, n);
  }
}

// acc += u (a - b) for one row of n elements whose u = (a - b) . v the caller has (a fused
// optimizer step sums it while it writes the row), b of any of the kernels' float dtypes;
// scratch holds 2 n floats.
template <typename TA>
void gram_row_axpy_any(float u, const TA* a, const at::Tensor& b, int64_t offset, int64_t n, float* acc,
                       float* scratch) {
  const float* x = as_float(a, scratch, n);
  const float* y;
  switch (b.scalar_type()) {
    case at::kBFloat16: y = as_float(b.const_data_ptr<at::BFloat16>() + offset, scratch + n, n); break;
    case at::kHalf: y = as_float(b.const_data_ptr<at::Half>() + offset, scratch + n, n); break;
    default: y = b.const_data_ptr<float>() + offset;
  }
  axpy_difference(u, x, y, acc, n);
}

// gram_rows_into with b of any of the kernels' float dtypes (float32, bfloat16, float16).
template <typename TA>
void gram_rows_into_any(const TA* a, const at::Tensor& b, const float* v, int64_t r0, int64_t r1, int64_t n,
                        float* acc, float* scratch) {
  switch (b.scalar_type()) {
    case at::kBFloat16:
      return gram_rows_into<TA, at::BFloat16>(a, b.const_data_ptr<at::BFloat16>(), v, r0, r1, n, acc, scratch);
    case at::kHalf: return gram_rows_into<TA, at::Half>(a, b.const_data_ptr<at::Half>(), v, r0, r1, n, acc, scratch);
    default: return gram_rows_into<TA, float>(a, b.const_data_ptr<float>(), v, r0, r1, n, acc, scratch);
  }
}

// Per-thread partial Gram vectors of one matrix, added in thread order at the end
// (deterministic for a given number of threads).
struct GramPartials {
  int64_t n = 0;
  std::vector<float> partial;  // threads x n
  std::vector<char> used;
  explicit GramPartials(int64_t n_) : n(n_) {
    const int threads = at::get_num_threads();
    partial.assign(static_cast<size_t>(threads) * n, 0.f);
    used.assign(threads, 0);
  }
  float* of_this_thread() {
    const int t = at::get_thread_num();
    used[t] = 1;
    return partial.data() + static_cast<size_t>(t) * n;
  }
  void sum_into(float* out) const {
    std::fill(out, out + n, 0.f);
    for (size_t t = 0; t < used.size(); ++t)
      if (used[t]) axpy(1.f, partial.data() + t * n, out, n);
  }
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace spkern
