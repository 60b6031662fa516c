// Torch glue of the CUDA kernels: checks, allocation, the current stream.
#include "../spkern.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cross_entropy.h"

namespace spkern {
namespace cuda {

std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                          const c10::optional<at::Tensor>& weight,
                                          const at::Tensor& scalars, int64_t kind,
                                          int64_t ignore_index, double label_smoothing,
                                          double z_loss, double softcap, bool compute_stats,
                                          bool compute_grad,
                                          const c10::optional<at::Tensor>& grad_out) {
  TORCH_CHECK(logits.is_cuda(), "spkern cuda cross_entropy: logits must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto out = check_and_allocate(
      "spkern cuda cross_entropy", logits, target, weight, scalars, kind, compute_stats,
      compute_grad, grad_out,
      [](at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); });
  const at::Tensor &loss = out[0], &stats = out[1], &grad = out[2];
  const bool prob = target.is_floating_point();
  CrossEntropyArgs a{};
  switch (logits.scalar_type()) {
    case at::kHalf: a.dtype = DType::kFloat16; break;
    case at::kBFloat16: a.dtype = DType::kBFloat16; break;
    default: a.dtype = DType::kFloat32; break;  // checked above
  }
  if (prob) {
    a.target_prob = target.data_ptr();
    a.stride_t = target.stride(0);
  } else {
    a.target = target.data_ptr<int64_t>();
  }
  if (weight.has_value() && weight->defined()) a.weight = weight->data_ptr<float>();
  const int64_t M = logits.size(0);
  a.logits = logits.data_ptr();
  a.stride_x = logits.stride(0);
  a.scalars = scalars.data_ptr<float>();
  a.loss = loss.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  a.stride_stats = M;
  a.grad = compute_grad ? grad.data_ptr() : nullptr;
  a.stride_g = compute_grad ? grad.stride(0) : 0;
  a.rows = M;
  a.C = logits.size(1);
  a.ignore_index = ignore_index;
  a.label_smoothing = static_cast<float>(label_smoothing);
  a.z_loss = static_cast<float>(z_loss);
  a.softcap = static_cast<float>(softcap);
  a.prob = prob;
  a.compute_stats = compute_stats;
  a.kind = static_cast<Kind>(kind);
  const char* err = spkern::cuda::launch_cross_entropy_fwd(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "spkern cuda cross_entropy: ", err);
  return out;
}

}  // namespace cuda
}  // namespace spkern
