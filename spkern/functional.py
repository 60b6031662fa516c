"""Drop-ins with torch's own signatures: ``spkern.functional.cross_entropy`` for
``torch.nn.functional.cross_entropy`` and ``spkern.functional.linear_cross_entropy`` for
``torch.nn.functional.linear_cross_entropy`` (torch 2.13).

``linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
reduction="mean", ignore_index=None, label_smoothing=0.0, options=None)`` runs spkern's
fused kernel (the logits never exist) where it can: an ``(N, in)`` or ``(in,)`` input, a
``(C, in)`` weight, a ``(C,)`` bias or none, class-index targets. Every other combination
torch accepts -- probability targets (their gradient included), a weight with extra
dimensions ``(C, d1, ..., dK, in)`` (a K-dimensional loss) and its bias -- runs torch's own
function: the same numbers, without the fusion (a documented fallback, never an error torch
would not raise). ``options`` (torch's chunking) has no effect on the fused path, which
chunks by itself.
"""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from spkern.cross_entropy import cross_entropy
from spkern.linear_loss import linear_cross_entropy as _fused


def fused_reason(input, linear_weight, target, linear_bias) -> Optional[str]:
    """Why a call cannot take the fused kernel (torch's function then runs), or None."""
    if not all(isinstance(t, Tensor) for t in (input, linear_weight, target)):
        return "arguments that are not tensors"
    if input.dim() not in (1, 2):
        return f"a {input.dim()}-d input"
    if linear_weight.dim() != 2:
        return f"a {linear_weight.dim()}-d linear_weight (a K-dimensional loss)"
    if target.is_floating_point():
        return "probability targets"
    if linear_bias is not None and (not isinstance(linear_bias, Tensor) or linear_bias.dim() != 1):
        return "a linear_bias with extra dimensions"
    if input.shape[-1] != linear_weight.shape[-1] or target.shape != input.shape[:-1]:
        return "shapes torch refuses"  # (its own error message)
    return None


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         reduction: str = "mean", ignore_index: Optional[int] = None,
                         label_smoothing: float = 0.0, options=None) -> Tensor:
    """``torch.nn.functional.linear_cross_entropy``, fused where it can be (see the module
    docstring)."""
    if fused_reason(input, linear_weight, target, linear_bias) is not None:
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                      reduction=reduction, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing, options=options)
    return _fused(input, linear_weight, target, linear_bias, reduction=reduction,
                  ignore_index=-100 if ignore_index is None else ignore_index, label_smoothing=label_smoothing,
                  class_weight=weight)


__all__ = ["cross_entropy", "fused_reason", "linear_cross_entropy"]
