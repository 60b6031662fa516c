"""Sharded tensors (``torch.distributed.tensor.DTensor``, as FSDP2's ``fully_shard`` makes
parameters): their local shards, and whole-tensor sums from the shards' partial sums.

spkern's kernels run on each rank's local shard. A sum over a tensor (of squares, of
products) is the sum over its shards: the local partial sums of many tensors are packed
into one tensor and added over the ranks that hold different shards (the mesh dimensions
on which a tensor is ``Shard``-ed) in one all-reduce; on a ``Replicate``-d dimension every
rank holds the same values, which are counted once. ``Partial`` placements (values still to
be summed) are refused: redistribute them first.
"""

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed
    DTensor = None


def rank_and_world() -> tuple:
    """(this process's rank, the number of processes) of the torch.distributed job, or
    (0, 1) outside one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's local shard of a DTensor (a view: writes to it are writes to the DTensor);
    any other tensor as it is."""
    return t._local_tensor if is_dtensor(t) else t


def sharded(p) -> bool:
    """Whether placement ``p`` splits a tensor dimension over a mesh dimension: ``Shard``,
    and ``_StridedShard`` (FSDP2's sharding of a dimension tensor parallelism shards too),
    which is not a ``Shard`` to ``is_shard()``."""
    return not (p.is_replicate() or p.is_partial())


def lead(t, also=()) -> bool:
    """Whether this rank is the first (coordinate 0) of the ranks holding DTensor ``t``'s
    replicas: on every mesh dimension that replicates it, and on those in ``also``."""
    return all(t.device_mesh.get_local_rank(i) == 0 for i, p in enumerate(t.placements)
               if p.is_replicate() or i in also)


def placement_text(t) -> str:
    return "(" + ", ".join(str(p) for p in t.placements) + ")"


def check_summable(t, what: str):
    """Sums over a DTensor's shards add up whatever dimensions the mesh dimensions shard
    (rows, columns, both: FSDP2 x tensor parallelism); only ``Partial`` is refused."""
    if is_dtensor(t):
        for p in t.placements:
            if p.is_partial():
                raise ValueError(f"{what} has placement {placement_text(t)} on its mesh: spkern cannot use a "
                                 f"Partial placement (values still to be summed over ranks); redistribute it to "
                                 f"Shard or Replicate first")


class MatrixSplit(NamedTuple):
    """How a matrix (a tensor viewed as ``(shape[0], -1)``) is split over the ranks: the
    groups over which its rows differ (any number of mesh dimensions sharding dimension 0),
    the group over which its columns differ (one mesh dimension sharding dimension 1, or
    None), and the rank's columns [col_start, col_start + cols) of the flattened view."""

    row_groups: list
    col_group: Optional[object]
    col_start: int
    cols: int


def matrix_split(t, what: str) -> MatrixSplit:
    """The :class:`MatrixSplit` of a DTensor or plain tensor ``t``; a ValueError naming
    ``what`` for a ``Partial`` placement, a sharding of a dimension other than 0 and 1, or
    dimension 1 sharded over two mesh dimensions."""
    local_rows = local(t).shape[0] if t.dim() else 1
    cols = local(t).numel() // local_rows if local_rows else (t.numel() // max(t.shape[0], 1) if t.dim() else 1)
    if not is_dtensor(t):
        return MatrixSplit([], None, 0, cols)
    check_summable(t, what)
    rows, col_group, col_start = [], None, 0
    for i, p in enumerate(t.placements):
        if not sharded(p):
            continue
        d = p.dim % t.dim()
        if d == 0:
            rows.append(t.device_mesh.get_group(i))
        elif d == 1 and col_group is None and type(p).__name__ == "Shard":
            n, k = t.device_mesh.size(i), t.device_mesh.get_local_rank(i)
            per = -(-t.shape[1] // n)  # torch.chunk's split, as DTensor's Shard
            inner = t.numel() // max(t.shape[0] * t.shape[1], 1)  # (the flattened columns of one dim-1 index)
            col_group, col_start = t.device_mesh.get_group(i), min(k * per, t.shape[1]) * inner
        else:
            raise ValueError(f"{what} has placement {placement_text(t)}: spkern's operator norms take a matrix "
                             f"sharded by rows (dimension 0, on any number of mesh dimensions) and by columns "
                             f"(dimension 1, on one mesh dimension), as FSDP2 and tensor parallelism shard them")
    return MatrixSplit(rows, col_group, col_start, cols)


def sharded_gram(split: MatrixSplit, fan_in: int, forward, backward, local_gram=None):
    """x -> A^T A x of a matrix split as ``split`` over the ranks, x whole (fan_in,) on every
    rank, from the rank's block's products ``forward(x of its columns) -> y`` (its rows) and
    ``backward(y) -> z`` (its columns), or ``local_gram(x)`` = both in one pass when the
    columns are whole. The products are summed over the ranks holding the row's other
    columns (y) and the column's other rows (z): one all-reduce of a vector per iteration,
    two when the columns are split (of the rows' vector, and of z laid in place in a
    fan_in vector); the matrix is never gathered."""
    dist = torch.distributed

    def gram(x):
        if split.col_group is None and local_gram is not None:
            z = local_gram(x)
        else:
            xj = x[split.col_start:split.col_start + split.cols] if split.col_group is not None else x
            y = forward(xj)
            if split.col_group is not None:
                dist.all_reduce(y, group=split.col_group)
            z = backward(y)
        for g in split.row_groups:
            dist.all_reduce(z, group=g)
        if split.col_group is not None:
            whole = torch.zeros(fan_in, dtype=z.dtype, device=z.device)
            whole[split.col_start:split.col_start + split.cols] = z
            dist.all_reduce(whole, group=split.col_group)
            z = whole
        return z
    return gram


class Split(NamedTuple):
    """How an activation's rows are split over ``group`` (tensor parallelism: each rank holds
    some of every row's features): its sums count on every rank, but a row's norm needs the
    row's sums added over the group first, and then counts where ``lead``."""
    group: object
    lead: bool


def local_count(t) -> tuple:
    """(this rank's tensor, whether its sums count here) of an activation the tracker
    measures: a DTensor's local tensor counts on every rank where a mesh dimension shards
    it and on one rank per replica (coordinate 0 of each mesh dimension replicating it),
    so that sums added over all the ranks count every entry once; sharded on its last
    dimension (features), the count is a :class:`Split`; a ``Partial`` one is summed over
    its ranks first. A plain tensor counts everywhere."""
    if not is_dtensor(t):
        return waited(t), True
    from torch.distributed.tensor import Replicate

    if any(p.is_partial() for p in t.placements):
        t = t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])
    mesh = t.device_mesh
    first = lead(t)
    features = [i for i, p in enumerate(t.placements) if sharded(p) and p.dim % t.dim() == t.dim() - 1]
    if features and first:
        return local_of(t), Split(mesh.get_group(features[0]), mesh.get_local_rank(features[0]) == 0)
    return local_of(t), first


