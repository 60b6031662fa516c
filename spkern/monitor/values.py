"""The tracker's metrics as sums and the reduction that turns them into floats.

A metric is kept as the sums behind it (:class:`_Ratio`: numerator, denominator, root,
scale) or as a maximum (:class:`_Max`), device tensors all: no host sync while training.
:func:`reduce` reads them all in one transfer; under ``torch.distributed`` it first adds
the sums over the ranks (and takes the largest maximum), so that the values are those of
one process measuring every rank's rows.
"""

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor


def world_size():
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _Ratio(NamedTuple):
    """A metric as ``(num / den) ** (1/2 if root) * scale``: num and den are sums over the
    measured rows, which under torch.distributed are summed over the ranks before the
    ratio is taken (a value the same on every rank is given with den=1: its mean)."""
    num: Tensor
    den: Union[Tensor, float]
    root: bool = False
    scale: Optional[Tensor] = None  # the same on every rank


class _Max(NamedTuple):
    """A metric that is the largest over the ranks."""
    value: Tensor


def rms(sq, numel):
    """rms from a sum of squares over ``numel`` entries."""
    return _Ratio(sq, numel, True)


def reduce(values):
    """{name: _Ratio or _Max of device tensors} -> {name: float}, with one host transfer;
    under torch.distributed the sums are added (the maxima taken) over the ranks first."""
    if not values:
        return {}
    with torch.no_grad():
        return _reduce(values)


def _reduce(values):
    ratios = [k for k, v in values.items() if isinstance(v, _Ratio)]
    maxes = [k for k, v in values.items() if isinstance(v, _Max)]
    first = next(iter(values.values()))
    device = (first.num if isinstance(first, _Ratio) else first.value).device

    # float64: a sum of squares of activations beyond ~1e19 does not fit in float32
    def stack(items):
        """Device scalars and numbers -> one float64 vector: one stack per dtype and device
        (a few operations for the ~100 values of a measurement, not a few per value)."""
        groups, at_num, nums = {}, [], []
        for i, x in enumerate(items):
            if isinstance(x, Tensor):
                pos, ts = groups.setdefault((x.dtype, x.device), ([], []))
                pos.append(i)
                ts.append(x if x.dim() == 0 else x.reshape(()))
            else:
                at_num.append(i)
                nums.append(float(x))
        if len(groups) == 1 and not nums:
            return torch.stack(next(iter(groups.values()))[1]).to(device, torch.float64)
        out = torch.empty(len(items), device=device, dtype=torch.float64)
        for pos, ts in groups.values():
            out[torch.tensor(pos, device=device)] = torch.stack(ts).to(device, torch.float64)
        if nums:
            out[torch.tensor(at_num, device=device)] = torch.tensor(nums, device=device, dtype=torch.float64)
        return out

    top = stack([values[k].value for k in maxes]) if maxes else None
    num = den = None
    if ratios:
        num = stack([values[k].num for k in ratios])
        den = stack([values[k].den for k in ratios])
    if world_size() > 1:  # every rank calls metrics() at the same steps with the same names
        if ratios:
            both = torch.cat([num, den])
            torch.distributed.all_reduce(both)
            num, den = both.split(len(ratios))
        if top is not None:
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    out = []
    if ratios:
        val = num / den.clamp_min(torch.finfo(torch.float64).tiny)
        root = torch.tensor([values[k].root for k in ratios], device=device)
        val = torch.where(root, val.clamp_min(0).sqrt(), val)
        scales = [values[k].scale for k in ratios]
        if any(x is not None for x in scales):
            val = val * stack([1.0 if x is None else x for x in scales])
        out.append(val)
    if top is not None:
        out.append(top)
    got = dict(zip(ratios + maxes, torch.cat(out).tolist()))
    return {k: got[k] for k in values}
