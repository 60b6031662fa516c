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
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1,
              "spkern cuda cross_entropy: logits must be (rows, classes) with unit class stride");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t M = logits.size(0), C = logits.size(1);
  const bool prob = target.is_floating_point();
  CrossEntropyArgs a{};
  switch (logits.scalar_type()) {
    case at::kFloat: a.dtype = DType::kFloat32; break;
    case at::kHalf: a.dtype = DType::kFloat16; break;
    case at::kBFloat16: a.dtype = DType::kBFloat16; break;
    default: TORCH_CHECK(false, "spkern cuda cross_entropy: logits must be float32, float16 or bfloat16");
  }
  TORCH_CHECK(target.device() == logits.device(), "spkern cuda cross_entropy: target device");
  if (prob) {
    TORCH_CHECK(target.sizes() == logits.sizes() && target.stride(1) == 1 &&
                    target.scalar_type() == logits.scalar_type(),
                "spkern cuda cross_entropy: probability target must match logits");
    a.target_prob = target.data_ptr();
    a.stride_t = target.stride(0);
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == M && target.scalar_type() == at::kLong &&
                    target.is_contiguous(),
                "spkern cuda cross_entropy: target must be int64 of shape (rows,)");
    a.target = target.data_ptr<int64_t>();
  }
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->is_contiguous() &&
                    weight->numel() == C && weight->device() == logits.device(),
                "spkern cuda cross_entropy: weight must be float32 (classes,) on the logits' device");
    a.weight = weight->data_ptr<float>();
  }
  TORCH_CHECK(scalars.scalar_type() == at::kFloat && scalars.numel() == 2 &&
                  scalars.device() == logits.device(),
              "spkern cuda cross_entropy: scalars must be float32 (2,) on the logits' device");

  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({M}, f32);
  at::Tensor stats = at::empty({compute_stats ? 6 : 1, M}, f32);
  TORCH_CHECK(kind >= 0 && kind <= 2, "spkern cuda cross_entropy: unknown kind ", kind);
  at::Tensor grad;
  if (!compute_grad) {
    grad = at::empty({0}, logits.options());
  } else if (grad_out.has_value() && grad_out->defined()) {
    TORCH_CHECK(grad_out->sizes() == logits.sizes() && grad_out->stride(1) == 1 &&
                    grad_out->scalar_type() == logits.scalar_type() &&
                    grad_out->device() == logits.device(),
                "spkern cuda cross_entropy: grad_out must be shaped and typed like logits");
    grad = *grad_out;
  } else {
    grad = at::empty({M, C}, logits.options());
  }
  a.logits = logits.data_ptr();
  a.stride_x = logits.stride(0);
  a.scalars = scalars.data_ptr<float>();
  a.loss = loss.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  a.stride_stats = M;
  a.grad = compute_grad ? grad.data_ptr() : nullptr;
  a.stride_g = compute_grad ? grad.stride(0) : 0;
  a.rows = M;
  a.C = C;
  a.ignore_index = ignore_index;
  a.label_smoothing = static_cast<float>(label_smoothing);
  a.z_loss = static_cast<float>(z_loss);
  a.softcap = static_cast<float>(softcap);
  a.prob = prob;
  a.compute_stats = compute_stats;
  a.kind = static_cast<Kind>(kind);
  const char* err = spkern::cuda::launch_cross_entropy_fwd(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "spkern cuda cross_entropy: ", err);
  return {loss, stats, grad};
}

}  // namespace cuda
}  // namespace spkern
