"""The triton backend: the Triton kernels of spkern.kernels (kernels/), on CUDA tensors,
and on CPU tensors through the Triton interpreter (how they are tested without a GPU)."""

from spkern.features import each_pair, pair_by_pair
from spkern.registry import dtype_reason, register, triton_interpreted, triton_kernels


def _available(module):
    def check(tensor, *_):
        if tensor.device.type not in ("cuda", "cpu"):
            return f"device {tensor.device}"
        if triton_kernels(module) is None:
            return "triton is not installed"
        if tensor.device.type == "cpu" and not triton_interpreted():
            return "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is imported"
        return dtype_reason(tensor)
    return check


def _optim_check(p, params=None, grads=None):
    from spkern.optim import layout_reason
    return _available("optim")(p) or (layout_reason(params, grads) if params is not None else None)


@register("cross_entropy", "triton", _available("cross_entropy"))
def cross_entropy(*args):
    return triton_kernels("cross_entropy").cross_entropy_fwd(*args)


@register("logit_grad", "triton", _available("cross_entropy"))
def logit_grad(*args):
    return triton_kernels("cross_entropy").logit_grad(*args)


@register("multi_tensor_norms", "triton", _available("norms"))
def multi_tensor_norms(a, b):
    return triton_kernels("norms").multi_tensor_norms(a, b)


@register("pair_stats", "triton", _available("features"))
def pair_stats(a, b):
    return triton_kernels("features").pair_stats(a, b)


@register("multi_pair_stats", "triton", each_pair(_available("features")))
def multi_pair_stats(a, b):
    return pair_by_pair(triton_kernels("features").pair_stats)(a, b)


@register("paired_linear", "triton", _available("features"))
def paired_linear(x, weight, weight0):
    if weight0 is None:  # (one product, computed as the first of a pair: bitwise the same)
        return triton_kernels("features").paired_linear(x, weight, weight)[0], None
    return triton_kernels("features").paired_linear(x, weight, weight0)


@register("sgd_step", "triton", _optim_check)
def sgd_step(*args):
    return triton_kernels("optim").sgd_step(*args)


@register("adamw_step", "triton", _optim_check)
def adamw_step(*args):
    return triton_kernels("optim").adamw_step(*args)
