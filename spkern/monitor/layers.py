"""Which layers the tracker measures with the refined coordinate check, and how.

A layer that applies a weight matrix as a linear map, ``h = apply(x, W) + b``, gets the
RCC: the effective update ``apply(x_t, W_t - W_0)`` (as ``h_t - b - apply(x_t, W_0)``),
the propagating update ``apply(x_t, W_0) - apply(x_0, W_0)`` and op(W_t - W_0). Known:

    torch.nn.Linear                      x W^T (the tracker pairs W_t x and W_0 x in one pass)
    transformers' Conv1D (GPT-2 & co.)   x W, the weight stored (in, out)
    torch.nn.Embedding                   W[x]: x are indices (no input statistics)
    torch.nn.Conv1d / Conv2d / Conv3d    the convolution with W (op of W as a (out, in*k...) matrix)

Norm layers are found by duck type (:func:`is_norm`: a class named ``...Norm...`` with a
1-D weight and no submodules: LayerNorm, RMSNorm, nanoGPT's and Hugging Face's own) and get
output statistics. Teach the tracker a layer of your own with :func:`register_layer`::

    class MyMap(spkern.monitor.LinearMap):
        def apply(self, module, x, weight):
            return my_op(x, weight)            # the layer's output without its bias

    spkern.monitor.register_layer(MyLayer, MyMap())
"""

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearMap:
    """How a layer applies its weight. Subclass and override :meth:`apply` (and the
    attributes where they differ), then :func:`register_layer`."""

    float_input = True  # the input is an activation (input statistics); False: indices
    alignments = True   # eff_align and prop_align: ||A x|| <= op(A) ||x|| for the layer's x
    per_row = True      # row_l2 entries: the output's rows are its last dimension's vectors

    def apply(self, module, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's output on ``x`` with ``weight`` in place of its own, bias left out."""
        raise NotImplementedError

    def without_bias(self, module, h: Tensor) -> Tensor:
        """The layer's output ``h`` less its bias."""
        bias = getattr(module, "bias", None)
        return h if bias is None else h - bias.detach()


class _Linear(LinearMap):
    def apply(self, module, x, weight):
        return F.linear(x, weight.to(x.dtype))


class _Conv1D(LinearMap):  # transformers.pytorch_utils.Conv1D: weight (in, out), y = x W + b
    def apply(self, module, x, weight):
        return torch.matmul(x, weight.to(x.dtype))


class _Embedding(LinearMap):
    float_input = False
    alignments = False

    def apply(self, module, x, weight):
        return F.embedding(x, weight)


class _Conv(LinearMap):
    alignments = False  # (op of the flattened kernel does not bound the convolution's gain)
    per_row = False

    def apply(self, module, x, weight):
        return module._conv_forward(x, weight.to(x.dtype), None)

    def without_bias(self, module, h):
        if module.bias is None:
            return h
        return h - module.bias.detach().reshape(-1, *[1] * (h.dim() - 2))


def _is_hf_conv1d(m):
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


_LAYERS = [
    (nn.Linear, _Linear()),
    (_is_hf_conv1d, _Conv1D()),
    (nn.Embedding, _Embedding()),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _Conv()),
]


def register_layer(layer: Union[type, tuple, Callable[[nn.Module], bool]], linear_map: LinearMap):
    """Teaches the tracker a layer: modules of type ``layer`` (or for which the predicate
    ``layer(module)`` is true) are measured with ``linear_map``. Later registrations take
    precedence, so a known type can be given another map."""
    if not isinstance(linear_map, LinearMap):
        raise TypeError(f"linear_map must be a spkern.monitor.LinearMap, got {type(linear_map).__name__}")
    if not (isinstance(layer, (type, tuple)) or callable(layer)):
        raise TypeError(f"layer must be a module type, a tuple of them or a predicate, got {layer!r}")
    _LAYERS.insert(0, (layer, linear_map))


def linear_map(module: nn.Module) -> Optional[LinearMap]:
    """The map the tracker measures ``module`` with, or None."""
    for layer, mp in _LAYERS:
        hit = isinstance(module, layer) if isinstance(layer, (type, tuple)) else layer(module)
        if hit and isinstance(getattr(module, "weight", None), Tensor):
            return mp
    return None


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer by duck type: a class whose name has ``Norm`` in it, no
    submodules, and a 1-D weight (or none: no elementwise affine)."""
    if "Norm" not in type(module).__name__ or next(module.children(), None) is not None:
        return False
    w = getattr(module, "weight", None)
    return w is None or (isinstance(w, Tensor) and w.dim() == 1)


def is_captured(mp) -> bool:
    """Whether the tracker pairs the products of this map inside ``F.linear`` (one pass
    over x for W_t x and W_0 x)."""
    return isinstance(mp, _Linear)


__all__ = ["LinearMap", "is_norm", "linear_map", "register_layer"]
