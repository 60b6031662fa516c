"""nn.Module wrappers of the functional API, with the names and defaults of torch.nn."""

from typing import Optional

from torch import Tensor, nn
from torch.nn.modules.loss import _Reduction

from spkern.cross_entropy import cross_entropy
from spkern.linear_loss import linear_cross_entropy


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


class LinearCrossEntropyLoss(nn.Module):
    """``F.cross_entropy(F.linear(input, weight, bias), target)`` without the logits:
    :func:`spkern.linear_cross_entropy` as a module. Called as ``loss(input, weight,
    target, bias=None)``, so that the head's own parameters stay where they are."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        class_weight: Optional[Tensor] = None,
        return_stats: bool = False,
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_stats = return_stats
        self.chunk_size = chunk_size

    def forward(self, input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None):
        return linear_cross_entropy(
            input, weight, target, bias, reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            class_weight=self.class_weight, return_stats=self.return_stats,
            chunk_size=self.chunk_size)
