// Fused cross-entropy forward (+ gradient) with per-row logit statistics, CPU.
//
// One row of logits is read from memory once; the later passes over the row
// run from a thread-local float32 copy that stays in L2. Per row:
//   pass 1  raw max, sum of squares, softcap, the linear sums the loss needs
//   pass 2  e = exp(x' - max'), sum(e), sum(e * x')            (one exp per logit)
//   pass 3  gradient from e (only when asked), written once in the input dtype
// Definitions match spkern/cross_entropy.py (the reference implementation).

#include "kernels.h"
#include "convert.h"
#include "../constants.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include <cmath>
#include <limits>
#include <vector>

namespace spkern {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;

// max that propagates NaN, as torch.max does.
inline float nanmax(float a, float b) { return (std::isnan(a) || a > b) ? a : b; }

// Rows whose float32 sum of squares left [1e-30, 1e30] (logits beyond ~1e15 overflow
// it, below ~1e-15 underflow it) are summed again in double: the norm itself is then
// exact to float32 rounding. Rare, so the fast path stays one FMA per logit.
inline bool sum_of_squares_unsafe(float sq) { return !(sq >= 1e-30f && sq <= 1e30f); }

float norm_in_double(const float* x, int64_t n) {
  double s = 0.0;
  for (int64_t c = 0; c < n; ++c) s += double(x[c]) * double(x[c]);
  return float(std::sqrt(s));
}

// Index of the first element equal to v (the torch.argmax tie rule), or -1.
int64_t first_index_of(const float* x, int64_t n, float v) {
  const fVec vv(v);
  const int full = (1 << fVec::size()) - 1;
  int64_t c = 0;
  for (; c + fVec::size() <= n; c += fVec::size()) {
    int hit = ~(fVec::loadu(x + c) == vv).zero_mask() & full;
    if (hit) return c + __builtin_ctz(hit);
  }
  for (; c < n; ++c)
    if (x[c] == v) return c;
  return -1;
}

struct Params {
  Kind kind;  // which loss (csrc/constants.h); the statistics are the same for all
  int64_t C;
  int64_t ignore_index;
  float eps;       // label smoothing
  float z;         // z-loss coefficient
  float cap;       // softcap, 0 = off
  bool prob;       // class-probability targets
  bool stats;
  bool grad;
  const float* w;  // class weights or nullptr
  float W;         // sum of class weights (C without weights)
  float scale;     // gradient scale (1 / denominator for reduction="mean")
};

template <typename scalar_t>
void rows_kernel(const Params& p, const scalar_t* X, int64_t sx, const int64_t* T_idx,
                 const scalar_t* T_prob, int64_t st, float* loss, float* stats,
                 int64_t sstat, scalar_t* G, int64_t sg, int64_t begin, int64_t end) {
  const int64_t C = p.C;
  const int64_t V = fVec::size();
  const bool cap_on = p.cap > 0.f;
  const float inv_cap = cap_on ? 1.f / p.cap : 0.f;
  const float eps_c = p.eps / static_cast<float>(C);
  const float ninf = -std::numeric_limits<float>::infinity();
  constexpr bool is_float = std::is_same_v<scalar_t, float>;

  // Scratch rows, L2-resident: raw logits as float, capped logits, exp / gradient,
  // targets as float (probability targets only).
  std::vector<float> buf_x(is_float ? 0 : C), buf_c(cap_on ? C : 0), buf_e(C),
      buf_t(p.prob && !is_float ? C : 0);

  for (int64_t i = begin; i < end; ++i) {
    const float* x;
    if constexpr (is_float) {
      x = X + i * sx;
    } else {
      load_row(X + i * sx, buf_x.data(), C);
      x = buf_x.data();
    }
    const float* t = nullptr;
    if (p.prob) {
      if constexpr (is_float) {
        t = T_prob + i * st;
      } else {
        load_row(T_prob + i * st, buf_t.data(), C);
        t = buf_t.data();
      }
    }
    int64_t y = 0;
    bool valid = true;
    if (!p.prob) {
      y = T_idx[i];
      valid = y != p.ignore_index;
    }

    // ---- pass 1 ------------------------------------------------------------
    fVec vmax(ninf), vsq(0.f), vlin(0.f), vtw(0.f), vtwx(0.f), vtmax(ninf);
    float smax = ninf, ssq = 0.f, slin = 0.f, stw = 0.f, stwx = 0.f, stmax = ninf;
    float* xc_out = cap_on ? buf_c.data() : nullptr;
    const fVec vcap(p.cap), vinv(inv_cap), veps1(1.f - p.eps), vepsc(eps_c);
    int64_t c = 0;
    for (; c + V <= C; c += V) {
      fVec xv = fVec::loadu(x + c);
      vmax = at::vec::maximum(vmax, xv);
      vsq = at::vec::fmadd(xv, xv, vsq);
      fVec xc = xv;
      if (cap_on) {
        xc = vcap * (xv * vinv).tanh();
        xc.store(xc_out + c);
      }
      if (p.prob) {
        fVec tv = fVec::loadu(t + c);
        if (p.stats) vtmax = at::vec::maximum(vtmax, tv);
        if (p.eps > 0.f) tv = at::vec::fmadd(tv, veps1, vepsc);
        if (p.w) tv = tv * fVec::loadu(p.w + c);
        vtw = vtw + tv;
        vtwx = at::vec::fmadd(tv, xc, vtwx);
      } else if (p.eps > 0.f) {
        vlin = p.w ? at::vec::fmadd(fVec::loadu(p.w + c), xc, vlin) : vlin + xc;
      }
    }
    for (; c < C; ++c) {
      float xv = x[c];
      smax = nanmax(smax, xv);
      ssq += xv * xv;
      float xc = xv;
      if (cap_on) {
        xc = p.cap * std::tanh(xv * inv_cap);
        xc_out[c] = xc;
      }
      if (p.prob) {
        float tv = t[c];
        if (p.stats) stmax = std::max(stmax, tv);
        if (p.eps > 0.f) tv = tv * (1.f - p.eps) + eps_c;
        if (p.w) tv *= p.w[c];
        stw += tv;
        stwx += tv * xc;
      } else if (p.eps > 0.f) {
        slin += p.w ? p.w[c] * xc : xc;
      }
    }
    const float m = nanmax(at::vec::vec_reduce_all<float>(
        [](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, vmax), smax);
    const float sq = at::vec::vec_reduce_all<float>(std::plus<fVec>(), vsq) + ssq;
    const float* xs = cap_on ? buf_c.data() : x;  // logits the softmax sees
    const float mc = cap_on ? p.cap * std::tanh(m * inv_cap) : m;

    // ---- pass 2 ------------------------------------------------------------
    fVec vs(0.f), vt(0.f), vs2(0.f);
    float ss = 0.f, stt = 0.f, ss2 = 0.f;
    const bool keep_e = p.grad && p.kind != Kind::kMseLogits;
    const bool sum_e2 = p.kind == Kind::kMseProbs;
    const fVec vm(mc);
    // e * x' with x' clamped to max - 128: a -inf logit then adds 0 * finite instead of
    // 0 * -inf = NaN (exp(-128) is 0 in float32), and nothing else changes.
    const float floor_x = mc - 128.f;
    const fVec vfloor(floor_x);
    float* e_out = buf_e.data();
    // Pass 2 is compute-bound and runs from L2: meanwhile, pull the next row into the
    // cache, one line per iteration, so that its pass 1 does not wait on memory.
    const char* next = i + 1 < end ? reinterpret_cast<const char*>(X + (i + 1) * sx) : nullptr;
    const int64_t next_bytes = next ? C * int64_t(sizeof(scalar_t)) : 0;
    // The entropy's sum of e x needs the clamp only where a logit is infinite (or NaN):
    // then the sum of squares of pass 1 is not finite, so a finite row skips it.
    const bool clamp = p.stats && !std::isfinite(sq);
    // (two vectors an iteration, each with its own sums: the sums' dependency chains do
    // not then bound the loop)
    auto pass2 = [&](auto stats_tag, auto clamp_tag) {
      constexpr bool kStats = decltype(stats_tag)::value, kClamp = decltype(clamp_tag)::value;
      fVec vsb(0.f), vtb(0.f);
      auto one = [&](int64_t k, fVec& s_acc, fVec& t_acc) {
        fVec xc = fVec::loadu(xs + k);
        fVec e = (xc - vm).exp_u20();
        s_acc = s_acc + e;
        if constexpr (kStats) t_acc = at::vec::fmadd(e, kClamp ? at::vec::maximum(xc, vfloor) : xc, t_acc);
        if (sum_e2) vs2 = at::vec::fmadd(e, e, vs2);
        if (keep_e) e.store(e_out + k);
      };
      int64_t k = 0;
      for (; k + 2 * V <= C; k += 2 * V) {
        if (k * int64_t(sizeof(float)) < next_bytes) {  // (a line per vector, as the loads)
          __builtin_prefetch(next + k * sizeof(float), 0, 2);
          __builtin_prefetch(next + (k + V) * sizeof(float), 0, 2);
        }
        one(k, vs, vt);
        one(k + V, vsb, vtb);
      }
      for (; k + V <= C; k += V) one(k, vs, vt);
      vs = vs + vsb;
      vt = vt + vtb;
      return k;
    };
    using yes = std::true_type;
    using no = std::false_type;
    c = !p.stats ? pass2(no{}, no{}) : clamp ? pass2(yes{}, yes{}) : pass2(yes{}, no{});
    for (; c < C; ++c) {
      float e = std::exp(xs[c] - mc);
      ss += e;
      stt += e * std::max(xs[c], floor_x);
      ss2 += e * e;
      if (keep_e) e_out[c] = e;
    }
    const double s = double(at::vec::vec_reduce_all<float>(std::plus<fVec>(), vs)) + ss;
    const double tsum = double(at::vec::vec_reduce_all<float>(std::plus<fVec>(), vt)) + stt;
    const double lse = double(mc) + std::log(s);
    // MSE on probabilities: sum_c p_c^2 and p_y
    const double s2 = sum_e2 ? (double(at::vec::vec_reduce_all<float>(std::plus<fVec>(), vs2)) + ss2) / (s * s) : 0.0;
    const double py = (sum_e2 && valid) ? std::exp(double(xs[y]) - lse) : 0.0;

    // ---- loss and statistics -------------------------------------------------
    double wy = 0.0, tw = 0.0;
    if (p.kind == Kind::kMseLogits) {
      loss[i] = valid ? float(double(sq) - 2.0 * x[y] + 1.0) : 0.f;
    } else if (p.kind == Kind::kMseProbs) {
      loss[i] = valid ? float(s2 - 2.0 * py + 1.0) : 0.f;
    } else if (p.prob) {
      tw = double(at::vec::vec_reduce_all<float>(std::plus<fVec>(), vtw)) + stw;
      const double twx = double(at::vec::vec_reduce_all<float>(std::plus<fVec>(), vtwx)) + stwx;
      loss[i] = float(tw * lse - twx + p.z * lse * lse);
    } else if (valid) {
      wy = p.w ? p.w[y] : 1.0;
      const double nll = wy * (lse - xs[y]);
      double l = (1.0 - p.eps) * nll + p.z * lse * lse;
      // the smoothing term only with smoothing: W (and lin) are NaN when some class
      // weight is, and that must reach the rows of that class only, as in torch
      if (p.eps > 0.f) {
        const double lin = double(at::vec::vec_reduce_all<float>(std::plus<fVec>(), vlin)) + slin;
        l += double(eps_c) * (double(p.W) * lse - lin);
      }
      loss[i] = float(l);
    } else {
      loss[i] = 0.f;
    }
    stats[i] = float(lse);
    if (p.stats) {
      stats[sstat + i] = sum_of_squares_unsafe(sq) ? norm_in_double(x, C) : std::sqrt(sq);
      stats[2 * sstat + i] = m;
      stats[3 * sstat + i] = float(1.0 / s);
      stats[4 * sstat + i] = float(lse - tsum / s);
      const int64_t am = first_index_of(x, C, m);
      bool correct;
      if (p.prob) {
        float tmax = std::max(
            at::vec::vec_reduce_all<float>(
                [](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, vtmax),
            stmax);
        correct = am >= 0 && t[am] == tmax;
      } else {
        correct = valid && am == y;
      }
      stats[5 * sstat + i] = correct ? 1.f : 0.f;
    }

    // ---- pass 3: gradient ----------------------------------------------------
    if (!p.grad) continue;
    scalar_t* g = G + i * sg;
    float* gf = is_float ? reinterpret_cast<float*>(g) : buf_e.data();  // in place over e
    if (!p.prob && !valid) {
      for (int64_t k = 0; k < C; ++k) g[k] = scalar_t(0);
      continue;
    }
    if (p.kind != Kind::kCrossEntropy) {
      // d/dx_c of sum_c (x_c - [c = y])^2 = 2 x_c - 2 [c = y]; of sum_c (p_c - [c = y])^2
      // = 2 p_c (p_c - K) - 2 p_y [c = y], K = sum_k p_k^2 - p_y
      const float two_scale = 2.f * p.scale;
      const float inv_s = float(1.0 / s), K = float(s2 - py);
      const fVec v2s(two_scale), vinv_s(inv_s), vK(K);
      c = 0;
      for (; c + V <= C; c += V) {
        if (p.kind == Kind::kMseLogits) {
          (fVec::loadu(x + c) * v2s).store(gf + c);
        } else {
          fVec pc = fVec::loadu(e_out + c) * vinv_s;
          (v2s * pc * (pc - vK)).store(gf + c);
        }
      }
      for (; c < C; ++c) {
        if (p.kind == Kind::kMseLogits) {
          gf[c] = x[c] * two_scale;
        } else {
          const float pc = e_out[c] * inv_s;
          gf[c] = two_scale * pc * (pc - K);
        }
      }
      gf[y] -= two_scale * (p.kind == Kind::kMseLogits ? 1.f : float(py));
      if constexpr (!is_float) store_row(gf, g, C);
      continue;
    }
    // d loss / d x'_c = e_c * A - B_c  (see the reference for the derivation)
    const double a_coef = p.prob ? (tw + 2.0 * p.z * lse)
                                 : ((1.0 - p.eps) * wy + (p.eps > 0.f ? double(eps_c) * p.W : 0.0) +
                                    2.0 * p.z * lse);
    const float A = float(a_coef * p.scale / s);
    const float B = (p.prob ? 1.f : eps_c) * p.scale;
    const fVec vA(A), vB(B), vone(1.f);
    c = 0;
    for (; c + V <= C; c += V) {
      fVec gv = fVec::loadu(e_out + c) * vA;
      if (p.prob) {
        fVec tv = fVec::loadu(t + c);
        if (p.eps > 0.f) tv = at::vec::fmadd(tv, veps1, vepsc);
        if (p.w) tv = tv * fVec::loadu(p.w + c);
        gv = gv - tv * vB;
      } else if (p.eps > 0.f) {
        gv = gv - (p.w ? fVec::loadu(p.w + c) * vB : vB);
      }
      if (cap_on) {
        fVec u = fVec::loadu(xs + c) * vinv;
        gv = gv * (vone - u * u);
      }
      gv.store(gf + c);
    }
    for (; c < C; ++c) {
      float gv = e_out[c] * A;
      if (p.prob) {
        float tv = t[c];
        if (p.eps > 0.f) tv = tv * (1.f - p.eps) + eps_c;
        if (p.w) tv *= p.w[c];
        gv -= tv * B;
      } else if (p.eps > 0.f) {
        gv -= (p.w ? p.w[c] : 1.f) * B;
      }
      if (cap_on) {
        float u = xs[c] * inv_cap;
        gv *= 1.f - u * u;
      }
      gf[c] = gv;
    }
    if (!p.prob) {
      // The target column: one more term, -(1 - eps) * w_y, through the softcap.
      float d = 1.f;
      if (cap_on) {
        float u = xs[y] * inv_cap;
        d = 1.f - u * u;
      }
      gf[y] -= float((1.0 - p.eps) * wy) * p.scale * d;
    }
    if constexpr (!is_float) store_row(gf, g, C);
  }
}

}  // namespace

std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                          const c10::optional<at::Tensor>& weight,
                                          const at::Tensor& scalars, int64_t kind,
                                          int64_t ignore_index, double label_smoothing,
                                          double z_loss, double softcap, bool compute_stats,
                                          bool compute_grad,
                                          const c10::optional<at::Tensor>& grad_out) {
  TORCH_CHECK(logits.device().is_cpu(), "spkern cpu cross_entropy: logits must be a CPU tensor");
  auto out = check_and_allocate("spkern cpu cross_entropy", logits, target, weight, scalars, kind,
                                compute_stats, compute_grad, grad_out, empty_large);
  const at::Tensor &loss = out[0], &stats = out[1], &grad = out[2];
  const int64_t M = logits.size(0), C = logits.size(1);
  const bool prob = target.is_floating_point();
  if (!prob) {
    const int64_t* t = target.data_ptr<int64_t>();
    for (int64_t i = 0; i < M; ++i)
      TORCH_CHECK_INDEX(t[i] == ignore_index || (t[i] >= 0 && t[i] < C), "Target ", t[i],
                        " is out of bounds.");
  }
  const float* w = weight.has_value() && weight->defined() ? weight->data_ptr<float>() : nullptr;
  const float* sc = scalars.data_ptr<float>();

  Params p{static_cast<Kind>(kind), C, ignore_index, float(label_smoothing), float(z_loss), float(softcap), prob,
           compute_stats, compute_grad, w, sc[1], sc[0]};
  // Enough rows per task that a task is worth a thread hand-off.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(C, 1));
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* X = logits.data_ptr<scalar_t>();
    const int64_t* Ti = prob ? nullptr : target.data_ptr<int64_t>();
    const scalar_t* Tp = prob ? target.data_ptr<scalar_t>() : nullptr;
    scalar_t* G = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
      rows_kernel<scalar_t>(p, X, logits.stride(0), Ti, Tp, prob ? target.stride(0) : 0,
                            loss.data_ptr<float>(), stats.data_ptr<float>(), M, G,
                            compute_grad ? grad.stride(0) : 0, begin, end);
    });
  };
  switch (logits.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: break;  // checked above
  }
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace spkern
