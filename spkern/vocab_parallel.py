"""Vocabulary-parallel logit losses: cross-entropy and squared error on one-hot targets
of logits whose classes are split over the ranks of a tensor-parallel group (a DTensor
sharded on its class dimension, as the output of a ``ColwiseParallel`` head, or the input
of torch's ``loss_parallel()``), with the statistics of :func:`spkern.cross_entropy`.

No rank ever holds a whole row of logits. Each rank runs the fused kernels on its slice
of the classes, in two passes:

1. the fused loss kernel (statistics on) gives, per row of the slice, its log-sum-exp,
   norm, maximum, largest probability and entropy and whether its argmax is the target;
   a few per-row sums the loss needs are read beside it (the target's logit, where the
   slice holds it; with label smoothing the weighted sum of the logits; for probability
   targets their weighted sums; for MSE on probabilities the sum of squared
   probabilities). These ``k`` numbers per row (7 to 11, :func:`partials_per_row`) are
   exchanged in **one all-gather** over the tensor-parallel group: ``k * rows`` floats
   sent by each rank, ``group size * k * rows`` received;
2. every rank combines them, identically, into the row's log-sum-exp over all classes,
   its loss and statistics (the ones of one process holding every class), and the
   gradient kernel (``logit_grad``) writes d(loss)/d(logits) of its slice.

The loss comes back as a plain tensor, equal on every rank of the group; the gradient
flows back to the sharded logits. Everything the unsharded losses take works: class
weights, ``ignore_index``, every reduction, label smoothing, z-loss, softcap, probability
targets (sharded like the logits, or whole on every rank).
"""

import math
from typing import Optional

import torch
from torch import Tensor

from spkern import registry
from spkern.cross_entropy import (CROSS_ENTROPY, MSE_LOGITS, MSE_PROBS, _check_target_values, _reduce,
                                  _scalars, backward_of, fake_outputs, setup_context)
from spkern.distributed import check_summable, is_dtensor, placement_text, sharded


def partials_per_row(kind: int, prob: bool, label_smoothing: float) -> int:
    """How many float numbers per row each rank sends in the loss's one all-gather."""
    if prob:
        return 11  # 7 + tw, twx, the target at the argmax, the target's max
    return 7 + (kind == CROSS_ENTROPY and label_smoothing > 0) + (kind == MSE_PROBS)


# ---------------------------------------------------------------------------------------
# Placement: which mesh dimension splits the classes, and this rank's slice.
# ---------------------------------------------------------------------------------------


