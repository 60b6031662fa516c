"""The tracker's metrics as sums and the reduction that turns them into floats.

A metric is kept as the sums behind it (:class:`_Ratio`: numerator, denominator, root,
scale; :class:`_Align`: an alignment ratio), or as a maximum (:class:`_Max`), device
tensors all: no host sync while training. A numerator or denominator may be a tuple of
entries, added up when read (a layer applied several times in a pass: the sums of all
its applications).
A number may be an entry of a :class:`Table`, the values of a measurement computed
together (the pair statistics of every layer in one call, say).
:func:`reduce` reads them all in one transfer; under ``torch.distributed`` it first adds
the sums over the ranks (and takes the largest maximum), so that the values are those of
one process measuring every rank's rows.
"""

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from spkern.constants import Sum
from spkern.features import multi_pair_stats


def world_size():
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _Ratio(NamedTuple):
    """A metric as ``(num / den) ** (1/2 if root) * scale``: num and den are sums over the
    measured rows (or tuples of them, added), which under torch.distributed are summed
    over the ranks before the ratio is taken (a value the same on every rank is given
    with den=1: its mean)."""
    num: Union[Tensor, float, tuple]
    den: Union[Tensor, float, tuple]
    root: bool = False
    scale: Optional[Tensor] = None  # the same on every rank
    strict: bool = False  # a ratio of norms: NaN for 0/0, inf for x/0 (else a sum over no rows is 0)


class _Align(NamedTuple):
    """An alignment ratio ``sqrt(num / den) / op`` in [0, 1]: ``num`` = ||A X||^2 and
    ``den`` = ||X||^2 summed over the rows (and the ranks), ``op`` an estimate of op(A)
    (the same on every rank). The ratio is at most 1 when ``op`` is exact; the estimates
    are lower bounds, so it is clamped at 1. Nothing moved (``num`` = 0 with ``op`` or
    ``den`` = 0) is 0/0: NaN. A NaN in gives NaN."""
    num: Union[Tensor, float, tuple]
    den: Union[Tensor, float, tuple]
    op: Union[Tensor, float]


class _Max(NamedTuple):
    """A metric that is the largest over the ranks."""
    value: Tensor


class _Col(NamedTuple):
    """Entry ``index`` of a :class:`Table`'s flat tensor (a number of :func:`reduce`'s,
    gathered from the table with the table's other entries, in one operation)."""
    table: "Table"
    index: int


class Table:
    """Values of a measurement computed together, in a few operations, once the
    measurement has asked for all of them: ``compute`` gives a tensor, and ``table[i]``
    stands for entry ``i`` of it, flattened, until :func:`reduce` reads it. The tensor is
    computed by :meth:`compute` (the tracker calls it when a pass is over) or when first
    read."""

    def __init__(self, compute=None):
        self._compute, self._sums = compute, None

    def __getitem__(self, index) -> _Col:
        return _Col(self, int(index))

    def compute(self):
        if self._compute is not None:
            fn, self._compute = self._compute, None  # (and whatever it holds is let go)
            self._sums = fn().reshape(-1)

    @property
    def sums(self) -> Tensor:
        """The table's values, a flat tensor."""
        self.compute()
        return self._sums


class _Pair:
    """The sums of one pair of a :class:`PairSums`: ``s[Sum.A_SQ]`` and so on."""
    __slots__ = ("table", "row")

    def __init__(self, table, row):
        self.table, self.row = table, row

    def __getitem__(self, col):
        return _Col(self.table, self.row * len(Sum) + int(col))


class PairSums(Table):
    """The :func:`spkern.features.pair_stats` sums a measurement asks for (:meth:`add`
    gives each pair's sums, read by column), computed for all its pairs in one
    :func:`spkern.features.multi_pair_stats` call."""

    def __init__(self):
        self._pairs, self.device = [], None
        super().__init__(lambda: multi_pair_stats(self._pairs))

    def add(self, a, b=None) -> _Pair:
        """The sums of (a, b), on the device of the pairs added before (:attr:`device`)."""
        if self._compute is None:
            raise RuntimeError("PairSums: the sums are computed already")
        if self.device is None:
            self.device = a.device
        elif a.device != self.device:
            raise ValueError(f"PairSums holds pairs on {self.device}, got one on {a.device}")
        self._pairs.append((a, b))
        return _Pair(self, len(self._pairs) - 1)

    def compute(self):
        super().compute()
        self._pairs = []  # (the activations are not kept)


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


def _device(values):
    """The device of the values' tensors."""
    for v in values.values():
        parts = ((v.value,) if type(v) is _Max else (v.num, v.den, v.op) if type(v) is _Align
                 else (v.num, v.den, v.scale))
        for x in parts:
            for y in (x if type(x) is tuple else (x,)):
                if isinstance(y, Tensor):
                    return y.device
                if isinstance(y, _Col):
                    return y.table.sums.device
    return torch.device("cpu")


