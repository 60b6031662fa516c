// Fused optimizer steps with per-parameter norms, CPU.
//
// One pass over each float32 parameter applies the update of torch.optim.SGD or
// torch.optim.AdamW (same formulas, same order and rounding of operations) and
// accumulates, per parameter, ||W_{t+1} - W_t||^2 (the update actually applied),
// ||W_{t+1}||^2, ||grad||^2 and, when initial weights are given, ||W_{t+1} - W_0||^2.
// The work is cut into chunks across all parameters (a large weight and many biases
// keep every thread busy); chunk sums are reduced per parameter in a fixed order.

#include "../spkern.h"
#include "convert.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cmath>
#include <vector>

namespace spkern {
namespace cpu {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kTile = 1024;  // elements per flush of the float partial sums

struct Work {
  int64_t param, begin, end;
};

// Runs body(param index, begin, end) -> {update^2, weight^2, grad^2, drift^2} over chunks
// of every parameter in parallel, and writes the per-parameter sums into stats (P, 4).
template <typename Body>
void chunked(const std::vector<at::Tensor>& params, at::Tensor& stats, Body body) {
  std::vector<Work> work;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i)
    for (int64_t s = 0; s < params[i].numel(); s += kChunk)
      work.push_back({i, s, std::min(s + kChunk, params[i].numel())});
  std::vector<std::array<double, 4>> partial(work.size());
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) partial[w] = body(work[w].param, work[w].begin, work[w].end);
  });
  std::vector<std::array<double, 4>> total(params.size(), {0, 0, 0, 0});
  for (size_t w = 0; w < work.size(); ++w)
    for (int k = 0; k < 4; ++k) total[work[w].param][k] += partial[w][k];
  float* out = stats.data_ptr<float>();
  for (size_t i = 0; i < params.size(); ++i)
    for (int k = 0; k < 4; ++k) out[4 * i + k] = static_cast<float>(total[i][k]);
}

void check_lists(const char* where, const std::vector<at::Tensor>& params,
                 const std::vector<std::vector<at::Tensor>>& same_size, const std::vector<at::Tensor>& init,
                 const at::Tensor& stats) {
  const auto P = static_cast<int64_t>(params.size());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.numel() == 4 * P &&
                  stats.device().is_cpu(),
              where, ": stats must be a contiguous float32 CPU tensor of shape (params, 4)");
  TORCH_CHECK(init.empty() || static_cast<int64_t>(init.size()) == P, where,
              ": init must be empty or one per parameter");
  for (int64_t i = 0; i < P; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && p.scalar_type() == at::kFloat, where,
                ": parameter ", i, " must be a contiguous float32 CPU tensor");
    for (const auto& list : same_size) {
      TORCH_CHECK(static_cast<int64_t>(list.size()) == P, where, ": one tensor per parameter expected");
      TORCH_CHECK(list[i].device().is_cpu() && list[i].is_contiguous() && list[i].numel() == p.numel() &&
                      list[i].scalar_type() == at::kFloat,
                  where, ": gradient and state of parameter ", i,
                  " must be contiguous float32 CPU tensors of its size");
    }
    if (!init.empty())
      TORCH_CHECK(init[i].device().is_cpu() && init[i].is_contiguous() && init[i].numel() == p.numel() &&
                      (init[i].scalar_type() == at::kFloat || init[i].scalar_type() == at::kBFloat16 ||
                       init[i].scalar_type() == at::kHalf),
                  where, ": initial weights of parameter ", i,
                  " must be a contiguous float32, bfloat16 or float16 CPU tensor of its size");
  }
}

// The initial weights of elements [b, b + n) as float: a pointer into them, or into buf
// after conversion.
const float* init_as_float(const at::Tensor& w0, int64_t b, int64_t n, float* buf) {
  switch (w0.scalar_type()) {
    case at::kBFloat16: return as_float(w0.const_data_ptr<at::BFloat16>() + b, buf, n);
    case at::kHalf: return as_float(w0.const_data_ptr<at::Half>() + b, buf, n);
    default: return w0.const_data_ptr<float>() + b;
  }
}