def split_of(t, dim: int, what: str, takes: str):
    """(process group, offset of this rank's first index, size) of DTensor ``t`` sharded on
    tensor dimension ``dim`` over one mesh dimension and replicated over the others; a
    ValueError naming ``what``, its placement and what the call ``takes`` otherwise."""
    check_summable(t, what)
    mesh = t.device_mesh
    split = None
    for i, p in enumerate(t.placements):
        if sharded(p):
            if p.dim % t.dim() != dim or split is not None or not p.is_shard():
                raise ValueError(f"{what} has placement {placement_text(t)} over mesh {tuple(mesh.shape)}: {takes}, "
                                 f"over one mesh dimension and replicated over the others")
            split = i
    if split is None:
        raise ValueError(f"{what} is a DTensor replicated on every mesh dimension {placement_text(t)}: {takes} "
                         f"(for the ordinary loss pass {what}.to_local())")
    size = t.shape[dim]
    n = mesh.size(split)
    coordinate = mesh.get_local_rank(split)
    per = -(-size // n)  # torch.chunk's split, as DTensor's Shard
    offset = min(coordinate * per, size)
    if min(size, offset + per) <= offset:
        raise ValueError(f"{what} has {size} classes over {n} ranks ({placement_text(t)}): rank {coordinate} of "
                         f"mesh dimension {split} holds none; use fewer ranks than classes")
    return mesh.get_group(split), offset, size


def class_shard(input, what: str = "input"):
    """(process group, offset of this rank's first class, number of classes) of logits
    ``input`` sharded on their class dimension (1, or 0 for a single row of logits)."""
    class_dim = 1 if input.dim() > 1 else 0
    return split_of(input, class_dim, what, f"the vocabulary-parallel losses take logits sharded on their class "
                                            f"dimension ({class_dim}; Shard(-1) for 2-D logits)")


def local_target(target, input, offset, C, what="target"):
    """The rank's part of ``target``: class indices whole (a plain tensor, or a DTensor
    replicated on every mesh dimension); probabilities sharded as ``input`` or whole (the
    rank's slice is taken)."""
    if is_dtensor(target):
        if target.is_floating_point() and tuple(target.placements) == tuple(input.placements):
            return target.to_local()
        if any(not p.is_replicate() for p in target.placements):
            raise ValueError(f"{what} has placement {placement_text(target)}: vocabulary-parallel losses take class "
                             f"indices replicated (or a plain tensor) and probabilities placed as the logits "
                             f"{placement_text(input)} or replicated")
        target = target.to_local()
    if target.is_floating_point():
        class_dim = 1 if target.dim() > 1 else 0
        return target.narrow(class_dim, offset, input.to_local().shape[class_dim])
    return target


def whole(t, what: str):
    """A tensor every rank holds whole: plain, or a DTensor replicated everywhere."""
    if t is None or not is_dtensor(t):
        return t
    if any(not p.is_replicate() for p in t.placements):
        raise ValueError(f"{what} has placement {placement_text(t)}: vocabulary-parallel losses take it whole "
                         f"on every rank (a plain tensor or a replicated DTensor)")
    return t.to_local()


# ---------------------------------------------------------------------------------------
# The op: a rank's (M, C_local) slice in; the reduced loss, the whole rows' statistics and
# the slice's gradient out.
# ---------------------------------------------------------------------------------------


def _softcapped(x, cap):
    return cap * torch.tanh(x / cap) if cap else x


def _all_gather(parts, group):
    """(R, k, M): every rank's (k, M) partial sums, in the group's rank order (the order
    of the class slices)."""
    if group is None:
        return parts[None]
    n = torch.distributed.get_world_size(group)
    out = [torch.empty_like(parts) for _ in range(n)]
    torch.distributed.all_gather(out, parts.contiguous(), group=group)
    return torch.stack(out)


def slice_loss(input, target, weight, kind, ignore_index, eps, z, cap, scalars, compute_stats, compute_grad,
               offset, C, group, grad_out=None):
    """The two passes on a rank's (M, C_local) slice of the classes [offset, offset +
    C_local) of C; ``scalars`` = [gradient scale, sum of class weights] of the whole loss
    (spkern.cross_entropy._scalars). Returns (loss of each row, the rows' statistics, the
    slice's gradient, written into ``grad_out`` when given: it may be ``input``)."""
    M, Cl = input.shape
    eps, z, cap = float(eps), float(z), float(cap)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    prob = target.is_floating_point()
    dev = input.device

    # ---- pass 1: the fused kernel's statistics of this slice, and the sums beside it ----
    if prob:
        valid = torch.ones(M, dtype=torch.bool, device=dev)
        y_local = torch.full((M,), -1, dtype=torch.int64, device=dev)
    else:
        valid = target != ignore_index
        here = valid & (target >= offset) & (target < offset + Cl)
        y_local = torch.where(here, target - offset, -1)
    kernel = registry.resolve("cross_entropy", input)
    ones = torch.tensor([1.0, float(Cl)], dtype=acc, device=dev)
    _, st, _ = kernel.fn(input, y_local, None, ones, CROSS_ENTROPY, -1, 0.0, 0.0, cap, True, False, None)
    parts = [r.to(acc) for r in st]  # lse, norm, max, max_prob, entropy, correct of the slice
    if prob:
        parts.append(torch.zeros(M, dtype=acc, device=dev))
        xc = _softcapped(input.to(acc), cap)
        t = target.to(acc) * (1 - eps) + eps / C
        tw = t * weight[offset:offset + Cl] if weight is not None else t
        arg = input.argmax(1, keepdim=True)
        parts += [tw.sum(1), (tw * xc).sum(1), target.gather(1, arg)[:, 0].to(acc), target.max(1).values.to(acc)]
    else:
        x_y = input.gather(1, y_local.clamp(min=0)[:, None])[:, 0].to(acc)
        if kind == CROSS_ENTROPY:
            x_y = _softcapped(x_y, cap)
        parts.append(torch.where(y_local >= 0, x_y, 0.0))
        if kind == CROSS_ENTROPY and eps > 0:
            xc = _softcapped(input.to(acc), cap)
            parts.append(xc @ weight[offset:offset + Cl] if weight is not None else xc.sum(1))
        if kind == MSE_PROBS:
            parts.append(torch.exp(2 * (_softcapped(input.to(acc), cap) - parts[0][:, None])).sum(1))
    every = _all_gather(torch.stack(parts), group).double()  # (ranks, k, M)

    # ---- every rank: the whole rows' log-sum-exp, loss and statistics ----
    lse_r, norm_r, max_r, mp_r, h_r, correct_r, xy_r = every.unbind(1)[:7]
    top = lse_r.max(0).values
    top = torch.where(torch.isfinite(top), top, 0.0)
    lse = top + torch.log(torch.exp(lse_r - top).sum(0))
    share = torch.exp(lse_r - lse)  # the slice's share of the row's softmax
    x_y = xy_r.sum(0)
    scale = scalars[0].double()
    w_sum = scalars[1].double()
    if prob:
        tw, twx = every[:, 7].sum(0), every[:, 8].sum(0)
        loss = tw * lse - twx + z * lse**2
    else:
        in_range = (target >= 0) & (target < C)
        y_safe = torch.where(valid & in_range, target, 0)
        w_y = weight.double()[y_safe] if weight is not None else torch.ones_like(lse)
        if kind == CROSS_ENTROPY:
            loss = (1 - eps) * w_y * (lse - x_y) + z * lse**2
            if eps > 0:
                loss = loss + eps / C * (w_sum * lse - every[:, 7].sum(0))
        elif kind == MSE_LOGITS:
            loss = (norm_r**2).sum(0) - 2 * x_y + 1
        else:
            p_sq = (every[:, 7] * share**2).sum(0)
            p_y = torch.exp(x_y - lse)
            loss = p_sq - 2 * p_y + 1
        loss = torch.where(valid, torch.where(in_range, loss, math.nan), 0.0)
    loss = loss.to(acc)

    if compute_stats:
        raw_max = max_r.max(0).values
        first = (max_r == raw_max).int().argmax(0, keepdim=True)  # the first slice holding the argmax
        if prob:
            correct = every[:, 9].gather(0, first)[0] == every[:, 10].max(0).values
        else:
            correct = correct_r.gather(0, first)[0] > 0.5
        held = share > 0  # (a slice with no share adds nothing, even if its sums are not finite)
        stats = torch.stack([
            lse,
            (norm_r**2).sum(0).sqrt(),
            raw_max,
            (share * mp_r).max(0).values,
            lse - torch.where(held, share * (lse_r - h_r), 0.0).sum(0),
            correct.double(),
        ]).to(acc)
    else:
        stats = lse[None].to(acc)

    if not compute_grad:
        return loss, stats, input.new_empty(0)
    # ---- pass 2: the gradient of this slice ----
    if prob:
        # (the smoothed target (1 - eps) t + eps / C as b t + b_y: t read at its own precision)
        a, b, b_y = (tw + 2 * z * lse) * scale, ((1 - eps) * scale).expand(M), (eps / C * scale).expand(M)
        target2 = target
    else:
        if kind == CROSS_ENTROPY:
            a = ((1 - eps) * w_y + (eps / C * w_sum if eps > 0 else 0.0) + 2 * z * lse) * scale
            b = (eps / C * scale if eps > 0 else 0 * scale).expand(M)
            b_y = (1 - eps) * w_y * scale
        elif kind == MSE_LOGITS:
            a, b, b_y = (2 * scale).expand(M), torch.zeros_like(lse), (2 * scale).expand(M)
        else:
            a, b, b_y = p_sq - p_y, (2 * scale).expand(M), 2 * scale * p_y
        a = torch.where(in_range | ~valid, a, math.nan)
        # the target column where this slice holds it; -2 (no column) where another does
        target2 = torch.where(valid, torch.where(y_local >= 0, y_local, -2), -1)
    rows = torch.stack([lse, a, b, b_y], 1).to(acc).contiguous()
    w_local = weight[offset:offset + Cl].contiguous() if weight is not None else None
    grad_kernel = registry.resolve("logit_grad", input)
    grad = grad_kernel.fn(input, target2, w_local, rows, kind, -1, cap, grad_out)
    return loss, stats, grad


def resolve_group(group_name):
    """The process group of ``group_name`` ("" = none)."""
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group_name)


