// One power-iteration step for the operator norm of A - B, CPU: w = (A - B)^T (A - B) v
// in one pass over A and B. A^T A v = sum_r a_r (a_r . v) over the rows a_r of A, so each
// row is read from memory once and used twice while it is in L1: u_r = (a_r - b_r) . v,
// then w += u_r (a_r - b_r). Matrix-vector products (A v, then A^T u) read A twice.
// Rows run in parallel; each thread adds into its own w, the partial sums are added last.

#include "../spkern.h"
#include "convert.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <vector>

namespace spkern {
namespace cpu {
namespace {

using fVec = at::vec::Vectorized<float>;

// d = a - b (b optional) as floats; returns d . v.
template <typename TA, typename TB>
float row_difference(const TA* a, const TB* b, const float* v, float* abuf, float* bbuf, float* d, int64_t n) {
  const float* x = as_float(a, abuf, n);
  const float* y = b ? as_float(b, bbuf, n) : nullptr;
  fVec acc(0.f);
  float tail = 0.f;
  int64_t i = 0;
  for (; i + fVec::size() <= n; i += fVec::size()) {
    fVec xi = fVec::loadu(x + i);
    if (y) xi = xi - fVec::loadu(y + i);
    xi.store(d + i);
    acc = at::vec::fmadd(xi, fVec::loadu(v + i), acc);
  }
  for (; i < n; ++i) {
    d[i] = y ? x[i] - y[i] : x[i];
    tail += d[i] * v[i];
  }
  return at::vec::vec_reduce_all<float>(std::plus<fVec>(), acc) + tail;
}

// w += u d
inline void axpy(float u, const float* d, float* w, int64_t n) {
  const fVec uv(u);
  int64_t i = 0;
  for (; i + fVec::size() <= n; i += fVec::size())
    at::vec::fmadd(uv, fVec::loadu(d + i), fVec::loadu(w + i)).store(w + i);
  for (; i < n; ++i) w[i] += u * d[i];
}

template <typename TA, typename TB>
void gram_rows(const at::Tensor& a, const at::Tensor* b, const float* v, at::Tensor& w) {
  const int64_t rows = a.size(0), n = a.size(1);
  const TA* pa = a.const_data_ptr<TA>();
  const TB* pb = b ? b->const_data_ptr<TB>() : nullptr;
  const int threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * n, 0.f);
  std::vector<char> used(threads, 0);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    const int t = at::get_thread_num();
    float* acc = partial.data() + static_cast<size_t>(t) * n;
    used[t] = 1;
    std::vector<float> scratch(3 * n);
    float *abuf = scratch.data(), *bbuf = abuf + n, *d = bbuf + n;
    for (int64_t r = lo; r < hi; ++r) {
      const float u = row_difference<TA, TB>(pa + r * n, pb ? pb + r * n : nullptr, v, abuf, bbuf, d, n);
      axpy(u, d, acc, n);
    }
  });
  float* out = w.data_ptr<float>();
  std::fill(out, out + n, 0.f);
  for (int t = 0; t < threads; ++t)
    if (used[t]) axpy(1.f, partial.data() + static_cast<size_t>(t) * n, out, n);
}

template <typename TA>
void dispatch_b(const at::Tensor& a, const at::Tensor* b, const float* v, at::Tensor& w) {
  if (!b) return gram_rows<TA, float>(a, nullptr, v, w);
  switch (b->scalar_type()) {
    case at::kBFloat16: return gram_rows<TA, at::BFloat16>(a, b, v, w);
    case at::kHalf: return gram_rows<TA, at::Half>(a, b, v, w);
    default: return gram_rows<TA, float>(a, b, v, w);
  }
}

bool supported(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

}  // namespace

at::Tensor gram_matvec(const at::Tensor& a, const c10::optional<at::Tensor>& b, const at::Tensor& v) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && a.device().is_cpu() && supported(a.scalar_type()),
              "spkern cpu gram_matvec: a must be a contiguous 2-d CPU tensor of float32, bfloat16 or float16");
  const at::Tensor* pb = b.has_value() && b->defined() ? &*b : nullptr;
  if (pb)
    TORCH_CHECK(pb->sizes() == a.sizes() && pb->is_contiguous() && pb->device().is_cpu() &&
                    supported(pb->scalar_type()),
                "spkern cpu gram_matvec: b must be a contiguous CPU tensor of a's shape (float32, bfloat16 "
                "or float16)");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == a.size(1) && v.is_contiguous() && v.device().is_cpu() &&
                  v.scalar_type() == at::kFloat,
              "spkern cpu gram_matvec: v must be a contiguous float32 CPU vector of a.size(1) elements");
  at::Tensor w = at::empty({a.size(1)}, v.options());
  const float* pv = v.const_data_ptr<float>();
  switch (a.scalar_type()) {
    case at::kBFloat16: dispatch_b<at::BFloat16>(a, pb, pv, w); break;
    case at::kHalf: dispatch_b<at::Half>(a, pb, pv, w); break;
    default: dispatch_b<float>(a, pb, pv, w);
  }
  return w;
}

}  // namespace cpu
}  // namespace spkern
