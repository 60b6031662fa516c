"""Cross-entropy (and squared error on one-hot targets) with per-row logit statistics,
fused forward and backward.

``spkern.cross_entropy`` is a drop-in for ``torch.nn.functional.cross_entropy``: the
same arguments give the same loss and the same gradient. It adds

* ``z_loss``: ``z_loss * lse**2`` is added to the loss of every non-ignored row
  (PaLM). Under ``reduction="mean"`` it is divided by the same denominator as the
  cross-entropy (the number of non-ignored rows, or the sum of their class weights).
* ``softcap``: the logits become ``softcap * tanh(logits / softcap)`` before the loss
  (Gemma), and the gradient goes through the tanh.
* ``return_stats=True``: also returns a :class:`LogitStats` of per-row statistics,
  computed in the same pass over the logits.

Per row, with raw logits x, softcapped logits x' (x' = x without softcap), class
weights w (all ones without ``weight``), W = sum_c w_c, label smoothing eps, C classes:

    lse      = log sum_c exp(x'_c)                     p_c = exp(x'_c - lse)
    loss     = (1 - eps) w_y (lse - x'_y) + eps / C * sum_c w_c (lse - x'_c) + z lse^2
               (class indices y; 0 for rows whose target is ignore_index)
    loss     = sum_c t'_c w_c (lse - x'_c) + z lse^2,   t' = (1 - eps) t + eps / C
               (class probabilities t)
    d loss / d x'_c = p_c * A - B_c, with
               A = (1 - eps) w_y + eps / C * W + 2 z lse,  B_c = eps / C * w_c + (1 - eps) w_y [c = y]
               A = sum_k t'_k w_k + 2 z lse,               B_c = t'_c w_c
    d x'_c / d x_c = 1 - (x'_c / softcap)^2

Statistics (float32, shaped like the per-row loss):

    lse         log-sum-exp of the softcapped logits
    logit_norm  L2 norm of the raw logits of the row (before softcap)
    logit_max   largest raw logit
    max_prob    largest softmax probability, exp(max_c x'_c - lse)
    entropy     of the softmax: lse - sum_c p_c x'_c
    correct     argmax of the logits equals the target (for probability targets: the
                target is largest at the argmax); False for ignored rows

The same kernels compute the squared error against one-hot targets of
``mse_onehot_loss``, with the same statistics:

    loss     = sum_c (x_c - [c = y])^2             d loss / d x_c = 2 x_c - 2 [c = y]
    loss     = sum_c (p_c - [c = y])^2             d loss / d x_c = 2 p_c (p_c - K) - 2 p_y [c = y],
                                                   K = sum_k p_k^2 - p_y

The forward pass writes d(loss)/d(logits) when the logits require a gradient, so the
backward pass only scales it by the incoming gradient (and is free when that is 1, as
after ``loss.backward()`` on CPU). The caller's logits are never modified.
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from spkern import registry
from spkern.constants import Kind
from spkern.distributed import is_dtensor

_REDUCTIONS = ("none", "mean", "sum")


class LogitStats(NamedTuple):
    """Per-row logit statistics; see the module docstring for the definitions."""

    lse: Tensor
    logit_norm: Tensor
    logit_max: Tensor
    max_prob: Tensor
    entropy: Tensor
    correct: Tensor


# ---------------------------------------------------------------------------------------
# Argument checks. Shapes, dtypes and devices are checked where the op is called (they
# are static under torch.compile); target values are checked inside the op, on CPU only
# (on a GPU that would need a host sync; the GPU kernels never read out of bounds).
# ---------------------------------------------------------------------------------------


def _check_args(input, target, weight, reduction, label_smoothing, z_loss, softcap, target_grad=False):
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension (classes), got a 0-d tensor")
    if target.device != input.device:
        raise ValueError(f"target is on device {target.device} but input is on device {input.device}")
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    if C == 0:
        raise ValueError(f"input has no classes: shape {tuple(input.shape)}")
    expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    if target.is_floating_point() and target.shape == expected and target.shape != input.shape:
        raise TypeError(f"target of class indices must be int64 (torch.long), as torch's cross_entropy takes, got "
                        f"{target.dtype} of shape {tuple(target.shape)} (class probabilities have the shape of "
                        f"input, {tuple(input.shape)})")
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"probability target must have the shape of input {tuple(input.shape)}, "
                f"got {tuple(target.shape)}")
        if target.requires_grad and not target_grad:
            raise ValueError("gradients with respect to probability targets are not supported here; "
                             "pass target.detach()")
    else:
        if target.dtype not in (torch.int64, torch.uint8):
            raise TypeError(f"target must hold class indices (int64, or uint8, as torch's cross_entropy takes) or "
                            f"class probabilities (floating point), got {target.dtype}")
        if target.shape != expected:
            raise ValueError(
                f"target of class indices must have shape {tuple(expected)} for input of shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}")
    check_options(weight, C, input.device, reduction, label_smoothing, z_loss, softcap)


def check_options(weight, C, device, reduction, label_smoothing, z_loss, softcap,
                  weight_name="weight"):
    """Checks the class weights and the scalar options of the logit losses."""
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"{weight_name} must be a Tensor or None, got {type(weight).__name__}")
        if weight.shape != (C,):
            raise ValueError(f"{weight_name} must have shape ({C},), got {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"{weight_name} must be floating point, got {weight.dtype}")
        if weight.device != device:
            raise ValueError(f"{weight_name} is on device {weight.device} but input is on device {device}")
        if weight.requires_grad:
            raise ValueError(f"gradients with respect to {weight_name} are not supported (nor in "
                             f"torch.nn.functional.cross_entropy); pass {weight_name}.detach()")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not (isinstance(z_loss, (int, float)) and math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and not (isinstance(softcap, (int, float))
                                    and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


def _check_target_values(target, C, ignore_index):
    if target.device.type != "cpu" or target.is_floating_point() or target.numel() == 0:
        return
    bad = ((target < 0) | (target >= C)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"target {value} is out of bounds for {C} classes "
                         f"(valid: 0..{C - 1}, or ignore_index={ignore_index})")


# ---------------------------------------------------------------------------------------
# The reference implementation: plain PyTorch in float64, the ground truth of the tests.
# Every backend takes (M, C) logits and returns (loss (M,), stats (6 or 1, M), grad).
# kind selects the loss: cross-entropy, or the squared error against one-hot targets of
# the logits or of the softmax probabilities (mse_onehot_loss); the statistics are the
# same for all.
# ---------------------------------------------------------------------------------------

CROSS_ENTROPY, MSE_LOGITS, MSE_PROBS = (int(k) for k in Kind)  # spkern.constants


def cross_entropy_reference(logits, target, weight, scalars, kind, ignore_index, label_smoothing,
                            z_loss, softcap, compute_stats, compute_grad, grad_out=None):
    """Float64 reference of the fused kernels; the same contract as theirs."""
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    M, C = logits.shape
    eps, z = float(label_smoothing), float(z_loss)
    x = logits.double()
    xc = softcap * torch.tanh(x / softcap) if softcap else x
    lse = torch.logsumexp(xc, dim=1)
    logp = xc - lse[:, None]
    p = logp.exp()
    w = weight.double() if weight is not None else torch.ones(C, dtype=torch.float64, device=x.device)
    scale = scalars[0].double()
    if kind != CROSS_ENTROPY:
        valid = target != ignore_index
        onehot = torch.nn.functional.one_hot(torch.where(valid, target, 0).long(), C).double()
        diff = (x if kind == MSE_LOGITS else p) - onehot
        loss = torch.where(valid, (diff**2).sum(1), 0.0)
        dpred = 2 * diff  # d loss / d prediction; through the softmax for probabilities
        g_mse = dpred if kind == MSE_LOGITS else p * (dpred - (dpred * p).sum(1, keepdim=True))
    elif target.is_floating_point():
        valid = torch.ones(M, dtype=torch.bool, device=x.device)
        t = target.double() * (1 - eps) + eps / C
        tw = t * w
        loss = -(tw * logp).sum(1) + z * lse**2
        a_coef = tw.sum(1) + 2 * z * lse
        b = tw
    else:
        valid = target != ignore_index
        y = torch.where(valid, target, 0).long()
        wy = torch.where(valid, w[y], 0.0)
        nll = -wy * logp.gather(1, y[:, None])[:, 0]
        loss = (1 - eps) * nll + z * lse**2
        if eps > 0:  # skipped at 0: a -inf logit would give 0 * inf
            loss = loss - eps / C * (w * logp).sum(1)
        loss = torch.where(valid, loss, 0.0)
        # the smoothing terms only with smoothing: a NaN class weight then reaches the rows
        # of that class alone, as in torch
        a_coef = (1 - eps) * wy + (eps / C * w.sum() if eps > 0 else 0.0) + 2 * z * lse
        b = (1 - eps) * wy[:, None] * torch.nn.functional.one_hot(y, C)
        if eps > 0:
            b = b + eps / C * w.expand(M, C)
    stats = [lse]
    if compute_stats:
        am = x.argmax(1)
        if target.is_floating_point():
            correct = target.gather(1, am[:, None])[:, 0] == target.max(1).values
        else:
            correct = valid & (am == target)
        entropy = torch.special.entr(p).sum(1)
        stats += [x.norm(dim=1), x.max(1).values, p.max(1).values, entropy, correct.double()]
    stats = torch.stack(stats).to(out_dtype)
    if compute_grad:
        if kind != CROSS_ENTROPY:
            g = torch.where(valid[:, None], g_mse * scale, 0.0)
        else:
            g = torch.where(valid[:, None], (p * a_coef[:, None] - b) * scale, 0.0)
            if softcap:
                g = g * (1 - (xc / softcap) ** 2)
        grad = g.to(logits.dtype) if grad_out is None else grad_out.copy_(g)
    else:
        grad = logits.new_empty(0)
    return loss.to(out_dtype), stats, grad


def logit_grad_reference(logits, target, weight, rows, kind, ignore_index, softcap, grad_out=None):
    """Float64 reference of the gradient kernels of the vocabulary-parallel losses
    (``logit_grad``): d(loss)/d(logits) of a slice of the classes from each row's
    log-sum-exp over all classes and its coefficients, ``rows`` = (M, 4) [lse, a, b, b_y].
    With p_c = exp(x'_c - lse) (x' the softcapped logits), per class c of the slice:

        cross-entropy  g_c = (p_c a - b w_c - b_y [c = y]) (1 - (x'_c / softcap)^2)
           (probabilities t)  (p_c a - (b t_c + b_y) w_c) (1 - (x'_c / softcap)^2)
        MSE logits     g_c = a x_c - b_y [c = y]
        MSE probs      g_c = b p_c (p_c - a) - b_y [c = y]

    y is a local class index (one outside [0, C) is held by another slice), w_c = 1 without
    class weights; for class indices the b term is left out where b = 0 (a NaN class weight
    then reaches its class's rows only, as in torch); rows whose target is ignore_index are
    zeros. (For probability targets b_y carries label smoothing: t' = (1 - eps) t + eps / C
    gives b = (1 - eps) s, b_y = eps / C s for a gradient scale s, t read at its own dtype.)"""
    M, C = logits.shape
    x = logits.double()
    xc = softcap * torch.tanh(x / softcap) if softcap else x
    lse, a, b, b_y = (r[:, None] for r in rows.double().unbind(1))
    prob = target.is_floating_point()
    if prob:
        valid = torch.ones(M, 1, dtype=torch.bool, device=x.device)
        at_y = torch.zeros(M, C, dtype=torch.bool, device=x.device)
    else:
        valid = (target != ignore_index)[:, None]
        at_y = torch.arange(C, device=x.device)[None, :] == target[:, None]
    if kind == MSE_LOGITS:
        g = a * x
    else:
        p = torch.exp(xc - lse)
        if kind == MSE_PROBS:
            g = b * p * (p - a)
        else:
            w = weight.double() if weight is not None else 1.0
            if prob:
                g = p * a - (b * target.double() + b_y) * w
            else:
                g = p * a - torch.where(b != 0, b * w, 0.0)
    g = torch.where(at_y, g - b_y, g)
    if kind == CROSS_ENTROPY and softcap:
        g = g * (1 - (xc / softcap) ** 2)
    g = torch.where(valid, g, 0.0)
    return g.to(logits.dtype) if grad_out is None else grad_out.copy_(g)


# ---------------------------------------------------------------------------------------
# The custom op: (M, C) logits in, reduced loss, statistics and the saved gradient out.
# ---------------------------------------------------------------------------------------


def _scalars(target, weight, ignore_index, reduction, C, dtype, kind=CROSS_ENTROPY):
    """[gradient scale, sum of class weights] as a device tensor, with no host sync."""
    device = target.device
    w_sum = weight.sum(dtype=dtype) if weight is not None else torch.tensor(float(C), dtype=dtype, device=device)
    if reduction != "mean":
        scale = torch.ones((), dtype=dtype, device=device)
    elif target.is_floating_point():
        rows = target.shape[0]
        scale = torch.full((), 1.0 / rows if rows else math.nan, dtype=dtype, device=device)
    else:
        valid = target != ignore_index
        if weight is None:
            denom = valid.sum(dtype=dtype)
        else:
            # where, not a product: a NaN weight of class 0 must not reach the ignored rows
            denom = torch.where(valid, weight.to(dtype)[torch.where(valid, target, 0)], 0.0).sum()
        if kind != CROSS_ENTROPY:  # squared errors: the mean over rows x classes
            denom = denom * C
        scale = 1.0 / denom
    return torch.stack([scale, w_sum])


@torch.library.custom_op("spkern::logit_loss", mutates_args=())
def _logit_loss_op(
    input: Tensor,  # (M, C), unit stride over classes
    target: Tensor,  # (M,) int64, or (M, C) probabilities in input's dtype; contiguous rows
    weight: Optional[Tensor],  # (C,) float32 or None
    kind: int,  # CROSS_ENTROPY, MSE_LOGITS, MSE_PROBS
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,  # 0 = off
    reduction: str,
    compute_stats: bool,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (loss, stats, grad): the loss reduced and float32 (float64 for float64
    input), the (6 or 1, M) statistics, and d(loss)/d(input) when compute_grad."""
    M, C = input.shape
    _check_target_values(target, C, ignore_index)
    kernel = registry.resolve("cross_entropy", input)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    scalars = _scalars(target, weight, ignore_index, reduction, C, acc, kind)
    loss, stats, grad = kernel.fn(
        input, target, weight, scalars, kind, ignore_index, label_smoothing, z_loss, softcap,
        compute_stats, compute_grad, None)
    return _reduce(loss, scalars, reduction), stats, grad


def _reduce(loss_rows, scalars, reduction):
    if reduction == "mean":
        return loss_rows.sum() * scalars[0]
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows


@_logit_loss_op.register_fake
def _(input, target, weight, kind, ignore_index, label_smoothing, z_loss, softcap, reduction,
      compute_stats, compute_grad):
    return fake_outputs(input, reduction, compute_stats, compute_grad)


def fake_outputs(input, reduction, compute_stats, compute_grad):
    """(loss, stats, grad) of a logit-loss op, shaped and typed, for tracing."""
    M, C = input.shape
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    loss = input.new_empty((M,) if reduction == "none" else (), dtype=acc)
    stats = input.new_empty((6 if compute_stats else 1, M), dtype=acc)
    grad = input.new_empty((M, C) if compute_grad else (0,))
    return loss, stats, grad


def setup_context(ctx, inputs, output):
    """The logit-loss ops' autograd context (their reduction and compute_grad arguments at
    positions 8 and 10): the gradient computed in the forward pass, saved."""
    _, stats, grad = output
    ctx.reduction = inputs[8]
    ctx.compute_grad = inputs[10]
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(stats, grad)
    # Without this, autograd fills a (M, C) tensor of zeros for the unused gradient of
    # the `grad` output on every backward.
    ctx.set_materialize_grads(False)


def is_plain_one(t):
    """True when ``t`` is a real CPU scalar equal to 1: reading it costs no device sync.
    Under tracing (torch.compile, torch.func) this is False and the multiply is kept."""
    return (type(t) is Tensor and t.device.type == "cpu" and t.numel() == 1
            and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t)
            and bool(t == 1))


def scale_grad(grad, dloss):
    """grad * dloss for a saved gradient of a reduced loss; free when dloss is 1 on CPU."""
    if grad is None or is_plain_one(dloss):
        return grad  # already d(loss)/d(input): the common loss.backward() case
    return grad * dloss.to(grad.dtype)


def refuse_double_backward(op):
    """The fused losses compute their gradient in the forward pass, as a constant: a
    backward that builds a graph (create_graph=True, for a gradient penalty, say) would
    silently lose the second-order terms, so it is refused."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"spkern.{op}: double backward (create_graph=True) is not supported: the fused kernel "
                           f"computes the gradient in the forward pass, so its second-order terms would be lost; "
                           f"use the torch loss it replaces where higher-order gradients are needed")


def backward_of(what: str, n_inputs: int):
    """The backward of a logit-loss op with ``n_inputs`` arguments, its input first: the
    saved gradient scaled by the incoming one."""
    def backward(ctx, dloss, dstats, dgrad):
        refuse_double_backward(what)
        (grad,) = ctx.saved_tensors
        if not ctx.compute_grad or dloss is None:
            return (None,) * n_inputs
        if ctx.reduction == "none":
            dinput = grad * dloss.to(grad.dtype)[:, None]
        else:
            dinput = scale_grad(grad, dloss)
        return (dinput,) + (None,) * (n_inputs - 1)
    return backward


_logit_loss_op.register_autograd(backward_of("cross_entropy / mse_onehot_loss", 11), setup_context=setup_context)


# ---------------------------------------------------------------------------------------
# The functional entry points.
# ---------------------------------------------------------------------------------------


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_stats: bool = False,
):
    """Cross-entropy between logits and targets, as ``torch.nn.functional.cross_entropy``.

    Args:
        input: logits, ``(N, C)``, ``(C,)`` or ``(N, C, d1, ..., dK)``; float32, bfloat16,
            float16 (float64 runs on the reference backend).
        target: class indices ``(N,)`` / ``()`` / ``(N, d1, ..., dK)`` (any integer
            dtype), or class probabilities with the shape of ``input`` (any float dtype).
            A probability target that requires grad gets its gradient: that call runs
            torch's own ``F.cross_entropy`` (its numbers and gradients), with the
            statistics from spkern's kernel on the detached tensors beside it.
        weight: class weights ``(C,)`` (any float dtype) or None.
        ignore_index: class index whose rows add nothing to the loss or the gradient.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: in ``[0, 1]``.
        z_loss: coefficient of ``lse**2`` added per row (0 = off).
        softcap: if set, logits become ``softcap * tanh(logits / softcap)``.
        return_stats: also return a :class:`LogitStats`, shaped like the per-row loss.

    Returns:
        The loss (in ``input``'s dtype, or float32 under autocast as in PyTorch), or
        ``(loss, stats)`` with ``return_stats=True``.
        Statistics are device tensors; reading them is the caller's choice.
    """
    _check_args(input, target, weight, reduction, label_smoothing, z_loss, softcap, target_grad=True)
    given_weight = weight
    if weight is not None:
        weight = weight.to(torch.float64 if input.dtype == torch.float64 else torch.float32).contiguous()
    if target.is_floating_point() and target.requires_grad and torch.is_grad_enabled():
        if is_dtensor(input):
            raise ValueError("a probability target that requires grad is not supported with vocabulary-sharded "
                             "logits (a DTensor input): pass target.detach()")
        # The gradient with respect to the target: torch's own loss (a documented fallback:
        # its numbers and both gradients), the statistics from spkern's pass beside it
        if z_loss or softcap is not None:
            raise ValueError("a probability target that requires grad takes torch's own cross_entropy, which has "
                             "no z_loss or softcap: pass target.detach(), or leave z_loss and softcap out")
        loss = torch.nn.functional.cross_entropy(
            input, target.to(input.dtype), None if given_weight is None else given_weight.to(input.dtype),
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
        if not return_stats:
            return loss
        return loss, _call(input.detach(), target.detach(), weight, CROSS_ENTROPY, ignore_index, label_smoothing,
                           0.0, None, reduction, True)[1]
    return _call(input, target, weight, CROSS_ENTROPY, ignore_index, label_smoothing, z_loss,
                 softcap, reduction, return_stats)


def mse_onehot_loss(
    input: Tensor,
    target: Tensor,
    *,
    on: str = "logits",
    reduction: str = "mean",
    ignore_index: int = -100,
    return_stats: bool = False,
):
    """Squared error against one-hot targets, with the statistics of :func:`cross_entropy`.

    ``on="logits"``: ``sum_c (input_c - [c = y])^2`` per row (the paper's MLP runs);
    ``on="probs"``: the same on ``softmax(input)`` (its GPT runs, with ``reduction="sum"``).
    ``reduction="mean"`` averages over rows x classes, as
    ``F.mse_loss(input, F.one_hot(target, C).to(input))`` does; ``"sum"`` sums; ``"none"``
    gives the per-row sums over classes. Rows whose target is ``ignore_index`` add nothing.
    Layouts, dtypes and statistics as in :func:`cross_entropy`; targets are class indices.
    """
    if on not in _MSE_KINDS:
        raise ValueError(f"on must be one of {tuple(_MSE_KINDS)}, got {on!r}")
    _check_args(input, target, None, reduction, 0.0, 0.0, None)
    if target.is_floating_point():
        raise TypeError(f"target must hold class indices (integer) for mse_onehot_loss, got {target.dtype}")
    return _call(input, target, None, _MSE_KINDS[on], ignore_index, 0.0, 0.0, None, reduction,
                 return_stats)


_MSE_KINDS = {"logits": MSE_LOGITS, "probs": MSE_PROBS}


def _call(input, target, weight, kind, ignore_index, label_smoothing, z_loss, softcap, reduction,
          return_stats):
    """Brings any layout to (rows, classes) with classes contiguous, runs the op, and puts
    the loss and the statistics back in the layout of the target. Logits that are a
    DTensor sharded on the class dimension take the vocabulary-parallel op
    (spkern.vocab_parallel): this rank's slice of the classes in, the whole rows' loss and
    statistics out."""
    shard = None
    if is_dtensor(input) or is_dtensor(target) or is_dtensor(weight):
        if not is_dtensor(input):
            raise ValueError(f"input is a plain tensor but {'target' if is_dtensor(target) else 'weight'} is a "
                             f"DTensor: pass plain tensors, or logits sharded over the classes as a DTensor")
        shard = vocab_parallel.class_shard(input)
        target = vocab_parallel.local_target(target, input, shard[1], shard[2])
        weight = vocab_parallel.whole(weight, "weight")
        input = input.to_local()
    if input.dim() == 1:
        x2 = input.unsqueeze(0)
        row_shape = ()
    elif input.dim() == 2:
        x2 = input
        row_shape = input.shape[:1]
    else:
        x2 = input.movedim(1, -1).reshape(-1, input.shape[1])
        row_shape = input.shape[:1] + input.shape[2:]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    C = x2.shape[1]
    if target.is_floating_point():
        t2 = target.reshape(1, C) if input.dim() == 1 else (
            target if input.dim() == 2 else target.movedim(1, -1).reshape(-1, C))
        t2 = t2.to(x2.dtype)
        if t2.stride(-1) != 1:
            t2 = t2.contiguous()
    else:
        t2 = target.reshape(-1).long().contiguous()
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    if shard is not None:
        loss, stats, _ = vocab_parallel.run(x2, t2, weight, kind, ignore_index, label_smoothing, z_loss, softcap,
                                            reduction, return_stats, shard)
    else:
        loss, stats, _ = torch.ops.spkern.logit_loss(
            x2, t2, weight, kind, int(ignore_index), float(label_smoothing), float(z_loss),
            float(softcap or 0.0), reduction, bool(return_stats), compute_grad)
    # The op returns the float32-accumulated loss. As F.cross_entropy, return it in the
    # input's dtype, except under autocast, where losses run in float32.
    if not torch.is_autocast_enabled(input.device.type):
        loss = loss.to(input.dtype)
    if reduction == "none":
        loss = loss.reshape(row_shape)
    if not return_stats:
        return loss
    return loss, stats_from_rows(stats, row_shape)


def stats_from_rows(stats, row_shape):
    """LogitStats from the (6, M) statistics of the kernels, each shaped row_shape."""
    lse, norm, lmax, max_prob, entropy, correct = stats.reshape((6,) + tuple(row_shape))
    return LogitStats(lse, norm, lmax, max_prob, entropy, correct > 0.5)


# the vocabulary-parallel op (registered with the module, as logit_loss is here)
from spkern import vocab_parallel  # noqa: E402
