// Torch-facing entry points of the kernels, shared by the kernels and the Python bindings.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace spkern {

// Fused cross-entropy over (rows, classes) logits. Returns
//   loss   (rows,)             float32, per-row loss (0 for ignored rows)
//   stats  (6 or 1, rows)      float32: lse, logit_norm, logit_max, max_prob, entropy, correct
//   grad   (rows, classes)     d(loss) / d(logits) times scalars[0], or empty
// scalars = [gradient scale, sum of class weights]. The CPU version is in
// csrc/cpu/cross_entropy.cpp, the CUDA one (CUDA builds only) in csrc/cuda/bindings.cpp.
namespace cpu {
std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                          const c10::optional<at::Tensor>& weight,
                                          const at::Tensor& scalars, int64_t ignore_index,
                                          double label_smoothing, double z_loss, double softcap,
                                          bool compute_stats, bool compute_grad);
}  // namespace cpu
namespace cuda {
std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                          const c10::optional<at::Tensor>& weight,
                                          const at::Tensor& scalars, int64_t ignore_index,
                                          double label_smoothing, double z_loss, double softcap,
                                          bool compute_stats, bool compute_grad);
}  // namespace cuda

namespace cpu {
// Frees the gradient buffer kept for reuse by the CPU kernels (see empty_large).
void release_cached_buffer();

// The vector instruction set this file was compiled for ("avx512", "avx2" or "default").
const char* compiled_isa();
}  // namespace cpu

}  // namespace spkern