def _gather(items, device) -> Tensor:
    """Table entries (:class:`_Col`), device scalars and Python numbers -> one float64
    vector on ``device``: every table read once, the scalars stacked per dtype and device,
    the numbers in one tensor, laid end to end, then one gather (a few operations for the
    ~100 values of a measurement, not a few per value)."""
    slots = {}  # table id, (dtype, device) or "numbers" -> [slot number, table or list]
    refs = []  # per item: (slot number, position in it)
    for x in items:
        if type(x) is _Col:
            got = slots.get(id(x.table))
            if got is None:
                got = slots[id(x.table)] = [len(slots), x.table]
            refs.append((got[0], x.index))
        elif isinstance(x, Tensor):
            got = slots.get((x.dtype, x.device))
            if got is None:
                got = slots[(x.dtype, x.device)] = [len(slots), []]
            refs.append((got[0], len(got[1])))
            got[1].append(x if x.dim() == 0 else x.reshape(()))
        else:
            got = slots.get("numbers")
            if got is None:
                got = slots["numbers"] = [len(slots), []]
            refs.append((got[0], len(got[1])))
            got[1].append(float(x))
    parts = []
    for key, (_, held) in slots.items():  # (in slot order: dicts keep insertion order)
        if isinstance(held, Table):
            parts.append(held.sums.to(device, torch.float64))
        elif key == "numbers":
            parts.append(torch.tensor(held, dtype=torch.float64, device=device))
        else:
            parts.append(torch.stack(held).to(device, torch.float64))
    offsets, at = [], 0
    for part in parts:
        offsets.append(at)
        at += part.numel()
    idx = torch.tensor([offsets[slot] + i for slot, i in refs], device=device)
    return (torch.cat(parts) if len(parts) > 1 else parts[0])[idx]


def _alignment(num, den, op):
    """sqrt(num / den) / op clamped to [0, 1]; NaN for 0/0 and for a NaN in."""
    if math.isnan(num) or math.isnan(den) or math.isnan(op):
        return math.nan
    if num <= 0:
        return math.nan if (den <= 0 or op <= 0) else 0.0
    if den <= 0 or op <= 0:
        return 1.0  # (a bound of 0 under a change that is not: the estimate lags; clamped)
    return min(1.0, math.sqrt(num / den) / op)


def _reduce(values):
    # float64 throughout: a sum of squares of activations beyond ~1e19 does not fit in float32.
    # The tensors (and table entries) are gathered into one vector per reduction over the
    # ranks (sums: numerators and denominators; none: scales; maximum) and read in one
    # transfer; the ratios are then taken on the host. Under torch.distributed the Python
    # numbers (counts of rows) are summed over the ranks too, so they go to the device.
    dist = world_size() > 1
    summed, kept, maxed = [], [], []
    plan = []  # per value: (num, den, root, scale); each a float or (group, index); a maximum: den None

    def ref(x, to):
        if type(x) is tuple:  # entries added up when read
            return [ref(y, to) for y in x]
        if not dist and (type(x) is float or type(x) is int):
            return float(x)
        to.append(x)
        return to, len(to) - 1

    for v in values.values():
        if type(v) is _Max:
            plan.append((ref(v.value, maxed), None, False, None))
        elif type(v) is _Align:
            plan.append((ref(v.num, summed), ref(v.den, summed), "align", ref(v.op, kept)))
        else:
            plan.append((ref(v.num, summed), ref(v.den, summed), "strict" if v.strict else v.root,
                         None if v.scale is None else ref(v.scale, kept)))
    device = _device(values)
    got = {}
    for group in (summed, kept, maxed):
        if group:
            got[id(group)] = _gather(group, device)
    if dist:
        if summed:
            torch.distributed.all_reduce(got[id(summed)])
        if maxed:
            torch.distributed.all_reduce(got[id(maxed)], op=torch.distributed.ReduceOp.MAX)
    # one transfer: the groups laid end to end
    order = [id(g) for g in (summed, kept, maxed) if g]
    flat = torch.cat([got[i] for i in order]).tolist() if order else []
    host, at = {}, 0
    for i in order:
        host[i] = flat[at:at + got[i].numel()]
        at += got[i].numel()

    def read(r):
        if type(r) is list:
            return sum(read(x) for x in r) if r else 0.0
        return r if type(r) is float else host[id(r[0])][r[1]]

    tiny = torch.finfo(torch.float64).tiny
    out = {}
    for k, (num, den, root, scale) in zip(values, plan):
        if den is None:
            out[k] = read(num)
            continue
        if root == "align":
            out[k] = _alignment(read(num), read(den), read(scale))
            continue
        if root == "strict":  # sqrt(num / den) as IEEE divides
            n, d = read(num), read(den)
            out[k] = math.nan if (math.isnan(n) or math.isnan(d) or (n == 0 and d == 0)) else (
                math.inf if d == 0 else math.sqrt(max(n / d, 0.0)))
            continue
        val = read(num) / max(read(den), tiny)
        if root:
            val = math.sqrt(max(val, 0.0))  # (nan stays nan)
        if scale is not None:
            val *= read(scale)
        out[k] = val
    return out
