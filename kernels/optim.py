"""Fused SGD and AdamW steps with per-parameter norms, Triton.

Parameters are read through tables of pointers, so that one launch covers every
parameter of a group (float32, bfloat16 or float16, one dtype per launch): each program updates one chunk of one parameter and writes the
chunk's sums of ||W_{t+1} - W_t||^2, ||W_{t+1}||^2, ||grad||^2 and ||W_{t+1} - W_0||^2;
the reduction of spkern.kernels.norms adds the chunks of each parameter in order.
Formulas as torch.optim's (see csrc/cpu/optim.cpp).
"""

import torch
import triton
import triton.language as tl

from spkern.kernels.chunks import TL_DTYPE as _TL, WorkTable
from spkern.kernels.norms import _reduce_kernel


@triton.jit
def _ptr(TABLE, t, TY: tl.constexpr):
    return tl.load(TABLE + t).to(tl.pointer_type(TY))


@triton.jit
def _rnd(x, TY: tl.constexpr):
    """x rounded to nearest even in the parameters' dtype, as float32: torch rounds after
    each op. bfloat16 by hand: Triton's interpreter truncates float32 to bfloat16."""
    if TY == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(TY).to(tl.float32)


@triton.jit
def _sums(PARTIAL, w, pn, p0, g, W0_PTRS, t, offs, mask, HAS_W0: tl.constexpr, W0_TY: tl.constexpr):
    du = tl.where(mask, pn - p0, 0.0)
    tl.store(PARTIAL + 4 * w, tl.sum(du * du))
    pz = tl.where(mask, pn, 0.0)
    tl.store(PARTIAL + 4 * w + 1, tl.sum(pz * pz))
    tl.store(PARTIAL + 4 * w + 2, tl.sum(g * g))
    if HAS_W0:
        w0 = tl.load(tl.load(W0_PTRS + t).to(tl.pointer_type(W0_TY)) + offs, mask=mask, other=0.0)
        dd = tl.where(mask, pn - w0.to(tl.float32), 0.0)
        tl.store(PARTIAL + 4 * w + 3, tl.sum(dd * dd))
    else:
        tl.store(PARTIAL + 4 * w + 3, 0.0)


@triton.jit
def _sgd_kernel(P_PTRS, G_PTRS, BUF_PTRS, W0_PTRS, FRESH, WORK_T, WORK_S, WORK_E, PARTIAL,
                lr, momentum, damp1, weight_decay, momentum_mul,
                HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_W0: tl.constexpr, W0_TY: tl.constexpr, P_TY: tl.constexpr, BLOCK: tl.constexpr):
    w = tl.program_id(0)
    t = tl.load(WORK_T + w)
    offs = tl.load(WORK_S + w) + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < tl.load(WORK_E + w)
    p_ptr = _ptr(P_PTRS, t, P_TY)
    g = tl.load(_ptr(G_PTRS, t, P_TY) + offs, mask=mask, other=0.0).to(tl.float32)
    p0 = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gk = -g if MAXIMIZE else g
    # fused multiply-adds where torch's add(x, y, alpha) has them (csrc/cpu/optim.cpp)
    d = _rnd(tl.fma(p0, weight_decay, gk), P_TY)
    if HAS_MOM:
        b_ptr = _ptr(BUF_PTRS, t, P_TY)
        buf = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.where(tl.load(FRESH + t) != 0, d,
                     _rnd(tl.fma(d, damp1, _rnd(buf * momentum_mul, P_TY)), P_TY))
        tl.store(b_ptr + offs, m.to(P_TY), mask=mask)
        d = _rnd(tl.fma(m, momentum, d), P_TY) if NESTEROV else m
    pn = _rnd(tl.fma(d, -lr, p0), P_TY)
    tl.store(p_ptr + offs, pn.to(P_TY), mask=mask)
    _sums(PARTIAL, w, pn, p0, g, W0_PTRS, t, offs, mask, HAS_W0, W0_TY)


@triton.jit
def _adamw_kernel(P_PTRS, G_PTRS, M_PTRS, V_PTRS, VMAX_PTRS, W0_PTRS, NEG_STEP, BC2_SQRT,
                  WORK_T, WORK_S, WORK_E, PARTIAL, decay, w1, beta2, w2, eps,
                  AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_W0: tl.constexpr,
                  W0_TY: tl.constexpr, P_TY: tl.constexpr, BLOCK: tl.constexpr):
    w = tl.program_id(0)
    t = tl.load(WORK_T + w)
    offs = tl.load(WORK_S + w) + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < tl.load(WORK_E + w)
    p_ptr, m_ptr, v_ptr = _ptr(P_PTRS, t, P_TY), _ptr(M_PTRS, t, P_TY), _ptr(V_PTRS, t, P_TY)
    g = tl.load(_ptr(G_PTRS, t, P_TY) + offs, mask=mask, other=0.0).to(tl.float32)
    p0 = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m0 = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v0 = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gk = -g if MAXIMIZE else g
    pk = _rnd(p0 * decay, P_TY)
    mk = _rnd(tl.fma(w1, gk - m0, m0), P_TY)
    vk = _rnd(tl.fma(w2 * gk, gk, _rnd(v0 * beta2, P_TY)), P_TY)
    tl.store(m_ptr + offs, mk.to(P_TY), mask=mask)
    tl.store(v_ptr + offs, vk.to(P_TY), mask=mask)
    vd = vk
    if AMSGRAD:
        x_ptr = _ptr(VMAX_PTRS, t, P_TY)
        vd = tl.maximum(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), vk)
        tl.store(x_ptr + offs, vd.to(P_TY), mask=mask)
    denom = _rnd(_rnd(_rnd(tl.sqrt_rn(vd), P_TY) / tl.load(BC2_SQRT + t), P_TY) + eps, P_TY)
    pn = _rnd(pk + (tl.load(NEG_STEP + t) * mk) / denom, P_TY)
    tl.store(p_ptr + offs, pn.to(P_TY), mask=mask)
    _sums(PARTIAL, w, pn, p0, g, W0_PTRS, t, offs, mask, HAS_W0, W0_TY)


