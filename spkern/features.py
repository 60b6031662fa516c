"""Statistics of activation pairs: how far each activation moved from its reference.

:func:`pair_stats` reads ``a`` (current activations, for example h_t) and ``b`` (their
reference, for example h_0 at initialisation) once and returns, in float64 on their
device with no host sync, the columns of :data:`PAIR_COLUMNS`:

    a_sq     ||a||^2
    b_sq     ||b||^2
    diff_sq  ||a - b||^2
    dot      <a, b>
    zeros    number of entries of a that are exactly 0 (dead ReLU units, for example)

per tensor and, with ``per_row=True``, per row (a row is one sample: all dimensions but
the last are flattened into rows). The kernels sum in float32; a row whose float32 sums
overflow (entries beyond about 1e18) or underflow (below about 1e-15) is summed again in
float64, so that ``||a||^2`` of float32 entries of 1e30 is 1e60, not inf. Backends: ``cpu`` (C++, csrc/cpu/pair_stats.cpp),
``triton`` (kernels/features.py), ``cuda`` (csrc/cuda/pair_stats.cu), ``reference``.
"""

from typing import Optional, Sequence

import torch
from torch import Tensor

from spkern import registry

from spkern.constants import PAIR_COLUMNS, Sum  # one definition of the columns


def pair_stats_reference(a: Tensor, b: Optional[Tensor]) -> Tensor:
    """Float64 reference of the (rows, 5) per-row statistics."""
    x = a.double()
    y = b.double() if b is not None else torch.zeros_like(x)
    cols = {Sum.A_SQ: x.square().sum(1), Sum.B_SQ: y.square().sum(1), Sum.DIFF_SQ: (x - y).square().sum(1),
            Sum.DOT: (x * y).sum(1), Sum.ZEROS: (x == 0).sum(1).double()}
    return torch.stack([cols[c] for c in Sum], 1)


@torch.library.custom_op("spkern::pair_stats", mutates_args=())
def _pair_stats_op(a: Tensor, b: Optional[Tensor]) -> Tensor:
    return _pair_stats_kernel(a, b)


def _pair_stats_kernel(a: Tensor, b: Optional[Tensor]) -> Tensor:
    return registry.resolve("pair_stats", a).fn(a, b)


@_pair_stats_op.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], 5), dtype=torch.float64)


def _rows(t: Tensor) -> Tensor:
    t = t.detach()
    if t.dim() != 2:
        t = t.reshape(1, 1) if t.dim() == 0 else t.reshape(-1, t.shape[-1])
    return t if t.is_contiguous() else t.contiguous()


def pair_stats(a: Tensor, b: Optional[Tensor] = None, *, per_row: bool = False):
    """Statistics of ``a`` against ``b`` (``b`` None: against 0) in one pass: a float64
    ``(5,)`` tensor of the :data:`PAIR_COLUMNS` sums over all entries, and with
    ``per_row=True`` also the ``(rows, 5)`` per-row sums: ``(total, per_row)``.

    ``a`` and ``b`` have the same shape, dtype (float32, bfloat16 or float16; other
    dtypes take the reference path) and device. Sums accumulate in float32 within a row
    (float64 for a row where float32 would overflow or underflow) and float64 across
    rows. Nothing is read back to the host.
    """
    _check_pair(a, b)
    a2, b2 = _rows(a), (_rows(b) if b is not None else None)
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(a2):
        rows = _pair_stats_op(a2, b2)
    else:  # eager: the kernel itself, without the custom op's dispatch (a tenth of a ms a call)
        rows = _pair_stats_kernel(a2, b2)
    total = rows.sum(0)
    return (total, rows) if per_row else total


def _check_pair(a, b, what=""):
    if not isinstance(a, Tensor) or not a.is_floating_point():
        raise TypeError(f"{what}a must be a floating-point Tensor, got "
                        f"{type(a).__name__ if not isinstance(a, Tensor) else a.dtype}")
    if b is not None:
        if not isinstance(b, Tensor):
            raise TypeError(f"{what}b must be None or a Tensor, got {type(b).__name__}")
        if b.shape != a.shape:
            raise ValueError(f"{what}b has shape {tuple(b.shape)} but a has shape {tuple(a.shape)}")
        if b.dtype != a.dtype:
            raise ValueError(f"{what}b has dtype {b.dtype} but a has dtype {a.dtype}")
        if b.device != a.device:
            raise ValueError(f"{what}b is on device {b.device} but a is on device {a.device}")