// Partial sums of one tile, in float lanes, flushed to double per tile.
struct Sums {
  fVec u{0.f}, w{0.f}, g{0.f}, d{0.f};
  float su = 0, sw = 0, sg = 0, sd = 0;
  std::array<double, 4> total{0, 0, 0, 0};
  void add(fVec pn, fVec pk, fVec gk, const float* w0, int64_t k) {
    const fVec du = pn - pk;
    u = at::vec::fmadd(du, du, u);
    w = at::vec::fmadd(pn, pn, w);
    g = at::vec::fmadd(gk, gk, g);
    if (w0) {
      const fVec dd = pn - fVec::loadu(w0 + k);
      d = at::vec::fmadd(dd, dd, d);
    }
  }
  void add(float pn, float pk, float gk, const float* w0, int64_t k) {
    su += (pn - pk) * (pn - pk);
    sw += pn * pn;
    sg += gk * gk;
    if (w0) sd += (pn - w0[k]) * (pn - w0[k]);
  }
  void flush() {
    auto red = [](fVec& v, float& s) {
      const double r = double(at::vec::vec_reduce_all<float>(std::plus<fVec>(), v)) + s;
      v = fVec(0.f);
      s = 0;
      return r;
    };
    total[0] += red(u, su);
    total[1] += red(w, sw);
    total[2] += red(g, sg);
    total[3] += red(d, sd);
  }
};

}  // namespace

void sgd_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& bufs, const std::vector<bool>& buf_is_new,
              const std::vector<at::Tensor>& init, at::Tensor stats, double lr, double momentum,
              double dampening, double weight_decay, bool nesterov, bool maximize) {
  std::vector<std::vector<at::Tensor>> same = {grads};
  if (momentum != 0) same.push_back(bufs);
  check_lists("spkern sgd_step", params, same, init, stats);
  TORCH_CHECK(momentum == 0 || buf_is_new.size() == params.size(), "spkern sgd_step: buf_is_new");
  // torch's add(x, y, alpha) is fma(y, alpha, x) with alpha as float: the same here
  const float flr = static_cast<float>(lr), fmom = static_cast<float>(momentum),
              fdamp = static_cast<float>(1 - dampening), fwd = static_cast<float>(weight_decay);
  const fVec vnlr(-flr), vmom(fmom), vdamp(fdamp), vwd(fwd);
  chunked(params, stats, [&](int64_t i, int64_t b, int64_t e) {
    float* p = params[i].data_ptr<float>();
    const float* g = grads[i].const_data_ptr<float>();
    float* buf = momentum != 0 ? bufs[i].data_ptr<float>() : nullptr;
    const bool fresh = momentum != 0 && buf_is_new[i];
    alignas(64) float w0buf[kTile];
    Sums sums;
    for (int64_t t0 = b; t0 < e; t0 += kTile) {
      const int64_t t1 = std::min(t0 + kTile, e);
      const float* w0 = init.empty() ? nullptr : init_as_float(init[i], t0, t1 - t0, w0buf) - t0;
      int64_t k = t0;
      for (; k + fVec::size() <= t1; k += fVec::size()) {
        const fVec graw = fVec::loadu(g + k), pk = fVec::loadu(p + k);
        const fVec gk = maximize ? graw.neg() : graw;
        fVec d = fwd != 0 ? at::vec::fmadd(pk, vwd, gk) : gk;
        if (buf) {
          const fVec m = fresh ? d : at::vec::fmadd(d, vdamp, fVec::loadu(buf + k) * vmom);
          m.store(buf + k);
          d = nesterov ? at::vec::fmadd(m, vmom, d) : m;
        }
        const fVec pn = at::vec::fmadd(d, vnlr, pk);
        pn.store(p + k);
        sums.add(pn, pk, graw, w0, k);
      }
      for (; k < t1; ++k) {
        const float pk = p[k], gk = maximize ? -g[k] : g[k];
        float d = fwd != 0 ? std::fma(pk, fwd, gk) : gk;
        if (buf) {
          const float m = fresh ? d : std::fma(d, fdamp, buf[k] * fmom);
          buf[k] = m;
          d = nesterov ? std::fma(m, fmom, d) : m;
        }
        p[k] = std::fma(d, -flr, pk);
        sums.add(p[k], pk, g[k], w0, k);
      }
      sums.flush();
    }
    return sums.total;
  });
}

