// Statistics of activation pairs, CPU: for a (current) and b (reference) of shape
// (rows, features), per row ||a||^2, ||b||^2, ||a - b||^2, <a, b> and the number of
// exact zeros of a, in one pass over both, returned in double. Rows run in parallel; each
// row's sums are kept in float lanes per tile of features and in double across tiles.
// multi_pair_stats does the same for many pairs in one call, the rows of all of them in
// one parallel loop (row r of each pair in turn), and returns each pair's totals.

#include "kernels.h"
#include "convert.h"
#include "../constants.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace spkern {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kTile = 1024;

template <typename T>
std::array<double, kPairColumns> row_sums(const T* a, const T* b, int64_t n) {
  alignas(64) float abuf[kTile], bbuf[kTile];
  std::array<double, kPairColumns> out{0, 0, 0, 0, 0};  // by column: Sum
  const fVec zero(0.f), one(1.f);
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t m = std::min(kTile, n - t0);
    const float* x = as_float(a + t0, abuf, m);
    const float* y = b ? as_float(b + t0, bbuf, m) : nullptr;
    fVec aa(0.f), bb(0.f), dd(0.f), ab(0.f), zz(0.f);
    float saa = 0, sbb = 0, sdd = 0, sab = 0, szz = 0;
    int64_t i = 0;
    for (; i + fVec::size() <= m; i += fVec::size()) {
      const fVec xv = fVec::loadu(x + i);
      aa = at::vec::fmadd(xv, xv, aa);
      zz = zz + (one & (xv == zero));
      if (y) {
        const fVec yv = fVec::loadu(y + i), d = xv - yv;
        bb = at::vec::fmadd(yv, yv, bb);
        dd = at::vec::fmadd(d, d, dd);
        ab = at::vec::fmadd(xv, yv, ab);
      }
    }
    for (; i < m; ++i) {
      saa += x[i] * x[i];
      szz += x[i] == 0.f ? 1.f : 0.f;
      if (y) {
        const float d = x[i] - y[i];
        sbb += y[i] * y[i];
        sdd += d * d;
        sab += x[i] * y[i];
      }
    }
    auto total = [](const fVec& v, float s) {
      return double(at::vec::vec_reduce_all<float>(std::plus<fVec>(), v)) + s;
    };
    out[kASq] += total(aa, saa);
    out[kZeros] += total(zz, szz);
    if (y) {
      out[kBSq] += total(bb, sbb);
      out[kDiffSq] += total(dd, sdd);
      out[kDot] += total(ab, sab);
    }
  }
  // A float partial sum that overflowed (entries beyond ~1e18) or squares that underflowed
  // (entries below ~1e-15): the row again in double. Rare, so the fast path stays float.
  const bool tiny = (out[kASq] < 1e-30 && out[kZeros] < double(n)) ||
                    (b && out[kBSq] < 1e-30 && out[kBSq] > 0.0);
  if (tiny || !std::isfinite(out[kASq] + out[kBSq] + out[kDiffSq]) || !std::isfinite(out[kDot])) {
    double r[kNormColumns] = {0, 0, 0, 0};
    for (int64_t i = 0; i < n; ++i) {
      const double xv = static_cast<float>(a[i]), yv = b ? static_cast<float>(b[i]) : 0.0;
      r[kASq] += xv * xv;
      r[kBSq] += yv * yv;
      r[kDiffSq] += (xv - yv) * (xv - yv);
      r[kDot] += xv * yv;
    }
    for (int k = 0; k < kNormColumns; ++k) out[k] = r[k];
  }
  if (!b) out[kDiffSq] = out[kASq];  // b = 0
  return out;
}

void check_pair(const char* where, const at::Tensor& a, const at::Tensor* b) {
  const auto dtype = a.scalar_type();
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && a.device().is_cpu() &&
                  (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf),
              where, ": a must be a contiguous (rows, features) CPU tensor of float32, bfloat16 or float16");
  if (b)
    TORCH_CHECK(b->sizes() == a.sizes() && b->is_contiguous() && b->scalar_type() == dtype && b->device().is_cpu(),
                where, ": b must be a contiguous CPU tensor of a's shape and dtype");
}