def local_of(t):
    """A DTensor's local tensor, its collective finished."""
    return waited(t.to_local())


def waited(t):
    """``t`` with the collective that makes it finished: a redistributed DTensor's local
    tensor (what tensor parallelism's layers return) may be one still in flight, torch's
    AsyncCollectiveTensor, which a kernel cannot read."""
    wait = getattr(t, "wait", None) if type(t) is not Tensor else None
    return wait() if callable(wait) else t


def check_like(t, ref, what: str, ref_what: str):
    """``t`` placed as ``ref``: both DTensors on the same mesh with the same placements,
    or both plain tensors."""
    if is_dtensor(ref) != is_dtensor(t):
        raise ValueError(f"{what} must be {'a DTensor placed' if is_dtensor(ref) else 'a plain tensor'} as "
                         f"{ref_what}{' ' + placement_text(ref) if is_dtensor(ref) else ''}, got "
                         f"{'a DTensor ' + placement_text(t) if is_dtensor(t) else 'a plain tensor'}")
    if is_dtensor(ref) and (t.device_mesh != ref.device_mesh or tuple(t.placements) != tuple(ref.placements)):
        raise ValueError(f"{what} has placement {placement_text(t)} on {t.device_mesh} but {ref_what} has "
                         f"{placement_text(ref)} on {ref.device_mesh}: they must be sharded alike")


def _shard_groups(t):
    """The process groups over which the shards of DTensor ``t`` differ (its Shard-ed
    mesh dimensions)."""
    return [t.device_mesh.get_group(i) for i, p in enumerate(t.placements) if sharded(p)]


def sum_over_shards(sums: Tensor, tensors: Sequence) -> Tensor:
    """Rows of local partial sums (``sums[i]`` of ``tensors[i]``) -> whole-tensor sums: each
    row of a sharded DTensor added over the ranks that hold its other shards, all rows
    sharded alike in one all-reduce (per mesh dimension). Rows of plain tensors and of
    replicated DTensors are left as they are. In place; returns ``sums``."""
    keys = {}
    for i, t in enumerate(tensors):
        groups = _shard_groups(t) if is_dtensor(t) else []
        if groups:
            keys.setdefault(tuple(id(g) for g in groups), (groups, []))[1].append(i)
    for groups, rows in keys.values():
        whole = len(rows) == sums.shape[0] and sums.is_contiguous()
        part = sums if whole else sums[rows]
        for g in groups:
            torch.distributed.all_reduce(part, group=g)
        if not whole:
            sums[rows] = part
    return sums


__all__ = ["MatrixSplit", "Split", "check_like", "check_summable", "is_dtensor", "lead", "local", "local_count",
           "local_of", "matrix_split", "sharded", "sharded_gram", "sum_over_shards", "waited"]
