"""Fused cross-entropy forward (+ gradient) with per-row logit statistics, Triton.

One program per row. The first loop over the row keeps an online softmax (running
max, sum of exponentials and sum of exp * logit for the entropy) together with the
statistics; the second loop, only when a gradient is wanted, writes d(loss)/d(logits)
once. Definitions match spkern/cross_entropy.py (the reference implementation).
Padded lanes of the last block load as -inf for the softmax and are masked out of
every sum.
"""

import torch
import triton
import triton.language as tl

from spkern.constants import Kind

# the loss kinds, from spkern.constants (the kernel's KIND is one of them)
CROSS_ENTROPY, MSE_LOGITS, MSE_PROBS = (tl.constexpr(int(k)) for k in Kind)


@triton.jit
def _tanh(u):
    # exp-based so that it also runs in the Triton interpreter (no libdevice there)
    e = tl.exp(-2.0 * tl.abs(u))
    r = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -r, r)


@triton.jit
def _cross_entropy_fwd_kernel(
    X, stride_x,  # (M, C) logits
    T, stride_t,  # (M,) int64 class indices, or (M, C) probabilities
    Wt,  # (C,) float32 class weights (unused without HAS_WEIGHT)
    SCAL,  # (2,) float32: gradient scale, sum of class weights
    LOSS,  # (M,) float32
    STATS, stride_s,  # (6 or 1, M) float32
    G, stride_g,  # (M, C) gradient, input dtype
    C, ignore_index, eps, z, cap,
    KIND: tl.constexpr,  # CROSS_ENTROPY, MSE_LOGITS (squared error of logits) or MSE_PROBS
    HAS_WEIGHT: tl.constexpr, PROB: tl.constexpr, HAS_CAP: tl.constexpr,
    SMOOTH: tl.constexpr, STATS_ON: tl.constexpr, GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    t_row = T + row * stride_t
    scale = tl.load(SCAL)
    w_sum = tl.load(SCAL + 1)
    eps_c = eps / C
    if PROB:
        valid = True
        y = 0
    else:
        y = tl.load(t_row).to(tl.int64)
        valid = y != ignore_index
        # a target outside [0, C) is never read through: its row becomes NaN
        in_range = (y >= 0) & (y < C)

    m = -float("inf")  # running max of the softcapped logits
    s = 0.0  # sum exp(x' - m)
    t = 0.0  # sum exp(x' - m) * x'
    s2 = 0.0  # sum exp(x' - m)^2 (MSE_PROBS)
    sq = 0.0
    raw_max = -float("inf")
    arg = tl.zeros((), tl.int64)
    lin = 0.0  # sum w_c x'_c (label smoothing)
    tw = 0.0  # sum t'_c w_c (probability targets)
    twx = 0.0  # sum t'_c w_c x'_c
    t_max = -float("inf")
    for start in range(0, C, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < C
        x = tl.load(x_row + offs, mask=mask, other=-float("inf")).to(tl.float32)
        xz = tl.where(mask, x, 0.0)
        sq += tl.sum(xz * xz)
        if STATS_ON:
            b_max = tl.max(x, 0)
            b_arg = tl.argmax(x, 0).to(tl.int64) + start
            arg = tl.where(b_max > raw_max, b_arg, arg)
            raw_max = tl.maximum(raw_max, b_max)
        if HAS_CAP:
            xc = cap * _tanh(x / cap)
        else:
            xc = x
        xcz = tl.where(mask, xc, 0.0)
        m_new = tl.maximum(m, tl.max(xc, 0))
        # while every logit so far is -inf, rescale against 0 so that exp(-inf - -inf)
        # does not turn the sums into NaN
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        e = tl.where(mask, tl.exp(xc - m_ref), 0.0)
        alpha = tl.exp(m - m_ref)
        s = s * alpha + tl.sum(e)
        if KIND == MSE_PROBS:
            s2 = s2 * alpha * alpha + tl.sum(e * e)
        # x' clamped to max - 128 so that a -inf logit adds 0, not 0 * -inf = NaN
        t = t * alpha + tl.sum(e * tl.maximum(xcz, m_ref - 128.0))
        m = m_new
        if HAS_WEIGHT:
            w = tl.load(Wt + offs, mask=mask, other=0.0)
        else:
            w = tl.where(mask, 1.0, 0.0)
        if PROB:
            tv = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
            if STATS_ON:
                t_max = tl.maximum(t_max, tl.max(tl.where(mask, tv, -float("inf")), 0))
            if SMOOTH:
                tv = tv * (1.0 - eps) + eps_c
            tv = tv * w
            tw += tl.sum(tv)
            twx += tl.sum(tv * xcz)
        elif SMOOTH:
            lin += tl.sum(w * xcz)

    lse = m + tl.log(s)
    if PROB:
        loss = tw * lse - twx + z * lse * lse
        a_coef = tw + 2.0 * z * lse
        wy = 0.0
    else:
        y_safe = tl.where(valid & in_range, y, 0)
        xy = tl.load(x_row + y_safe).to(tl.float32)
        if HAS_CAP:
            xy = cap * _tanh(xy / cap)
        if HAS_WEIGHT:
            wy = tl.load(Wt + y_safe)
        else:
            wy = 1.0
        loss = (1.0 - eps) * wy * (lse - xy) + z * lse * lse
        if SMOOTH:
            loss += eps_c * (w_sum * lse - lin)
        a_coef = (1.0 - eps) * wy + 2.0 * z * lse
        if SMOOTH:  # only then: w_sum is NaN when a class weight is, and that class's rows alone turn NaN
            a_coef += eps_c * w_sum
        if KIND == MSE_LOGITS:
            loss = sq - 2.0 * tl.load(x_row + y_safe).to(tl.float32) + 1.0
        if KIND == MSE_PROBS:
            py = tl.exp(xy - lse)
            p2 = s2 / (s * s)
            loss = p2 - 2.0 * py + 1.0
            a_coef = p2 - py  # K: d/dx_c = 2 scale p_c (p_c - K) - 2 scale p_y [c = y]
        loss = tl.where(valid, tl.where(in_range, loss, float("nan")), 0.0)
        a_coef = tl.where(in_range, a_coef, float("nan"))
    tl.store(LOSS + row, loss)
    tl.store(STATS + row, lse)
    if STATS_ON:
        norm = tl.sqrt(sq)
        if (sq > 1e30) | (sq < 1e-30):
            # the float32 sum of squares overflowed (logits beyond ~1e15) or underflowed:
            # sum again in float64 (rare, so the first loop stays one FMA per logit)
            sq64 = tl.zeros((BLOCK,), tl.float64)
            for start in range(0, C, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x64 = tl.load(x_row + offs, mask=offs < C, other=0.0).to(tl.float64)
                sq64 += x64 * x64
            norm = tl.sqrt(tl.sum(sq64, 0)).to(tl.float32)
        tl.store(STATS + stride_s + row, norm)
        tl.store(STATS + 2 * stride_s + row, raw_max)
        tl.store(STATS + 3 * stride_s + row, 1.0 / s)
        tl.store(STATS + 4 * stride_s + row, lse - t / s)
        if PROB:
            t_at = tl.load(t_row + arg).to(tl.float32)
            correct = t_at == t_max
        else:
            correct = valid & (arg == y)
        tl.store(STATS + 5 * stride_s + row, tl.where(correct, 1.0, 0.0))

    if GRAD:
        g_row = G + row * stride_g
        a = tl.where(valid, a_coef * scale, 0.0)
        b = tl.where(valid, scale, 0.0)
        b_y = tl.where(valid, (1.0 - eps) * wy * scale, 0.0)
        if KIND == MSE_LOGITS:
            b_y = tl.where(valid, 2.0 * scale, 0.0)
        if KIND == MSE_PROBS:
            b_y = tl.where(valid, 2.0 * scale * py, 0.0)
        for start in range(0, C, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < C
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                xc = cap * _tanh(x / cap)
            else:
                xc = x
            if KIND == CROSS_ENTROPY:
                g = tl.exp(xc - lse) * a
            elif KIND == MSE_LOGITS:
                g = 2.0 * b * x
            else:
                pc = tl.exp(xc - lse)
                g = 2.0 * b * pc * (pc - a_coef)
            if HAS_WEIGHT:
                w = tl.load(Wt + offs, mask=mask, other=0.0)
            else:
                w = 1.0
            if PROB:
                tv = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
                if SMOOTH:
                    tv = tv * (1.0 - eps) + eps_c
                g -= tv * w * b
            else:
                if SMOOTH:
                    g -= eps_c * w * b
                g = tl.where(offs == y, g - b_y, g)
            if HAS_CAP and KIND == CROSS_ENTROPY:
                u = xc / cap
                g = g * (1.0 - u * u)
            # ignored rows get exact zeros, as in PyTorch
            g = tl.where(valid, g, 0.0)
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)


def _block_size(C):
    # a whole row per iteration up to 4096 classes; larger rows loop
    return min(4096, triton.next_power_of_2(max(C, 16)))


def _num_warps(block):
    # 8 to 16 elements per thread per iteration
    return max(4, min(16, block // 256))


def cross_entropy_fwd(logits, target, weight, scalars, kind, ignore_index, label_smoothing,
                      z_loss, softcap, compute_stats, compute_grad, grad_out=None):
    """Launch the kernel. Same contract as spkern._C.cross_entropy_fwd_cpu (grad_out may be
    the logits: each program reads a block before it writes the block's gradient)."""
    M, C = logits.shape
    prob = target.is_floating_point()
    loss = torch.empty(M, device=logits.device, dtype=torch.float32)
    stats = torch.empty(6 if compute_stats else 1, M, device=logits.device, dtype=torch.float32)
    if compute_grad and grad_out is not None:
        grad = grad_out
    else:
        grad = torch.empty((M, C) if compute_grad else (0,), device=logits.device, dtype=logits.dtype)
    if M == 0:
        return loss, stats, grad
    w = weight if weight is not None else scalars  # any valid pointer when unused
    _cross_entropy_fwd_kernel[(M,)](
        logits, logits.stride(0),
        target, target.stride(0) if prob else 1,
        w, scalars, loss, stats, stats.stride(0),
        grad, grad.stride(0) if compute_grad else 0,
        C, ignore_index, float(label_smoothing), float(z_loss), float(softcap or 0.0),
        KIND=int(kind), HAS_WEIGHT=weight is not None, PROB=prob, HAS_CAP=bool(softcap),
        SMOOTH=label_smoothing > 0, STATS_ON=compute_stats, GRAD=compute_grad,
        BLOCK=_block_size(C), num_warps=_num_warps(_block_size(C)),
    )
    return loss, stats, grad


@triton.jit
def _logit_grad_kernel(
    X, stride_x,  # (M, C) logits
    T, stride_t,  # (M,) int64 class indices, or (M, C) probabilities
    Wt,  # (C,) float32 class weights (unused without HAS_WEIGHT)
    R,  # (M, 4) float32: lse, a, b, b_y
    G, stride_g,  # (M, C) gradient, input dtype
    C, ignore_index, cap,
    KIND: tl.constexpr, HAS_WEIGHT: tl.constexpr, PROB: tl.constexpr, HAS_CAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The gradient from each row's log-sum-exp and coefficients (the second pass of the
    # vocabulary-parallel losses); formulas in spkern.cross_entropy.logit_grad_reference.
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    g_row = G + row * stride_g
    lse = tl.load(R + 4 * row)
    a = tl.load(R + 4 * row + 1)
    b = tl.load(R + 4 * row + 2)
    b_y = tl.load(R + 4 * row + 3)
    if PROB:
        valid = True
        y = -1
    else:
        y = tl.load(T + row * stride_t).to(tl.int64)
        valid = y != ignore_index
    for start in range(0, C, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < C
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_CAP:
            xc = cap * _tanh(x / cap)
        else:
            xc = x
        if KIND == MSE_LOGITS:
            g = a * x
        else:
            pc = tl.exp(xc - lse)
            if KIND == MSE_PROBS:
                g = b * pc * (pc - a)
            else:
                bt = tl.zeros((BLOCK,), tl.float32) + b
                if PROB:  # (b_y: the smoothing's share, every class)
                    bt = bt * tl.load(T + row * stride_t + offs, mask=mask, other=0.0).to(tl.float32) + b_y
                if HAS_WEIGHT:
                    bt = bt * tl.load(Wt + offs, mask=mask, other=0.0)
                # the b term left out where b = 0: a NaN class weight reaches its class's rows only
                g = pc * a - tl.where((b != 0.0) | PROB, bt, 0.0)
        g = tl.where(offs == y, g - b_y, g)
        if HAS_CAP and KIND == CROSS_ENTROPY:
            u = xc / cap
            g = g * (1.0 - u * u)
        g = tl.where(valid, g, 0.0)
        tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)


def logit_grad(logits, target, weight, rows, kind, ignore_index, softcap, grad_out=None):
    """Launch the gradient kernel. Same contract as spkern._C.logit_grad_cpu."""
    M, C = logits.shape
    prob = target.is_floating_point()
    grad = grad_out if grad_out is not None else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if M == 0 or C == 0:
        return grad
    w = weight if weight is not None else rows  # any valid pointer when unused
    block = _block_size(C)
    _logit_grad_kernel[(M,)](
        logits, logits.stride(0), target, target.stride(0) if prob else 1, w, rows,
        grad, grad.stride(0), C, ignore_index, float(softcap or 0.0),
        KIND=int(kind), HAS_WEIGHT=weight is not None, PROB=prob, HAS_CAP=bool(softcap),
        BLOCK=block, num_warps=_num_warps(block),
    )
    return grad


# (C at which the launcher picks each block size: 16, 1024 and the looping 4096)
_SHAPES = (10, 1000, 50257)
_FLAG_SETS = (  # KIND, HAS_WEIGHT, PROB, HAS_CAP, SMOOTH, STATS_ON, GRAD: every flag on and off
    (CROSS_ENTROPY, False, False, False, False, True, True),
    (CROSS_ENTROPY, True, False, True, True, True, True),
    (CROSS_ENTROPY, True, True, True, True, True, True),
    (CROSS_ENTROPY, False, False, False, False, False, False),
    (MSE_LOGITS, False, False, False, False, True, True),
    (MSE_PROBS, False, False, True, False, True, True),
)

_GRAD_FLAG_SETS = (  # the gradient kernel's KIND, HAS_WEIGHT, PROB, HAS_CAP
    (CROSS_ENTROPY, False, False, False),
    (CROSS_ENTROPY, True, False, True),
    (CROSS_ENTROPY, True, True, True),
    (MSE_LOGITS, False, False, False),
    (MSE_PROBS, False, False, False),
)


def compile_configs():
    """Every launch configuration spkern.compile_check compiles: each dtype and block size
    the launcher chooses, with every flag on and off (and all on together)."""
    for dt in ("fp32", "bf16", "fp16"):
        for C in _SHAPES:
            block = _block_size(C)
            for kind, weight, prob, cap, smooth, stats, grad in _FLAG_SETS:
                sig = {"X": f"*{dt}", "stride_x": "i32", "T": f"*{dt}" if prob else "*i64", "stride_t": "i32",
                       "Wt": "*fp32", "SCAL": "*fp32", "LOSS": "*fp32", "STATS": "*fp32", "stride_s": "i32",
                       "G": f"*{dt}", "stride_g": "i32", "C": "i32", "ignore_index": "i32", "eps": "fp32",
                       "z": "fp32", "cap": "fp32"}
                const = dict(KIND=int(kind), HAS_WEIGHT=weight, PROB=prob, HAS_CAP=cap, SMOOTH=smooth,
                             STATS_ON=stats, GRAD=grad, BLOCK=block)
                label = f"{dt} C={C} kind={int(kind)}" + "".join(
                    f" {n}" for n, on in (("weight", weight), ("prob", prob), ("cap", cap), ("smooth", smooth),
                                          ("stats", stats), ("grad", grad)) if on)
                yield _cross_entropy_fwd_kernel, sig, const, _num_warps(block), label
            for kind, weight, prob, cap in _GRAD_FLAG_SETS:
                sig = {"X": f"*{dt}", "stride_x": "i32", "T": f"*{dt}" if prob else "*i64", "stride_t": "i32",
                       "Wt": "*fp32", "R": "*fp32", "G": f"*{dt}", "stride_g": "i32", "C": "i32",
                       "ignore_index": "i32", "cap": "fp32"}
                const = dict(KIND=int(kind), HAS_WEIGHT=weight, PROB=prob, HAS_CAP=cap, BLOCK=block)
                label = f"logit_grad {dt} C={C} kind={int(kind)}" + "".join(
                    f" {n}" for n, on in (("weight", weight), ("prob", prob), ("cap", cap)) if on)
                yield _logit_grad_kernel, sig, const, _num_warps(block), label
