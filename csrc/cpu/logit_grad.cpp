// The gradient of the logit losses from each row's log-sum-exp and coefficients, CPU: the
// second pass of the vocabulary-parallel losses (spkern/vocab_parallel.py), where a rank
// holds a slice of the classes and the row's log-sum-exp is over all of them. Per class
// c of the slice, p_c = exp(x'_c - lse) (x' the softcapped logits):
//   cross-entropy  g_c = (p_c a - b w_c - b_y [c = y]) (1 - (x'_c / cap)^2)
//     (probabilities t)  (p_c a - (b t_c + b_y) w_c) (1 - (x'_c / cap)^2)
//   MSE logits     g_c = a x_c - b_y [c = y]
//   MSE probs      g_c = b p_c (p_c - a) - b_y [c = y]
// with w_c = 1 without class weights, for class indices the b term left out where b = 0
// (a NaN class weight then reaches the rows of its class only, as in torch), and rows
// whose target is ignore_index all zeros. rows = (M, 4) float32 [lse, a, b, b_y].
// Definitions match spkern.cross_entropy.logit_grad_reference.

#include "kernels.h"
#include "convert.h"
#include "../constants.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace spkern {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;

struct GradParams {
  Kind kind;
  int64_t C;
  int64_t ignore_index;
  float cap;        // 0 = off
  bool prob;        // probability targets
  const float* w;   // class weights or nullptr
};

template <typename scalar_t>
void grad_rows(const GradParams& p, const scalar_t* X, int64_t sx, const int64_t* T_idx,
               const scalar_t* T_prob, int64_t st, const float* R, scalar_t* G, int64_t sg,
               int64_t begin, int64_t end) {
  const int64_t C = p.C, V = fVec::size();
  constexpr bool is_float = std::is_same_v<scalar_t, float>;
  const bool cap_on = p.cap > 0.f;
  const float inv_cap = cap_on ? 1.f / p.cap : 0.f;
  std::vector<float> buf_x(is_float ? 0 : C), buf_t(p.prob && !is_float ? C : 0), buf_g(is_float ? 0 : C);
  const fVec vcap(p.cap), vinv(inv_cap), vone(1.f);
  for (int64_t i = begin; i < end; ++i) {
    const float* x = as_float(X + i * sx, buf_x.data(), C);
    scalar_t* g = G + i * sg;
    float* gf = is_float ? reinterpret_cast<float*>(g) : buf_g.data();
    int64_t y = -1;
    if (!p.prob) {
      y = T_idx[i];
      if (y == p.ignore_index) {
        for (int64_t c = 0; c < C; ++c) g[c] = scalar_t(0);
        continue;
      }
    }
    const float* t = p.prob ? as_float(T_prob + i * st, buf_t.data(), C) : nullptr;
    const float lse = R[4 * i], a = R[4 * i + 1], b = R[4 * i + 2], b_y = R[4 * i + 3];
    // the softcap's factor at the target column, read before the row is overwritten (the
    // gradient may be written over the logits)
    const bool has_y = y >= 0 && y < C;
    float d_y = 1.f;
    if (has_y && cap_on && p.kind == Kind::kCrossEntropy) {
      const float u = std::tanh(x[y] * inv_cap);
      d_y = 1.f - u * u;
    }
    const bool b_on = b != 0.f;
    const fVec vlse(lse), va(a), vb(b), vby(b_y);
    int64_t c = 0;
    for (; c + V <= C; c += V) {
      fVec xv = fVec::loadu(x + c), gv;
      if (p.kind == Kind::kMseLogits) {
        gv = va * xv;
      } else {
        fVec xc = cap_on ? vcap * (xv * vinv).tanh() : xv;
        fVec pc = (xc - vlse).exp_u20();
        if (p.kind == Kind::kMseProbs) {
          gv = vb * pc * (pc - va);
        } else {
          gv = pc * va;
          if (b_on || p.prob) {
            fVec bt = p.prob ? at::vec::fmadd(vb, fVec::loadu(t + c), vby) : vb;
            if (p.w) bt = bt * fVec::loadu(p.w + c);
            gv = gv - bt;
          }
          if (cap_on) {
            fVec u = xc * vinv;
            gv = gv * (vone - u * u);
          }
        }
      }
      gv.store(gf + c);
    }
    for (; c < C; ++c) {
      const float xv = x[c];
      float gv;
      if (p.kind == Kind::kMseLogits) {
        gv = a * xv;
      } else {
        const float xc = cap_on ? p.cap * std::tanh(xv * inv_cap) : xv;
        const float pc = std::exp(xc - lse);
        if (p.kind == Kind::kMseProbs) {
          gv = b * pc * (pc - a);
        } else {
          gv = pc * a;
          if (b_on || p.prob) gv -= (p.prob ? b * t[c] + b_y : b) * (p.w ? p.w[c] : 1.f);
          if (cap_on) {
            const float u = xc * inv_cap;
            gv *= 1.f - u * u;
          }
        }
      }
      gf[c] = gv;
    }
    if (has_y) gf[y] -= b_y * d_y;  // the target column, when this slice holds it
    if constexpr (!is_float) store_row(gf, g, C);
  }
}

}  // namespace

