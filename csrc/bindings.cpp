// Python bindings of spkern._C. CUDA entry points are added when the extension is
// built with CUDA (SPKERN_WITH_CUDA).
#include <torch/extension.h>

#include "constants.h"
#include "spkern.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace cpu = spkern::cpu;
  m.doc() = "spkern compiled kernels";
  m.def("cross_entropy_fwd_cpu", &cpu::Active<&cpu::Kernels::cross_entropy_fwd>::call,
        "fused cross-entropy forward (+grad) with logit statistics, CPU");
  m.def("logit_grad_cpu", &cpu::Active<&cpu::Kernels::logit_grad>::call,
        "the logit losses' gradient from each row's log-sum-exp and coefficients (vocabulary-parallel), CPU",
        pybind11::arg("logits"), pybind11::arg("target"), pybind11::arg("weight"), pybind11::arg("rows"),
        pybind11::arg("kind"), pybind11::arg("ignore_index"), pybind11::arg("softcap"),
        pybind11::arg("grad_out") = pybind11::none());
  m.def("multi_tensor_norms_cpu", &cpu::Active<&cpu::Kernels::multi_tensor_norms>::call,
        "per-tensor ||a||^2, ||b||^2, ||a-b||^2, <a,b> over lists of CPU tensors");
  m.def("pair_stats_cpu", &cpu::Active<&cpu::Kernels::pair_stats>::call,
        "per-row ||a||^2, ||b||^2, ||a-b||^2, <a,b>, zeros(a) of (rows, features) CPU tensors",
        pybind11::arg("a"), pybind11::arg("b") = pybind11::none());
  m.def("multi_pair_stats_cpu", &cpu::Active<&cpu::Kernels::multi_pair_stats>::call,
        "pair_stats_cpu of many (a, b or None) pairs in one call: (pairs, 5) totals", pybind11::arg("a"),
        pybind11::arg("b"));
  m.def("gram_matvec_cpu", &cpu::Active<&cpu::Kernels::gram_matvec>::call, "(a - b)^T (a - b) v in one pass over a and b, CPU",
        pybind11::arg("a"), pybind11::arg("b") = pybind11::none(), pybind11::arg("v"));
  using pybind11::arg;
  const auto none_i = std::vector<int64_t>{};
  const auto none_t = std::vector<at::Tensor>{};
  m.def("sgd_step_cpu", &cpu::Active<&cpu::Kernels::sgd_step>::call, "fused torch.optim.SGD step with norms, CPU", arg("params"),
        arg("grads"), arg("bufs"), arg("buf_is_new"), arg("init"), arg("stats"), arg("lr"), arg("momentum"),
        arg("dampening"), arg("weight_decay"), arg("nesterov"), arg("maximize"), arg("gram_index") = none_i,
        arg("gram_v") = none_t, arg("gram_out") = none_t);
  m.def("adamw_step_cpu", &cpu::Active<&cpu::Kernels::adamw_step>::call, "fused torch.optim.AdamW step with norms, CPU",
        arg("params"), arg("grads"), arg("exp_avgs"), arg("exp_avg_sqs"), arg("max_exp_avg_sqs"), arg("steps"),
        arg("init"), arg("stats"), arg("lr"), arg("beta1"), arg("beta2"), arg("eps"), arg("weight_decay"),
        arg("amsgrad"), arg("maximize"), arg("gram_index") = none_i, arg("gram_v") = none_t,
        arg("gram_out") = none_t);
  // the CPU kernels' copies (one per instruction set: csrc/cpu_dispatch.cpp)
  m.def("cpu_variants", [] {
    pybind11::list out;
    for (const auto& v : cpu::variants()) {
      pybind11::dict d;
      d["isa"] = v.kernels->isa;
      d["needs"] = v.needs;
      d["missing"] = cpu::missing_features(v);
      out.append(d);
    }
    return out;
  }, "the CPU kernels built in, narrowest first: isa, the CPU features it needs, those this CPU lacks");
  m.def("cpu_isa", [] { return std::string(cpu::active().isa); }, "the instruction set of the CPU kernels in use");
  m.def("set_cpu_isa", &cpu::set_isa, "run the CPU kernels built for this instruction set", pybind11::arg("isa"));
  m.def("constants", [] {  // csrc/constants.h, for the test that Python agrees
    pybind11::dict d;
    d["CROSS_ENTROPY"] = int(spkern::Kind::kCrossEntropy);
    d["MSE_LOGITS"] = int(spkern::Kind::kMseLogits);
    d["MSE_PROBS"] = int(spkern::Kind::kMseProbs);
    d["A_SQ"] = int(spkern::kASq);
    d["B_SQ"] = int(spkern::kBSq);
    d["DIFF_SQ"] = int(spkern::kDiffSq);
    d["DOT"] = int(spkern::kDot);
    d["ZEROS"] = int(spkern::kZeros);
    d["NORM_COLUMNS"] = spkern::kNormColumns;
    d["PAIR_COLUMNS"] = spkern::kPairColumns;
    return d;
  });
  m.def("release_cached_buffer", &spkern::cpu::release_cached_buffer,
        "free the large CPU buffer kept for reuse");
#ifdef SPKERN_WITH_CUDA
  m.def("cross_entropy_fwd_cuda", &spkern::cuda::cross_entropy_fwd,
        "fused cross-entropy forward (+grad) with logit statistics, CUDA");
  m.def("multi_tensor_norms_cuda", &spkern::cuda::multi_tensor_norms,
        "per-tensor ||a||^2, ||b||^2, ||a-b||^2, <a,b> over lists of CUDA tensors");
  m.def("pair_stats_cuda", &spkern::cuda::pair_stats,
        "per-row ||a||^2, ||b||^2, ||a-b||^2, <a,b>, zeros(a) of (rows, features) CUDA tensors",
        pybind11::arg("a"), pybind11::arg("b") = pybind11::none());
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