void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<double>& steps,
                const std::vector<at::Tensor>& init, at::Tensor stats, double lr, double beta1,
                double beta2, double eps, double weight_decay, bool amsgrad, bool maximize) {
  std::vector<std::vector<at::Tensor>> same = {grads, exp_avgs, exp_avg_sqs};
  if (amsgrad) same.push_back(max_exp_avg_sqs);
  check_lists("spkern adamw_step", params, same, init, stats);
  TORCH_CHECK(steps.size() == params.size(), "spkern adamw_step: one step count per parameter");
  // as torch's single-tensor AdamW: p *= 1 - lr wd; m = lerp(m, g, 1 - b1), a fused
  // multiply-add for weights below 0.5; v = v b2 + (1 - b2) g g (addcmul, fused);
  // p += (-lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps) (addcdiv, not fused)
  const fVec vdecay(static_cast<float>(1 - lr * weight_decay)), vw1(static_cast<float>(1 - beta1)),
      vb2(static_cast<float>(beta2)), vw2(static_cast<float>(1 - beta2)), veps(static_cast<float>(eps));
  chunked(params, stats, [&](int64_t i, int64_t b, int64_t e) {
    const double bc1 = 1 - std::pow(beta1, steps[i]), bc2 = 1 - std::pow(beta2, steps[i]);
    const fVec vneg(static_cast<float>(-(lr / bc1))), vbc2(static_cast<float>(std::pow(bc2, 0.5)));
    float* p = params[i].data_ptr<float>();
    const float* g = grads[i].const_data_ptr<float>();
    float* m = exp_avgs[i].data_ptr<float>();
    float* v = exp_avg_sqs[i].data_ptr<float>();
    float* vmax = amsgrad ? max_exp_avg_sqs[i].data_ptr<float>() : nullptr;
    alignas(64) float w0buf[kTile];
    Sums sums;
    auto update = [&](const fVec& graw, const fVec& p0, const fVec& m0, const fVec& v0,
                      const fVec& vmax0, fVec& mk, fVec& vk, fVec& vd) {
      const fVec gk = maximize ? graw.neg() : graw;
      const fVec pk = p0 * vdecay;
      mk = at::vec::fmadd(vw1, gk - m0, m0);
      vk = at::vec::fmadd(vw2 * gk, gk, v0 * vb2);
      vd = vmax ? at::vec::maximum(vmax0, vk) : vk;
      const fVec denom = vd.sqrt() / vbc2 + veps;
      return pk + (vneg * mk) / denom;
    };
    for (int64_t t0 = b; t0 < e; t0 += kTile) {
      const int64_t t1 = std::min(t0 + kTile, e);
      const float* w0 = init.empty() ? nullptr : init_as_float(init[i], t0, t1 - t0, w0buf) - t0;
      int64_t k = t0;
      fVec mk, vk, vd;
      for (; k + fVec::size() <= t1; k += fVec::size()) {
        const fVec graw = fVec::loadu(g + k), p0 = fVec::loadu(p + k);
        const fVec pn = update(graw, p0, fVec::loadu(m + k), fVec::loadu(v + k),
                               vmax ? fVec::loadu(vmax + k) : fVec(0.f), mk, vk, vd);
        mk.store(m + k);
        vk.store(v + k);
        if (vmax) vd.store(vmax + k);
        pn.store(p + k);
        sums.add(pn, p0, graw, w0, k);
      }
      if (k < t1) {  // the tail, through the same vector code on padded lanes
        const int n = static_cast<int>(t1 - k);
        const fVec graw = fVec::loadu(g + k, n), p0 = fVec::loadu(p + k, n);
        const fVec pn = update(graw, p0, fVec::loadu(m + k, n), fVec::loadu(v + k, n),
                               vmax ? fVec::loadu(vmax + k, n) : fVec(0.f), mk, vk, vd);
        mk.store(m + k, n);
        vk.store(v + k, n);
        if (vmax) vd.store(vmax + k, n);
        pn.store(p + k, n);
        alignas(64) float p0s[fVec::size()], gs[fVec::size()];
        p0.store(p0s);
        graw.store(gs);
        for (int j = 0; j < n; ++j) sums.add(p[k + j], p0s[j], gs[j], w0, k + j);
      }
      sums.flush();
    }
    return sums.total;
  });
}

}  // namespace cpu
}  // namespace spkern
