"""nn.Module wrappers of the functional API, with the names and defaults of torch.nn."""

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.loss import _Reduction

from spkern.cross_entropy import cross_entropy


class CrossEntropyLoss(nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` (same arguments, same results) with the
    extras of :func:`spkern.cross_entropy`: ``z_loss``, ``softcap`` and ``return_stats``.

    With ``return_stats=True`` the call returns ``(loss, LogitStats)``.
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing", "z_loss", "softcap",
                     "return_stats"]

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        return_stats: bool = False,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _Reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_stats = return_stats

    def forward(self, input: Tensor, target: Tensor):
        return cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, return_stats=self.return_stats)

    def extra_repr(self) -> str:
        extras = [f"reduction={self.reduction!r}"]
        for name, default in (("ignore_index", -100), ("label_smoothing", 0.0), ("z_loss", 0.0),
                              ("softcap", None), ("return_stats", False)):
            if getattr(self, name) != default:
                extras.append(f"{name}={getattr(self, name)!r}")
        return ", ".join(extras)