at::Tensor logit_grad(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                      const at::Tensor& rows, int64_t kind, int64_t ignore_index, double softcap,
                      const c10::optional<at::Tensor>& grad_out) {
  const char* where = "spkern cpu logit_grad";
  TORCH_CHECK(logits.device().is_cpu(), where, ": logits must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, where, ": logits must be (rows, classes) with unit class stride");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, where,
              ": logits must be float32, bfloat16 or float16");
  TORCH_CHECK(kind >= int64_t(Kind::kCrossEntropy) && kind <= int64_t(Kind::kMseProbs), where, ": unknown kind ", kind);
  const int64_t M = logits.size(0), C = logits.size(1);
  const bool prob = target.is_floating_point();
  if (prob) {
    TORCH_CHECK(target.sizes() == logits.sizes() && target.stride(1) == 1 && target.scalar_type() == dtype &&
                    kind == int64_t(Kind::kCrossEntropy),
                where, ": probability target must match logits (cross-entropy only)");
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == M && target.scalar_type() == at::kLong && target.is_contiguous(),
                where, ": target must be int64 of shape (rows,)");
  }
  const bool has_w = weight.has_value() && weight->defined();
  if (has_w)
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->is_contiguous() && weight->numel() == C &&
                    weight->device().is_cpu(),
                where, ": weight must be float32 of shape (classes,)");
  TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.dim() == 2 && rows.size(0) == M && rows.size(1) == 4 &&
                  rows.is_contiguous() && rows.device().is_cpu(),
              where, ": rows must be contiguous float32 (rows, 4)");
  at::Tensor grad;
  if (grad_out.has_value() && grad_out->defined()) {  // (may be the logits themselves)
    TORCH_CHECK(grad_out->sizes() == logits.sizes() && grad_out->stride(1) == 1 && grad_out->scalar_type() == dtype,
                where, ": grad_out must be like logits");
    grad = *grad_out;
  } else {
    grad = empty_large({M, C}, logits.options());  // (as the fused loss's: no page faults on reuse)
  }
  if (M == 0 || C == 0) return grad;
  GradParams p{static_cast<Kind>(kind), C, ignore_index, float(softcap), prob, has_w ? weight->data_ptr<float>() : nullptr};
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(C, 1));
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* X = logits.data_ptr<scalar_t>();
    const int64_t* Ti = prob ? nullptr : target.data_ptr<int64_t>();
    const scalar_t* Tp = prob ? target.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
      grad_rows<scalar_t>(p, X, logits.stride(0), Ti, Tp, prob ? target.stride(0) : 0, rows.data_ptr<float>(),
                          grad.data_ptr<scalar_t>(), grad.stride(0), begin, end);
    });
  };
  switch (dtype) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: break;
  }
  return grad;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace spkern
