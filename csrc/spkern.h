// Torch-facing entry points of the kernels, shared by the kernels and the Python bindings.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>
#include <utility>
#include <vector>

#include "constants.h"

namespace spkern {

// Fused loss over (rows, classes) logits with per-row logit statistics. kind: 0 cross-entropy,
// 1 squared error of the logits against one-hot targets, 2 squared error of the softmax
// probabilities against one-hot targets. Returns
//   loss   (rows,)             float32, per-row loss (0 for ignored rows)
//   stats  (6 or 1, rows)      float32: lse, logit_norm, logit_max, max_prob, entropy, correct
//   grad   (rows, classes)     d(loss) / d(logits) times scalars[0], or empty; written into
//                              grad_out when given (which may be the logits themselves)
// scalars = [gradient scale, sum of class weights]. The CPU version is in
// csrc/cpu/cross_entropy.cpp, the CUDA one (CUDA builds only) in csrc/cuda/bindings.cpp.
using LogitLossFwd = std::vector<at::Tensor>(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const at::Tensor& scalars, int64_t kind, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, bool compute_stats, bool compute_grad,
    const c10::optional<at::Tensor>& grad_out);

namespace cpu {
// The CPU kernels (csrc/cpu). setup.py compiles every csrc/cpu/*.cpp once per instruction set
// (CPU_CAPABILITY = DEFAULT: portable, AVX2: AVX2 + FMA + F16C, AVX512: AVX-512 F/BW/VL/DQ), each
// copy in its own namespace spkern::cpu::<CPU_CAPABILITY> (csrc/cpu/kernels.h), as PyTorch
// compiles its own; csrc/cpu_dispatch.cpp runs the widest copy this CPU supports.

// The gradient of the logit losses from each row's log-sum-exp and coefficients, rows =
// (rows, 4) float32 [lse, a, b, b_y]: the second pass of the vocabulary-parallel losses.
// Written into grad_out when given. csrc/cpu/logit_grad.cpp has the formulas.
using LogitGrad = at::Tensor(const at::Tensor& logits, const at::Tensor& target,
                             const c10::optional<at::Tensor>& weight, const at::Tensor& rows, int64_t kind,
                             int64_t ignore_index, double softcap, const c10::optional<at::Tensor>& grad_out);

// For tensors a_i and (optionally, else b_i = 0) b_i of equal sizes: a (T, 4) float32
// tensor of ||a_i||^2, ||b_i||^2, ||a_i - b_i||^2, <a_i, b_i> (the columns of Sum in
// constants.h). csrc/cpu/norms.cpp.
using MultiTensorNorms = at::Tensor(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b);

// Statistics of activation pairs a (current), b (reference, optional: else 0) of shape
// (rows, features) and one dtype: a (rows, 5) float64 tensor of ||a||^2, ||b||^2,
// ||a - b||^2, <a, b> and the number of exact zeros of a, per row. csrc/cpu/pair_stats.cpp.
using PairStats = at::Tensor(const at::Tensor& a, const c10::optional<at::Tensor>& b);

// pair_stats of many pairs (a[i], b[i]; each b[i] optional, each pair of its own shape and
// dtype) in one call: a (pairs, 5) float64 tensor of each pair's sums over all its rows.
using MultiPairStats = at::Tensor(const std::vector<at::Tensor>& a, const std::vector<c10::optional<at::Tensor>>& b);

// One power-iteration step for the operator norm of a - b (b optional: else 0), a and b of
// shape (m, n) in float32, bfloat16 or float16, v a float32 (n,) vector: (a - b)^T (a - b) v
// in float32, in one pass over a and b. csrc/cpu/gram.cpp.
using GramMatvec = at::Tensor(const at::Tensor& a, const c10::optional<at::Tensor>& b, const at::Tensor& v);

// Fused optimizer steps (csrc/cpu/optim.cpp): apply torch.optim.SGD's / AdamW's update
// in one pass and write per parameter into stats (P, 4) float32: ||W_{t+1} - W_t||^2,
// ||W_{t+1}||^2, ||grad||^2, ||W_{t+1} - W_0||^2 (0 when init is empty). For each
// parameter gram_index[k] (a matrix, with init given) also gram_out[k] =
// (W_{t+1} - W_0)^T (W_{t+1} - W_0) gram_v[k], from the rows while they are in cache.
using SgdStep = void(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& bufs, const std::vector<bool>& buf_is_new,
                     const std::vector<at::Tensor>& init, at::Tensor stats, double lr, double momentum,
                     double dampening, double weight_decay, bool nesterov, bool maximize,
                     const std::vector<int64_t>& gram_index, const std::vector<at::Tensor>& gram_v,
                     const std::vector<at::Tensor>& gram_out);
using AdamwStep = void(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                       const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<double>& steps,
                       const std::vector<at::Tensor>& init, at::Tensor stats, double lr, double beta1,
                       double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                       const std::vector<int64_t>& gram_index, const std::vector<at::Tensor>& gram_v,
                       const std::vector<at::Tensor>& gram_out);

// One instruction set's copy of the kernels (each csrc/cpu/table.cpp defines its own).
struct Kernels {
  const char* isa;  // "default", "avx2" or "avx512", as torch.backends.cpu.get_cpu_capability() names them
  LogitLossFwd* cross_entropy_fwd;
  LogitGrad* logit_grad;
  MultiTensorNorms* multi_tensor_norms;
  PairStats* pair_stats;
  MultiPairStats* multi_pair_stats;
  GramMatvec* gram_matvec;
  SgdStep* sgd_step;
  AdamwStep* adamw_step;
};

// A copy built into the extension and the CPU features it needs (csrc/cpu_dispatch.cpp).
struct Variant {
  const Kernels* kernels;
  std::vector<std::string> needs;
};
const std::vector<Variant>& variants();       // narrowest first
bool cpu_has(const std::string& feature);     // "avx2", "fma", "f16c", "avx512f", ...
std::vector<std::string> missing_features(const Variant& v);  // those this CPU lacks

// The copy in use: at load the widest this CPU runs; set_isa(name) changes it (a ValueError
// for a copy not built in or one this CPU cannot run).
const Kernels& active();
void set_isa(const std::string& isa);

// The entry point the bindings export for a kernel: &Active<&Kernels::f>::call runs f of the
// copy in use.
template <auto Member>
struct Active;
template <typename R, typename... Args, R (*Kernels::*Member)(Args...)>
struct Active<Member> {
  static R call(Args... args) { return (active().*Member)(std::forward<Args>(args)...); }
};

// An uninitialised tensor for a large output (a gradient of logits): 2 MB aligned with
// transparent huge pages, and the last one freed handed to the next request of its size
// (csrc/cpu_buffers.cpp); smaller ones from at::empty.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees the gradient buffer kept for reuse by the CPU kernels (see empty_large).
void release_cached_buffer();
}  // namespace cpu

namespace cuda {
LogitLossFwd cross_entropy_fwd;
at::Tensor multi_tensor_norms(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b);
at::Tensor pair_stats(const at::Tensor& a, const c10::optional<at::Tensor>& b);
}  // namespace cuda

// Checks the arguments of a LogitLossFwd entry point (shapes, dtypes, devices; not the
// target values) and allocates its outputs {loss, stats, grad}; a fresh gradient comes
// from make_grad(sizes, options).
template <typename MakeGrad>
std::vector<at::Tensor> check_and_allocate(const char* where, const at::Tensor& logits,
                                           const at::Tensor& target,
                                           const c10::optional<at::Tensor>& weight,
                                           const at::Tensor& scalars, int64_t kind,
                                           bool compute_stats, bool compute_grad,
                                           const c10::optional<at::Tensor>& grad_out,
                                           MakeGrad make_grad) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, where,
              ": logits must be (rows, classes) with unit class stride");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, where,
              ": logits must be float32, bfloat16 or float16");
  TORCH_CHECK(kind >= int64_t(Kind::kCrossEntropy) && kind <= int64_t(Kind::kMseProbs), where,
              ": unknown kind ", kind);
  const int64_t M = logits.size(0), C = logits.size(1);
  TORCH_CHECK(target.device() == logits.device(), where, ": target must be on the logits' device");
  if (target.is_floating_point()) {
    TORCH_CHECK(target.sizes() == logits.sizes() && target.stride(1) == 1 &&
                    target.scalar_type() == dtype,
                where, ": probability target must match logits");
    TORCH_CHECK(kind == int64_t(Kind::kCrossEntropy), where, ": squared errors take class indices");
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == M && target.scalar_type() == at::kLong &&
                    target.is_contiguous(),
                where, ": target must be int64 of shape (rows,)");
  }
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->is_contiguous() &&
                    weight->numel() == C && weight->device() == logits.device(),
                where, ": weight must be float32 of shape (classes,) on the logits' device");
  }
  TORCH_CHECK(scalars.scalar_type() == at::kFloat && scalars.numel() == 2 &&
                  scalars.device() == logits.device(),
              where, ": scalars must be float32 (2,) on the logits' device");
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor grad;
  if (!compute_grad) {
    grad = at::empty({0}, logits.options());
  } else if (grad_out.has_value() && grad_out->defined()) {
    // may be the logits themselves: every row is read before its gradient is written
    TORCH_CHECK(grad_out->sizes() == logits.sizes() && grad_out->stride(1) == 1 &&
                    grad_out->scalar_type() == dtype && grad_out->device() == logits.device(),
                where, ": grad_out must be shaped and typed like logits");
    grad = *grad_out;
  } else {
    grad = make_grad(logits.sizes(), logits.options());
  }
  return {at::empty({M}, f32), at::empty({compute_stats ? 6 : 1, M}, f32), grad};
}

}  // namespace spkern