std::array<double, kPairColumns> row_sums_of(const at::Tensor& a, const at::Tensor* b, int64_t r) {
  const int64_t n = a.size(1);
  switch (a.scalar_type()) {
    case at::kBFloat16: {
      const auto* pa = a.const_data_ptr<at::BFloat16>() + r * n;
      return row_sums<at::BFloat16>(pa, b ? b->const_data_ptr<at::BFloat16>() + r * n : nullptr, n);
    }
    case at::kHalf: {
      const auto* pa = a.const_data_ptr<at::Half>() + r * n;
      return row_sums<at::Half>(pa, b ? b->const_data_ptr<at::Half>() + r * n : nullptr, n);
    }
    default: {
      const auto* pa = a.const_data_ptr<float>() + r * n;
      return row_sums<float>(pa, b ? b->const_data_ptr<float>() + r * n : nullptr, n);
    }
  }
}

}  // namespace

at::Tensor multi_pair_stats(const std::vector<at::Tensor>& a, const std::vector<c10::optional<at::Tensor>>& b) {
  TORCH_CHECK(a.size() == b.size(), "spkern cpu multi_pair_stats: a and b must have one entry per pair");
  const auto P = static_cast<int64_t>(a.size());
  std::vector<const at::Tensor*> bs(P, nullptr);
  std::vector<int64_t> first(P + 1, 0);  // the pairs' rows, numbered across all pairs
  int64_t elements = 0, max_rows = 0;
  for (int64_t i = 0; i < P; ++i) {
    bs[i] = b[i].has_value() && b[i]->defined() ? &*b[i] : nullptr;
    check_pair("spkern cpu multi_pair_stats", a[i], bs[i]);
    first[i + 1] = first[i] + a[i].size(0);
    elements += a[i].numel();
    max_rows = std::max(max_rows, a[i].size(0));
  }
  const int64_t rows = first[P];
  std::vector<double> per_row(static_cast<size_t>(rows) * kPairColumns);
  // row r of every pair, then row r + 1: pairs that share a tensor (the tracker's h_t in
  // (h_t, h_0) and (h_t, W_0 x_t), say) read its row once from memory, then from cache
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(elements / std::max<int64_t>(max_rows, 1), 1));
  at::parallel_for(0, max_rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t i = 0; i < P; ++i) {
        if (r >= a[i].size(0)) continue;
        const auto sums = row_sums_of(a[i], bs[i], r);
        std::copy(sums.begin(), sums.end(), per_row.begin() + (first[i] + r) * kPairColumns);
      }
  });
  // each pair's total, its rows added in order (the same for any number of threads)
  at::Tensor out = at::empty({P, kPairColumns}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  std::fill(o, o + P * kPairColumns, 0.0);
  for (int64_t i = 0; i < P; ++i)
    for (int64_t r = first[i]; r < first[i + 1]; ++r)
      for (int k = 0; k < kPairColumns; ++k) o[kPairColumns * i + k] += per_row[kPairColumns * r + k];
  return out;
}

at::Tensor pair_stats(const at::Tensor& a, const c10::optional<at::Tensor>& b) {
  const at::Tensor* pb = b.has_value() && b->defined() ? &*b : nullptr;
  check_pair("spkern cpu pair_stats", a, pb);
  at::Tensor out = at::empty({a.size(0), kPairColumns}, a.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  at::parallel_for(0, a.size(0), std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(a.size(1), 1)),
                   [&](int64_t lo, int64_t hi) {
                     for (int64_t r = lo; r < hi; ++r) {
                       const auto sums = row_sums_of(a, pb, r);
                       std::copy(sums.begin(), sums.end(), o + kPairColumns * r);
                     }
                   });
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace spkern
