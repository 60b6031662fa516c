// Torch glue of the CUDA kernels: checks, allocation, the current stream.
#include "../spkern.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cross_entropy.h"
#include "norms.h"
#include "pair_stats.h"

#include <map>

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

namespace spkern {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default: TORCH_CHECK(false, "spkern cuda: tensors must be float32, bfloat16 or float16");
  }
}

}  // namespace

at::Tensor multi_tensor_norms(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t T = static_cast<int64_t>(a.size());
  TORCH_CHECK(b.empty() || b.size() == a.size(),
              "spkern cuda multi_tensor_norms: b must be empty or as long as a");
  TORCH_CHECK(T > 0, "spkern cuda multi_tensor_norms: no tensors");
  const auto device = a[0].device();
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::zeros({T, 4}, a[0].options().dtype(at::kFloat));
  // group by (dtype of a, dtype of b): one launch per group
  std::map<std::pair<int, int>, std::vector<int64_t>> groups;
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(a[i].device() == device && a[i].is_contiguous(), "spkern cuda multi_tensor_norms: a[", i,
                "] must be contiguous on ", device);
    if (!b.empty())
      TORCH_CHECK(b[i].device() == device && b[i].is_contiguous() && b[i].numel() == a[i].numel(),
                  "spkern cuda multi_tensor_norms: b[", i, "] must be contiguous on ", device,
                  " with the size of a[", i, "]");
    if (a[i].numel() == 0) continue;
    groups[{int(dtype_of(a[i])), b.empty() ? -1 : int(dtype_of(b[i]))}].push_back(i);
  }
  for (const auto& [key, idx] : groups) {
    std::vector<int64_t> a_ptrs, b_ptrs, work_t, work_s, work_e, first, last;
    for (size_t j = 0; j < idx.size(); ++j) {
      const int64_t i = idx[j];
      a_ptrs.push_back(reinterpret_cast<int64_t>(a[i].data_ptr()));
      if (!b.empty()) b_ptrs.push_back(reinterpret_cast<int64_t>(b[i].data_ptr()));
      first.push_back(static_cast<int64_t>(work_t.size()));
      for (int64_t s = 0; s < a[i].numel(); s += kChunk) {
        work_t.push_back(static_cast<int64_t>(j));
        work_s.push_back(s);
        work_e.push_back(std::min(s + kChunk, a[i].numel()));
      }
      last.push_back(static_cast<int64_t>(work_t.size()));
    }
    auto table = [&](const std::vector<int64_t>& v) {
      return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(device);
    };
    at::Tensor ta = table(a_ptrs), tw = table(work_t), ts = table(work_s), te = table(work_e),
               tf = table(first), tl = table(last), tr = table(idx);
    at::Tensor tb = b.empty() ? at::Tensor() : table(b_ptrs);
    at::Tensor partial = at::empty({static_cast<int64_t>(work_t.size()), 4}, out.options());
    MultiNormArgs args{};
    args.a_ptrs = ta.data_ptr<int64_t>();
    args.b_ptrs = b.empty() ? nullptr : tb.data_ptr<int64_t>();
    args.work_t = tw.data_ptr<int64_t>();
    args.work_start = ts.data_ptr<int64_t>();
    args.work_end = te.data_ptr<int64_t>();
    args.n_work = static_cast<int64_t>(work_t.size());
    args.first = tf.data_ptr<int64_t>();
    args.last = tl.data_ptr<int64_t>();
    args.out_rows = tr.data_ptr<int64_t>();
    args.n_group = static_cast<int64_t>(idx.size());
    args.partial = partial.data_ptr<float>();
    args.out = out.data_ptr<float>();
    args.a_dtype = static_cast<DType>(key.first);
    args.b_dtype = key.second < 0 ? args.a_dtype : static_cast<DType>(key.second);
    const char* err = launch_multi_tensor_norms(args, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, "spkern cuda multi_tensor_norms: ", err);
  }
  return out;
}

at::Tensor pair_stats(const at::Tensor& a, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(a.is_cuda() && a.dim() == 2 && a.is_contiguous(),
              "spkern cuda pair_stats: a must be a contiguous (rows, features) CUDA tensor");
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor* pb = b.has_value() && b->defined() ? &*b : nullptr;
  if (pb)
    TORCH_CHECK(pb->sizes() == a.sizes() && pb->is_contiguous() && pb->scalar_type() == a.scalar_type() &&
                    pb->device() == a.device(),
                "spkern cuda pair_stats: b must be a contiguous tensor of a's shape, dtype and device");
  at::Tensor out = at::empty({a.size(0), 5}, a.options().dtype(at::kDouble));
  PairStatsArgs args{a.data_ptr(), pb ? pb->data_ptr() : nullptr, out.data_ptr<double>(), a.size(0), a.size(1),
                     dtype_of(a)};
  const char* err = launch_pair_stats(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "spkern cuda pair_stats: ", err);
  return out;
}

}  // namespace cuda
}  // namespace spkern
