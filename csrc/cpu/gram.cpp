// One power-iteration step for the operator norm of A - B, CPU: w = (A - B)^T (A - B) v
// in one pass over A and B. A^T A v = sum_r a_r (a_r . v) over the rows a_r of A, so each
// row is read from memory once and used twice while it is in L1: u_r = (a_r - b_r) . v,
// then w += u_r (a_r - b_r). Matrix-vector products (A v, then A^T u) read A twice.
// Rows run in parallel; each thread adds into its own w, the partial sums are added last.

#include "kernels.h"
#include "gram_rows.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <vector>

namespace spkern {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename TA, typename TB>
void gram_rows(const at::Tensor& a, const at::Tensor* b, const float* v, at::Tensor& w) {
  const int64_t rows = a.size(0), n = a.size(1);
  const TA* pa = a.const_data_ptr<TA>();
  const TB* pb = b ? b->const_data_ptr<TB>() : nullptr;
  GramPartials partials(n);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(2 * n);
    gram_rows_into<TA, TB>(pa, pb, v, lo, hi, n, partials.of_this_thread(), scratch.data());
  });
  partials.sum_into(w.data_ptr<float>());
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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace spkern
