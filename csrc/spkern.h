// Torch-facing entry points of the kernels, shared by the kernels and the Python bindings.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

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
namespace cpu {
std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                          const c10::optional<at::Tensor>& weight,
                                          const at::Tensor& scalars, int64_t kind,
                                          int64_t ignore_index, double label_smoothing,
                                          double z_loss, double softcap, bool compute_stats,
                                          bool compute_grad,
                                          const c10::optional<at::Tensor>& grad_out);
}  // namespace cpu
namespace cuda {
std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                          const c10::optional<at::Tensor>& weight,
                                          const at::Tensor& scalars, int64_t kind,
                                          int64_t ignore_index, double label_smoothing,
                                          double z_loss, double softcap, bool compute_stats,
                                          bool compute_grad,
                                          const c10::optional<at::Tensor>& grad_out);
}  // namespace cuda

namespace cpu {
// Frees the gradient buffer kept for reuse by the CPU kernels (see empty_large).
void release_cached_buffer();

// The vector instruction set this file was compiled for ("avx512", "avx2" or "default").
const char* compiled_isa();
}  // namespace cpu

}  // namespace spkern