BLOCK = 2048


class _Plan(WorkTable):
    """Device tables of one launch: pointers, chunks of BLOCK elements, chunk ranges."""

    def __init__(self, params, init):
        super().__init__([p.numel() for p in params], BLOCK, params[0].device)
        self.n_params = len(params)
        self.w0 = self.pointers(init)
        self.dtype = params[0].dtype if params else torch.float32
        self.meta = dict(HAS_W0=bool(init), W0_TY=_TL[init[0].dtype] if init else tl.float32,
                         P_TY=_TL[self.dtype], BLOCK=BLOCK)
        self.partial = torch.empty(max(self.n_work, 1), 4, device=self.device, dtype=torch.float32)

    def add_scalar(self, x):
        """x as torch's add(x, y, alpha) and add(x, scalar) take it: rounded to the dtype."""
        return torch.tensor(float(x), dtype=self.dtype).item()

    def finish(self, stats):
        out = torch.zeros(self.n_params, 4, device=self.device, dtype=torch.float32)
        if self.n_work:
            first, last, rows = self.ranges
            _reduce_kernel[(self.n_params,)](self.partial, first, last, out, rows)
        stats.copy_(out)


def sgd_step(params, grads, bufs, fresh, init, stats, lr, momentum, dampening, weight_decay,
             nesterov, maximize):
    """Same contract as spkern._C.sgd_step_cpu (float32, bfloat16 or float16 parameters with
    gradients and state of their dtype, on one device)."""
    plan = _Plan(params, init)
    if plan.n_work:
        _sgd_kernel[(plan.n_work,)](
            plan.pointers(params), plan.pointers(grads), plan.pointers(bufs if momentum != 0 else []),
            plan.w0, plan.table([int(f) for f in fresh], torch.int32), *plan.work, plan.partial,
            plan.add_scalar(lr), plan.add_scalar(momentum), plan.add_scalar(1 - dampening),
            plan.add_scalar(weight_decay), float(momentum), HAS_MOM=momentum != 0, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), **plan.meta)
    plan.finish(stats)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, init, stats, lr, beta1,
               beta2, eps, weight_decay, amsgrad, maximize):
    """Same contract as spkern._C.adamw_step_cpu."""
    plan = _Plan(params, init)
    neg_step = [-(lr / (1 - beta1**s)) for s in steps]
    bc2_sqrt = [(1 - beta2**s) ** 0.5 for s in steps]
    if plan.n_work:
        _adamw_kernel[(plan.n_work,)](
            plan.pointers(params), plan.pointers(grads), plan.pointers(exp_avgs),
            plan.pointers(exp_avg_sqs), plan.pointers(max_exp_avg_sqs if amsgrad else []), plan.w0,
            plan.table(neg_step, torch.float32), plan.table(bc2_sqrt, torch.float32), *plan.work,
            plan.partial, float(1 - lr * weight_decay), float(1 - beta1), float(beta2),
            float(1 - beta2), plan.add_scalar(eps), AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), **plan.meta)
    plan.finish(stats)


def compile_configs():
    """Every launch configuration spkern.compile_check compiles."""
    names = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16"}
    work = {"WORK_T": "*i64", "WORK_S": "*i64", "WORK_E": "*i64", "PARTIAL": "*fp32"}
    for p in names:
        for w0 in (None, *names):
            meta = dict(HAS_W0=w0 is not None, W0_TY=w0 or tl.float32, P_TY=p, BLOCK=BLOCK)
            tag = f"{names[p]}" + (f" W0 {names[w0]}" if w0 is not None else "")
            for mom, nesterov, maximize in ((False, False, False), (True, False, False), (True, True, True)):
                sig = {n: "*i64" for n in ("P_PTRS", "G_PTRS", "BUF_PTRS", "W0_PTRS")} | {"FRESH": "*i32"} | work | {
                    n: "fp32" for n in ("lr", "momentum", "damp1", "weight_decay", "momentum_mul")}
                yield (_sgd_kernel, sig, dict(HAS_MOM=mom, NESTEROV=nesterov, MAXIMIZE=maximize, **meta), 4,
                       f"sgd {tag}" + (" momentum" if mom else "") + (" nesterov maximize" if nesterov else ""))
            for amsgrad, maximize in ((False, False), (True, True)):
                sig = {n: "*i64" for n in ("P_PTRS", "G_PTRS", "M_PTRS", "V_PTRS", "VMAX_PTRS", "W0_PTRS")} | {
                    "NEG_STEP": "*fp32", "BC2_SQRT": "*fp32"} | work | {
                    n: "fp32" for n in ("decay", "w1", "beta2", "w2", "eps")}
                yield (_adamw_kernel, sig, dict(AMSGRAD=amsgrad, MAXIMIZE=maximize, **meta), 4,
                       f"adamw {tag}" + (" amsgrad maximize" if amsgrad else ""))
