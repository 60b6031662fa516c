"""Fused linear + cross-entropy (or squared error on one-hot targets) that never
materialises the (rows, vocab) logits.

The rows are processed in chunks. For each chunk the logits are computed into one
reused (chunk, vocab) buffer, the fused kernel of :mod:`spkern.cross_entropy` turns them
into the loss, the statistics and, in place, their gradient, and that gradient goes at
once into the three gradients:

    logits_c = x_c W^T + b          dx_c = dlogits_c W
    dW      += dlogits_c^T x_c      db  += sum over rows of dlogits_c

So forward and backward cost the three matrix products of the unfused loss and no more,
and the extra memory is one chunk of logits. Under ``reduction="mean"`` or ``"sum"``
the gradients are computed in the forward pass (backward only scales them by the
incoming gradient, and not at all after ``loss.backward()`` on CPU). Under
``reduction="none"`` the incoming gradient differs per row and is only known in the
backward pass, which then runs the chunks again.
"""

import os
from typing import Optional

import torch
from torch import Tensor

from spkern import registry
from spkern.distributed import is_dtensor
from spkern.cross_entropy import (
    refuse_double_backward,
    CROSS_ENTROPY,
    _MSE_KINDS,
    _check_target_values,
    check_options,
    _reduce,
    _scalars,
    scale_grad,
    stats_from_rows,
)

# The chunk of logits is the only large buffer beyond inputs, weight and gradients. Its
# size is the smallest of: a byte budget (64 MB on CPU, where larger chunks stop making
# the matrix products faster: measured at (4096, 1024, 32768), 512 rows run the three
# products within 4% of unchunked ones, 256 rows within 14%; on GPU 1/16 of the free
# memory, between 256 MB and 2 GB), 1/11 of the rows (so that it stays under 5% of the
# logits and logit gradient that the unfused loss holds; not below 4 MB), and 1/64 of
# free host memory.
CPU_CHUNK_BYTES = 64 << 20
GPU_CHUNK_BYTES = (256 << 20, 2 << 30)  # (smallest, largest)
MAX_CHUNK_FRACTION = 11
SMALL_CHUNK_BYTES = 4 << 20