def pair_by_pair(pair_kernel):
    """A ``multi_pair_stats`` kernel from a backend's ``pair_stats`` kernel: one call per
    pair (backends without a fused one)."""
    def fn(a, b):
        return torch.stack([pair_kernel(x, y).sum(0) for x, y in zip(a, b)])
    return fn


def each_pair(check):
    """A backend's check of a ``multi_pair_stats`` call: ``check`` of each pair's ``a``."""
    def fn(tensor, pairs=()):
        return check(tensor) or next((f"pair {i}: {why}" for i, (a, _) in enumerate(pairs)
                                      if (why := check(a)) is not None), None)
    return fn


def multi_pair_stats(pairs: Sequence[tuple]) -> Tensor:
    """:func:`pair_stats` of many pairs in one call: ``pairs`` is a sequence of ``(a, b)``
    (``b`` None: against 0), each pair of its own shape and dtype, all on one device; the
    result is a float64 ``(len(pairs), 5)`` tensor whose row ``i`` is
    ``pair_stats(*pairs[i])``. On CPU one kernel sums the rows of every pair in one
    parallel loop (the tracker's statistics of a whole measurement: one call, not one per
    activation); the other backends make one call of their ``pair_stats`` kernel per pair."""
    pairs = [(p[0], p[1] if len(p) > 1 else None) if isinstance(p, (tuple, list)) else (p, None) for p in pairs]
    if not pairs:
        raise ValueError("pairs must hold at least one (a, b) pair")
    device = None
    for i, (a, b) in enumerate(pairs):
        _check_pair(a, b, f"pairs[{i}]: ")
        if device is None:
            device = a.device
        elif a.device != device:
            raise ValueError(f"pairs[{i}] is on device {a.device} but pairs[0] is on device {device}")
    rows = [(_rows(a), _rows(b) if b is not None else None) for a, b in pairs]
    if torch.compiler.is_compiling() or any(torch._C._functorch.is_functorch_wrapped_tensor(a) for a, _ in rows):
        return torch.stack([pair_stats(a, b) for a, b in rows])  # (pair_stats' custom op)
    return registry.resolve("multi_pair_stats", rows[0][0], rows).fn([a for a, _ in rows], [b for _, b in rows])


__all__ = ["PAIR_COLUMNS", "multi_pair_stats", "pair_stats", "pair_stats_reference"]


def paired_linear(x: Tensor, weight: Tensor, weight0: Optional[Tensor] = None):
    """``(x W^T, x W0^T)`` in float32, for the refined coordinate check of a Linear layer
    (bias-free): their difference is the effective update ``(W - W0) x`` and
    ``x W0^T`` minus its value at initialisation the propagating update. With
    ``weight0`` None, ``x W^T`` alone, computed as the first of a pair (bitwise the same).

    ``x`` is ``(..., in_features)``; ``weight`` and ``weight0`` are ``(out_features,
    in_features)`` (``weight0`` may be kept in another float dtype). The products are
    float32 products of float32 values (an x or W of another dtype is converted, exactly
    for bfloat16 and float16), equal for every backend up to the order of the sums: the
    Triton backend (CUDA) reads each tile of ``x`` once and multiplies it with both
    weights in the same order, in full float32 precision (no TF32), so that the
    difference of the two products is accurate; on CPU it is two products of the same
    shape, which the BLAS library rounds alike.
    """
    for name, t in (("x", x), ("weight", weight), ("weight0", weight0)):
        if (t is not None or name != "weight0") and (not isinstance(t, Tensor) or not t.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point Tensor")
    if weight.dim() != 2 or (weight0 is not None and weight0.shape != weight.shape):
        raise ValueError(f"weight and weight0 must be (out, in) of one shape, got {tuple(weight.shape)} and "
                         f"{tuple(weight0.shape) if weight0 is not None else None}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight takes {weight.shape[1]}")
    if not (x.device == weight.device and (weight0 is None or weight0.device == x.device)):
        raise ValueError("x, weight and weight0 must be on one device")
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, x.shape[-1])
    weight = weight.detach()
    if x2.dtype != weight.dtype or x2.dtype == torch.float64:  # (float32 products of the exact values)
        x2, weight = x2.float(), weight.float()
    w0 = weight0.detach() if weight0 is not None else None
    y, z = registry.resolve("paired_linear", x2).fn(x2, weight, w0)
    y = y.reshape(*lead, -1)
    return y if weight0 is None else (y, z.reshape(*lead, -1))


__all__ += ["paired_linear"]
