"""The cpu backend: the C++ kernels of spkern._C (csrc/cpu), on CPU tensors."""

import torch

from spkern.features import each_pair
from spkern.registry import compiled, compiled_reason, dtype_reason, register


def available(tensor, *_):
    if tensor.device.type != "cpu":
        return f"device {tensor.device}"
    if compiled() is None:
        return compiled_reason()
    return dtype_reason(tensor)


def _gram_check(A, B=None):
    return available(A) or (dtype_reason(B) if B is not None else None)


def _optim_check(p, params=None, grads=None):
    from spkern.optim import layout_reason
    return available(p) or (layout_reason(params, grads) if params is not None else None)


@register("cross_entropy", "cpu", available)
def cross_entropy(*args):
    return compiled().cross_entropy_fwd_cpu(*args)


@register("logit_grad", "cpu", available)
def logit_grad(*args):
    return compiled().logit_grad_cpu(*args)


@register("multi_tensor_norms", "cpu", available)
def multi_tensor_norms(a, b):
    return compiled().multi_tensor_norms_cpu(a, b)


@register("pair_stats", "cpu", available)
def pair_stats(a, b):
    return compiled().pair_stats_cpu(a, b)


@register("multi_pair_stats", "cpu", each_pair(available))  # (one kernel for all the pairs)
def multi_pair_stats(a, b):
    return compiled().multi_pair_stats_cpu(a, b)


@register("spectral_norm", "cpu", _gram_check)
def gram_matvec(A, B):
    A = A.contiguous()
    B = B.contiguous() if B is not None else None
    C = compiled()
    return lambda x: C.gram_matvec_cpu(A, B, x)


def _on_cpu(x, *_):
    return None if x.device.type == "cpu" else f"device {x.device}"


@register("paired_linear", "cpu", _on_cpu)
def paired_linear(x, weight, weight0):
    # A probe of a few rows against a large weight: W x^T rather than x W^T, so that BLAS
    # packs the small operand, x, and streams the weights (measured on AMD EPYC, torch 2.13
    # CPU, 2 threads: 1.3-1.65x faster at 16 rows and widths 1024-2048, 1.1x at 64 rows;
    # slower for 256 rows or widths of 256). Both products take the same path, in float32
    # (x and the weights converted: exact for bfloat16 and float16), so they round alike.
    # (Two BLAS products: blocking makes one pass over x pointless on CPU.)
    x = x.float()
    if x.shape[0] > 64 or weight.numel() < (1 << 19):
        def one(w):
            return torch.nn.functional.linear(x, w.float())
    else:
        x = x.contiguous()

        def one(w):
            return (w.float() @ x.t()).t().contiguous()
    return one(weight), (one(weight0) if weight0 is not None else None)


@register("sgd_step", "cpu", _optim_check)
def sgd_step(*args, **products):  # (products: spkern.optim's request_products, fused in the pass)
    return compiled().sgd_step_cpu(*args, **products)


@register("adamw_step", "cpu", _optim_check)
def adamw_step(*args, **products):
    return compiled().adamw_step_cpu(*args, **products)