def auto_chunk_rows(rows, vocab, dtype, device):
    """Rows per chunk chosen from the shapes and the free memory of ``device``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(max(free // 16, GPU_CHUNK_BYTES[0]), GPU_CHUNK_BYTES[1])
    else:
        budget = min(CPU_CHUNK_BYTES, max(_available_host_memory() // 64, 1 << 20))
    row_bytes = max(vocab * itemsize, 1)
    small = max(1, SMALL_CHUNK_BYTES // row_bytes)  # below this size memory does not matter
    chunk = min(max(1, budget // row_bytes), max(-(-rows // MAX_CHUNK_FRACTION), small))
    if chunk >= 64:
        chunk -= chunk % 16  # matrix products prefer round row counts
    return int(max(1, min(chunk, rows)))


def _available_host_memory():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _chunked(x, weight, target, bias, class_weight, kind, ignore_index, label_smoothing, z_loss,
             softcap, reduction, compute_stats, need_dx, need_dw, need_db, chunk_size,
             row_scale=None, shard=None):
    """The chunk loop. Returns (loss rows, stats, scalars, dx, dW, db); the gradients are
    of the loss reduced as ``reduction``, or of sum(row_scale * loss rows) when given.

    ``shard`` = (process group, offset, vocabulary size): ``weight`` and ``bias`` hold the
    rows [offset, offset + V_local) of a vocabulary split over the group's ranks, ``x`` is
    whole on every rank. Each chunk's logits are then the rank's slice, the
    vocabulary-parallel loss (spkern.vocab_parallel) exchanges its per-row sums in one
    all-gather, dW and db are the rank's rows, and dx, summed over the ranks' slices, is
    all-reduced once at the end (in float32 for 16-bit inputs)."""
    N, D = x.shape
    V = weight.shape[0] if shard is None else shard[2]
    _check_target_values(target, V, ignore_index)
    if shard is None:
        kernel = registry.resolve("cross_entropy", x).fn
    else:
        from spkern.vocab_parallel import slice_loss

        group, offset = shard[:2]

        def kernel(lc, t, cw, scalars, kind, ignore_index, eps, z, cap, stats_on, grad_on, out):
            return slice_loss(lc, t, cw, kind, ignore_index, eps, z, cap, scalars, stats_on, grad_on, offset, V,
                              group, out)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scalars = _scalars(target, class_weight, ignore_index,
                       reduction if row_scale is None else "sum", V, acc, kind)
    need_grad = need_dx or need_dw or need_db
    loss = x.new_empty(N, dtype=acc)
    stats = x.new_empty((6 if compute_stats else 1, N), dtype=acc)
    # (a rank's partial dx, summed over ranks, in float32 at least)
    dx = (torch.empty_like(x) if shard is None or x.dtype == acc else x.new_empty(x.shape, dtype=acc)) \
        if need_dx else x.new_empty(0)
    Vl = weight.shape[0]  # (this rank's rows of the vocabulary)
    # dW accumulates over chunks in float32 at least
    dw = torch.zeros(Vl, D, device=x.device, dtype=weight.dtype if weight.dtype == acc else acc) \
        if need_dw else x.new_empty(0)
    db = torch.zeros(Vl, device=x.device, dtype=acc) if need_db else x.new_empty(0)
    chunk = chunk_size or auto_chunk_rows(N, Vl, x.dtype, x.device)
    logits = x.new_empty(min(chunk, N), Vl)
    wt = weight.t()
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        xc = x[start:stop]
        lc = logits[: stop - start]
        if bias is None:
            torch.mm(xc, wt, out=lc)
        else:
            torch.addmm(bias, xc, wt, out=lc)
        loss_c, stats_c, g = kernel(lc, target[start:stop], class_weight, scalars, kind, ignore_index,
                                    label_smoothing, z_loss, softcap, compute_stats, need_grad, lc)
        loss[start:stop] = loss_c
        stats[:, start:stop] = stats_c
        if not need_grad:
            continue
        if row_scale is not None:
            g.mul_(row_scale[start:stop, None].to(g.dtype))
        if need_dx:
            if dx.dtype == g.dtype:
                torch.mm(g, weight, out=dx[start:stop])
            else:  # (each rank's part rounded once to the input dtype, summed in float32)
                dx[start:stop] = torch.mm(g, weight)
        if need_dw:
            if dw.dtype == g.dtype:
                dw.addmm_(g.t(), xc)
            else:
                dw.addmm_(g.t().to(dw.dtype), xc.to(dw.dtype))
        if need_db:
            db += g.sum(0, dtype=acc)
    if need_dx and shard is not None and shard[0] is not None:
        torch.distributed.all_reduce(dx, group=shard[0])
        dx = dx.to(x.dtype)
    if need_dw and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    if need_db and bias is not None and db.dtype != bias.dtype:
        db = db.to(bias.dtype)
    return loss, stats, scalars, dx, dw, db


@torch.library.custom_op("spkern::linear_logit_loss", mutates_args=())
def _linear_logit_loss_op(
    input: Tensor,  # (N, D)
    weight: Tensor,  # (V, D)
    target: Tensor,  # (N,) int64
    bias: Optional[Tensor],  # (V,)
    class_weight: Optional[Tensor],  # (V,) float32
    kind: int,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    compute_stats: bool,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    chunk_size: int,  # 0 = automatic
    offset: int = 0,  # vocabulary-parallel (weight and bias: rows [offset, offset + V_local) of classes)
    classes: int = 0,  # 0 = not vocabulary-parallel
    group_name: str = "",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, stats, d input, d weight, d bias); gradients not asked for are empty."""
    loss, stats, scalars, dx, dw, db = _chunked(
        input, weight, target, bias, class_weight, kind, ignore_index, label_smoothing, z_loss,
        softcap, reduction, compute_stats, need_dx, need_dw, need_db, chunk_size,
        shard=_shard(offset, classes, group_name))
    return _reduce(loss, scalars, reduction), stats, dx, dw, db


def _shard(offset, classes, group_name):
    if not classes:
        return None
    from spkern.vocab_parallel import resolve_group
    return resolve_group(group_name), offset, classes


@_linear_logit_loss_op.register_fake
def _(input, weight, target, bias, class_weight, kind, ignore_index, label_smoothing, z_loss,
      softcap, reduction, compute_stats, need_dx, need_dw, need_db, chunk_size, offset=0, classes=0,
      group_name=""):
    N = input.shape[0]
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    loss = input.new_empty((N,) if reduction == "none" else (), dtype=acc)
    stats = input.new_empty((6 if compute_stats else 1, N), dtype=acc)
    return (loss, stats) + _fake_grads(input, weight, bias, need_dx, need_dw, need_db)


