// Multi-tensor pair norms, CPU: for tensors a_i (and b_i), one call returns per tensor
// ||a||^2, ||b||^2, ||a - b||^2 and <a, b> in float32, in the columns of Sum
// (csrc/constants.h; b = 0 when not given).
//
// The work is cut into chunks of kChunk elements across all tensors, so that one large
// tensor and many small ones both keep every thread busy; each chunk's partial sums are
// reduced per tensor afterwards in float64, in a fixed order (deterministic).

#include "kernels.h"
#include "chunks.h"
#include "convert.h"
#include "../constants.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <vector>

namespace spkern {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 1 << 16;
constexpr int64_t kTile = 1024;  // elements converted to float at a time

// Sums over [begin, end) of one tensor, by column (Sum).
template <typename A, typename B>
std::array<double, 4> chunk_sums(const A* a, const B* b, int64_t begin, int64_t end) {
  alignas(64) float abuf[kTile], bbuf[kTile];
  std::array<double, 4> out{0, 0, 0, 0};
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t n = std::min(kTile, end - t0);
    const float* x = as_float(a + t0, abuf, n);
    const float* y = b ? as_float(b + t0, bbuf, n) : nullptr;
    fVec dd(0.f), aa(0.f), bb(0.f), ab(0.f);
    float sdd = 0.f, saa = 0.f, sbb = 0.f, sab = 0.f;
    int64_t i = 0;
    for (; i + fVec::size() <= n; i += fVec::size()) {
      fVec xv = fVec::loadu(x + i);
      aa = at::vec::fmadd(xv, xv, aa);
      if (y) {
        fVec yv = fVec::loadu(y + i), d = xv - yv;
        dd = at::vec::fmadd(d, d, dd);
        bb = at::vec::fmadd(yv, yv, bb);
        ab = at::vec::fmadd(xv, yv, ab);
      }
    }
    for (; i < n; ++i) {
      saa += x[i] * x[i];
      if (y) {
        const float d = x[i] - y[i];
        sdd += d * d;
        sbb += y[i] * y[i];
        sab += x[i] * y[i];
      }
    }
    auto total = [](fVec& v, float s) {
      return double(at::vec::vec_reduce_all<float>(std::plus<fVec>(), v)) + s;
    };
    out[kASq] += total(aa, saa);
    if (y) {
      out[kDiffSq] += total(dd, sdd);
      out[kBSq] += total(bb, sbb);
      out[kDot] += total(ab, sab);
    }
  }
  if (!b) out[kDiffSq] = out[kASq];
  return out;
}

template <typename A, typename B>
std::array<double, 4> dispatch_b(const at::Tensor& a, const at::Tensor* b, int64_t begin, int64_t end) {
  return chunk_sums<A, B>(a.const_data_ptr<A>(), b ? b->const_data_ptr<B>() : nullptr, begin, end);
}

template <typename A>
std::array<double, 4> dispatch_a(const at::Tensor& a, const at::Tensor* b, int64_t begin, int64_t end) {
  switch (b ? b->scalar_type() : at::kFloat) {
    case at::kBFloat16: return dispatch_b<A, at::BFloat16>(a, b, begin, end);
    case at::kHalf: return dispatch_b<A, at::Half>(a, b, begin, end);
    default: return dispatch_b<A, float>(a, b, begin, end);
  }
}

}  // namespace

at::Tensor multi_tensor_norms(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  const int64_t T = static_cast<int64_t>(a.size());
  TORCH_CHECK(b.empty() || b.size() == a.size(),
              "spkern cpu multi_tensor_norms: b must be empty or as long as a");
  auto ok = [](const at::Tensor& t) {
    const auto d = t.scalar_type();
    return t.device().is_cpu() && t.is_contiguous() &&
           (d == at::kFloat || d == at::kBFloat16 || d == at::kHalf);
  };
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(ok(a[i]), "spkern cpu multi_tensor_norms: a[", i,
                "] must be a contiguous CPU tensor of float32, bfloat16 or float16");
    if (!b.empty()) {
      TORCH_CHECK(ok(b[i]), "spkern cpu multi_tensor_norms: b[", i,
                  "] must be a contiguous CPU tensor of float32, bfloat16 or float16");
      TORCH_CHECK(b[i].numel() == a[i].numel(), "spkern cpu multi_tensor_norms: b[", i,
                  "] has ", b[i].numel(), " elements, a[", i, "] has ", a[i].numel());
    }
    sizes.push_back(a[i].numel());
  }
  const auto total = chunked_sums(sizes, kChunk, [&](int64_t t, int64_t begin, int64_t end) {
    const at::Tensor& x = a[t];
    const at::Tensor* y = b.empty() ? nullptr : &b[t];
    switch (x.scalar_type()) {
      case at::kBFloat16: return dispatch_a<at::BFloat16>(x, y, begin, end);
      case at::kHalf: return dispatch_a<at::Half>(x, y, begin, end);
      default: return dispatch_a<float>(x, y, begin, end);
    }
  });
  at::Tensor out = at::empty({T, kNormColumns}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int k = 0; k < kNormColumns; ++k) o[t * kNormColumns + k] = static_cast<float>(total[t][k]);
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace spkern