@torch.library.custom_op("spkern::logit_loss_vocab_parallel", mutates_args=())
def _vocab_parallel_op(
    input: Tensor,  # (M, C_local): this rank's classes [offset, offset + C_local)
    target: Tensor,  # (M,) int64 global class indices, or (M, C_local) probabilities
    weight: Optional[Tensor],  # (C,) float32, every class, or None
    kind: int,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    compute_stats: bool,
    compute_grad: bool,
    offset: int,
    classes: int,
    group_name: str,  # "" = no group (one rank holds every class: the tests' reference)
) -> tuple[Tensor, Tensor, Tensor]:
    """As spkern::logit_loss, on a slice of the classes: (reduced loss, statistics of the
    whole rows, gradient of the slice)."""
    if not target.is_floating_point():
        _check_target_values(target, classes, ignore_index)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    scalars = _scalars(target, weight, ignore_index, reduction, classes, acc, kind)
    loss, stats, grad = slice_loss(input, target, weight, kind, ignore_index, label_smoothing, z_loss, softcap,
                                   scalars, compute_stats, compute_grad, offset, classes,
                                   resolve_group(group_name))
    return _reduce(loss, scalars, reduction), stats, grad


@_vocab_parallel_op.register_fake
def _(input, target, weight, kind, ignore_index, label_smoothing, z_loss, softcap, reduction, compute_stats,
      compute_grad, offset, classes, group_name):
    return fake_outputs(input, reduction, compute_stats, compute_grad)


_vocab_parallel_op.register_autograd(
    backward_of("vocabulary-parallel cross_entropy / mse_onehot_loss", 14), setup_context=setup_context)


def run(x2, t2, weight, kind, ignore_index, label_smoothing, z_loss, softcap, reduction, return_stats,
        shard):
    """The op on a rank's rows x classes slice ``x2``; ``shard`` = (group or None, offset,
    number of classes)."""
    group, offset, classes = shard
    compute_grad = x2.requires_grad and torch.is_grad_enabled()
    return torch.ops.spkern.logit_loss_vocab_parallel(
        x2, t2, weight, kind, int(ignore_index), float(label_smoothing), float(z_loss), float(softcap or 0.0),
        reduction, bool(return_stats), compute_grad, int(offset), int(classes),
        group.group_name if group is not None else "")


__all__ = ["class_shard", "local_target", "partials_per_row", "slice_loss", "split_of", "whole"]