def _fake_grads(input, weight, bias, need_dx, need_dw, need_db):
    """Shapes and dtypes of (d input, d weight, d bias) as _chunked returns them."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    dx = torch.empty_like(input) if need_dx else input.new_empty(0)
    dw = torch.empty_like(weight) if need_dw else input.new_empty(0)
    db = input.new_empty(0) if not need_db else (torch.empty_like(bias) if bias is not None
                                                  else input.new_empty(weight.shape[0], dtype=acc))
    return dx, dw, db


@torch.library.custom_op("spkern::linear_logit_loss_backward", mutates_args=())
def _linear_logit_loss_backward_op(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor],
    class_weight: Optional[Tensor],
    kind: int,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    dloss: Tensor,  # (N,): the gradient of each row's loss (reduction="none")
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    chunk_size: int,
    offset: int = 0,
    classes: int = 0,
    group_name: str = "",
) -> tuple[Tensor, Tensor, Tensor]:
    _, _, _, dx, dw, db = _chunked(
        input, weight, target, bias, class_weight, kind, ignore_index, label_smoothing, z_loss,
        softcap, "none", False, need_dx, need_dw, need_db, chunk_size, row_scale=dloss,
        shard=_shard(offset, classes, group_name))
    return dx, dw, db


@_linear_logit_loss_backward_op.register_fake
def _(input, weight, target, bias, class_weight, kind, ignore_index, label_smoothing, z_loss,
      softcap, dloss, need_dx, need_dw, need_db, chunk_size, offset=0, classes=0, group_name=""):
    return _fake_grads(input, weight, bias, need_dx, need_dw, need_db)


_ARGS = ("input", "weight", "target", "bias", "class_weight", "kind", "ignore_index",
         "label_smoothing", "z_loss", "softcap", "reduction", "compute_stats", "need_dx",
         "need_dw", "need_db", "chunk_size", "offset", "classes", "group_name")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_ARGS, inputs))
    _, stats, dx, dw, db = output
    ctx.mark_non_differentiable(stats, dx, dw, db)
    ctx.set_materialize_grads(False)
    ctx.needs = (args["need_dx"], args["need_dw"], args["need_db"])
    ctx.reduction = args["reduction"]
    if ctx.reduction == "none":
        # the per-row gradient is known only in backward: keep what the chunks need
        ctx.save_for_backward(args["input"], args["weight"], args["target"], args["bias"],
                              args["class_weight"])
        ctx.config = tuple(args[k] for k in ("kind", "ignore_index", "label_smoothing", "z_loss",
                                             "softcap"))
        ctx.chunk_size = args["chunk_size"]
        ctx.shard = tuple(args.get(k, d) for k, d in (("offset", 0), ("classes", 0), ("group_name", "")))
    else:
        ctx.save_for_backward(dx, dw, db)


def _backward(ctx, dloss, *unused):
    refuse_double_backward("linear_cross_entropy / linear_mse_onehot_loss")
    none = (None,) * 19
    if dloss is None:
        return none
    need_dx, need_dw, need_db = ctx.needs
    if ctx.reduction == "none":
        x, w, t, b, cw = ctx.saved_tensors
        need_dx = need_dx or ctx.needs_input_grad[0]
        need_dw = need_dw or ctx.needs_input_grad[1]
        need_db = b is not None and (need_db or ctx.needs_input_grad[3])
        dx, dw, db = torch.ops.spkern.linear_logit_loss_backward(
            x, w, t, b, cw, *ctx.config, dloss, need_dx, need_dw, need_db, ctx.chunk_size, *ctx.shard)
    else:
        dx, dw, db = (scale_grad(g, dloss) if need else None
                      for g, need in zip(ctx.saved_tensors, ctx.needs))
    return (dx if need_dx else None, dw if need_dw else None, None,
            db if need_db else None) + none[4:]


_linear_logit_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _check_linear_args(input, weight, target, bias, chunk_size):
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor) or not isinstance(target, Tensor):
        raise TypeError("input, weight and target must be Tensors")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
    if input.dim() < 1:
        raise ValueError("input must have shape (N, D) or (B, T, D), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"weight must have shape (vocab, {input.shape[-1]}) for input of shape "
                         f"{tuple(input.shape)}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows (vocab size 0)")
    if weight.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
        raise TypeError(f"weight dtype {weight.dtype} does not match input dtype {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"weight is on device {weight.device} but input is on device {input.device}")
    if target.device != input.device:
        raise ValueError(f"target is on device {target.device} but input is on device {input.device}")
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold class indices (integer), got {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
            raise TypeError(f"bias dtype {bias.dtype} does not match input dtype {input.dtype}")
        if bias.device != input.device:
            raise ValueError(f"bias is on device {bias.device} but input is on device {input.device}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
                                       and chunk_size > 0):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def _linear_call(input, weight, target, bias, class_weight, kind, ignore_index, label_smoothing,
                 z_loss, softcap, reduction, return_stats, chunk_size):
    shard = (0, 0, "")
    if any(is_dtensor(t) for t in (input, weight, target, bias, class_weight)):
        input, weight, target, bias, class_weight, shard = _vocab_parallel_parts(
            input, weight, target, bias, class_weight)
    device = input.device.type
    if torch.is_autocast_enabled(device):
        # as F.linear under autocast: the product runs in the autocast dtype
        dtype = torch.get_autocast_dtype(device)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    x2 = input.reshape(-1, input.shape[-1]).contiguous()
    w2 = weight.contiguous()
    t2 = target.reshape(-1).long().contiguous()
    if class_weight is not None:
        class_weight = class_weight.to(torch.float64 if x2.dtype == torch.float64 else torch.float32).contiguous()
    grad_on = torch.is_grad_enabled()
    need_grad = reduction != "none"  # under "none" the gradients are computed in backward
    need_dx = need_grad and grad_on and input.requires_grad
    need_dw = need_grad and grad_on and weight.requires_grad
    need_db = need_grad and grad_on and bias is not None and bias.requires_grad
    loss, stats, *_ = torch.ops.spkern.linear_logit_loss(
        x2, w2, t2, bias, class_weight, kind, int(ignore_index), float(label_smoothing),
        float(z_loss), float(softcap or 0.0), reduction, bool(return_stats), need_dx, need_dw,
        need_db, int(chunk_size or 0), *shard)
    if not torch.is_autocast_enabled(device):
        loss = loss.to(input.dtype)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if not return_stats:
        return loss
    return loss, stats_from_rows(stats, target.shape)


def _vocab_parallel_parts(input, weight, target, bias, class_weight):
    """Local tensors of a vocabulary-parallel call (the head's weight a DTensor sharded
    over its rows, the vocabulary), and (offset, vocabulary size, group name)."""
    from spkern.distributed import placement_text
    from spkern.vocab_parallel import split_of, whole

    if not is_dtensor(weight):
        raise ValueError("weight is a plain tensor but another argument is a DTensor: for the vocabulary-parallel "
                         "loss pass the head's weight as a DTensor sharded over the vocabulary (Shard(0))")
    group, offset, V = split_of(weight, 0, "weight", "the vocabulary-parallel linear losses take the head's weight "
                                                     "sharded over the vocabulary, Shard(0)")
    if bias is not None and (not is_dtensor(bias) or bias.device_mesh != weight.device_mesh
                             or tuple(bias.placements) != tuple(weight.placements)):
        got = placement_text(bias) if is_dtensor(bias) else "a plain tensor"
        raise ValueError(f"bias must be sharded as weight {placement_text(weight)} (a ColwiseParallel head's bias "
                         f"is), got {got}")
    shard = (offset, V, group.group_name)
    return (whole(input, "input"), weight.to_local(), whole(target, "target"),
            bias.to_local() if bias is not None else None, whole(class_weight, "class_weight"), shard)


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    class_weight: Optional[Tensor] = None,
    return_stats: bool = False,
    chunk_size: Optional[int] = None,
):
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` without the logits.

    Args:
        input: ``(N, D)`` or ``(B, T, D)`` (any leading shape); float32, bfloat16, float16.
        weight: ``(V, D)``, the dtype of ``input``.
        target: class indices shaped like ``input`` without its last dimension.
        bias: ``(V,)`` or None.
        reduction, ignore_index, label_smoothing, z_loss, softcap: as in
            :func:`spkern.cross_entropy`; ``class_weight`` is its ``weight``.
        return_stats: also return the :class:`spkern.LogitStats` of the logits, shaped
            like ``target``, from the same pass.
        chunk_size: rows per chunk; None chooses it from the shapes and the free memory.

    Returns:
        The loss, or ``(loss, stats)``. Gradients flow to ``input``, ``weight`` and ``bias``.
    """
    _check_linear_args(input, weight, target, bias, chunk_size)
    check_options(class_weight, weight.shape[0], input.device, reduction, label_smoothing, z_loss,
                  softcap, weight_name="class_weight")
    return _linear_call(input, weight, target, bias, class_weight, CROSS_ENTROPY, ignore_index,
                        label_smoothing, z_loss, softcap, reduction, return_stats, chunk_size)


def linear_mse_onehot_loss(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    on: str = "logits",
    reduction: str = "mean",
    ignore_index: int = -100,
    return_stats: bool = False,
    chunk_size: Optional[int] = None,
):
    """:func:`spkern.mse_onehot_loss` of ``F.linear(input, weight, bias)`` without the
    logits; arguments as in :func:`linear_cross_entropy`."""
    if on not in _MSE_KINDS:
        raise ValueError(f"on must be one of {tuple(_MSE_KINDS)}, got {on!r}")
    _check_linear_args(input, weight, target, bias, chunk_size)
    check_options(None, weight.shape[0], input.device, reduction, 0.0, 0.0, None)
    return _linear_call(input, weight, target, bias, None, _MSE_KINDS[on], ignore_index, 0.0, 0.0,
                        None, reduction, return_stats, chunk_size)


__all__ = ["auto_chunk_rows", "linear_cross_entropy", "linear_mse_onehot_loss"]
