"""The cuda backend: the CUDA kernels of spkern._C (csrc/cuda), when it is built with CUDA."""

from spkern.features import each_pair, pair_by_pair
from spkern.registry import compiled, dtype_reason, register


def available(tensor, *_):
    if tensor.device.type != "cuda":
        return f"device {tensor.device}"
    if compiled() is None or not compiled().with_cuda:
        return "spkern._C is built without CUDA"
    return dtype_reason(tensor)


@register("cross_entropy", "cuda", available)
def cross_entropy(*args):
    return compiled().cross_entropy_fwd_cuda(*args)


@register("multi_tensor_norms", "cuda", available)
def multi_tensor_norms(a, b):
    return compiled().multi_tensor_norms_cuda(a, b)


@register("pair_stats", "cuda", available)
def pair_stats(a, b):
    return compiled().pair_stats_cuda(a, b)


@register("multi_pair_stats", "cuda", each_pair(available))
def multi_pair_stats(a, b):
    return pair_by_pair(compiled().pair_stats_cuda)(a, b)
