// Torch-facing entry points of the CUDA kernels (built only with CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace spkern {
namespace cuda {

// Same contract as spkern::cpu::cross_entropy_fwd, for CUDA tensors.
std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                          const c10::optional<at::Tensor>& weight,
                                          const at::Tensor& scalars, int64_t ignore_index,
                                          double label_smoothing, double z_loss, double softcap,
                                          bool compute_stats, bool compute_grad);

}  // namespace cuda
}  // namespace spkern
