"""Multi-tensor pair norms, Triton: per tensor ||a||^2, ||b||^2, ||a - b||^2, <a, b> (the
columns of spkern.constants.Sum).

Tensors are read through a table of pointers, so that one launch covers every tensor of
a (dtype of a, dtype of b) group: each program sums one chunk of one tensor, then one
program per tensor adds its chunks in order (deterministic, no atomics).
"""

import torch
import triton
import triton.language as tl

from spkern.constants import Sum
from spkern.kernels.chunks import TL_DTYPE as _TL, WorkTable

CHUNK = 1 << 16
_CHUNK_BLOCK = 1024
A_SQ, B_SQ, DIFF_SQ, DOT = (tl.constexpr(int(c)) for c in (Sum.A_SQ, Sum.B_SQ, Sum.DIFF_SQ, Sum.DOT))


@triton.jit
def _chunk_kernel(
    A_PTRS, B_PTRS,  # (T,) int64 addresses
    WORK_T, WORK_START, WORK_END,  # (W,) int64: tensor index and element range of each chunk
    PARTIAL,  # (W, 4) float32
    A_TY: tl.constexpr, B_TY: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
):
    w = tl.program_id(0)
    t = tl.load(WORK_T + w)
    start = tl.load(WORK_START + w)
    end = tl.load(WORK_END + w)
    a = tl.load(A_PTRS + t).to(tl.pointer_type(A_TY))
    dd = tl.zeros((BLOCK,), tl.float32)
    aa = tl.zeros((BLOCK,), tl.float32)
    bb = tl.zeros((BLOCK,), tl.float32)
    ab = tl.zeros((BLOCK,), tl.float32)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < end
        x = tl.load(a + offs, mask=mask, other=0.0).to(tl.float32)
        aa += x * x
        if HAS_B:
            b = tl.load(B_PTRS + t).to(tl.pointer_type(B_TY))
            y = tl.load(b + offs, mask=mask, other=0.0).to(tl.float32)
            d = x - y
            dd += d * d
            bb += y * y
            ab += x * y
    sa = tl.sum(aa)
    tl.store(PARTIAL + 4 * w + DIFF_SQ, tl.sum(dd) if HAS_B else sa)
    tl.store(PARTIAL + 4 * w + A_SQ, sa)
    tl.store(PARTIAL + 4 * w + B_SQ, tl.sum(bb))
    tl.store(PARTIAL + 4 * w + DOT, tl.sum(ab))


@triton.jit
def _reduce_kernel(PARTIAL, FIRST, LAST, OUT, OUT_ROWS):
    # OUT_ROWS: (G,) row of OUT that group tensor g fills
    g = tl.program_id(0)
    first = tl.load(FIRST + g)
    last = tl.load(LAST + g)
    row = tl.load(OUT_ROWS + g)
    for k in tl.static_range(4):
        acc = 0.0
        for w in range(first, last):
            acc += tl.load(PARTIAL + 4 * w + k)
        tl.store(OUT + 4 * row + k, acc)


def multi_tensor_norms(a, b):
    """Same contract as spkern._C.multi_tensor_norms_cpu; a and b on one device."""
    T = len(a)
    device = a[0].device if T else torch.device("cpu")
    out = torch.zeros(T, 4, device=device, dtype=torch.float32)
    groups = {}
    for i, x in enumerate(a):
        if x.numel():
            groups.setdefault((x.dtype, b[i].dtype if b else None), []).append(i)
    for (a_dtype, b_dtype), idx in groups.items():
        plan = WorkTable([a[i].numel() for i in idx], CHUNK, device, rows=idx)
        a_ptrs = plan.pointers([a[i] for i in idx])
        b_ptrs = plan.pointers([b[i] for i in idx]) if b else a_ptrs
        partial = torch.empty(plan.n_work, 4, device=device, dtype=torch.float32)
        _chunk_kernel[(plan.n_work,)](
            a_ptrs, b_ptrs, *plan.work, partial,
            A_TY=_TL[a_dtype], B_TY=_TL[b_dtype or a_dtype], HAS_B=b is not None and len(b) > 0,
            BLOCK=_CHUNK_BLOCK)
        first, last, rows = plan.ranges
        _reduce_kernel[(len(idx),)](partial, first, last, out, rows)
    return out


def compile_configs():
    """Every launch configuration spkern.compile_check compiles."""
    names = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16"}
    sig = {n: "*i64" for n in ("A_PTRS", "B_PTRS", "WORK_T", "WORK_START", "WORK_END")} | {"PARTIAL": "*fp32"}
    for a in names:
        for b in (None, *names):
            yield (_chunk_kernel, sig, dict(A_TY=a, B_TY=b or a, HAS_B=b is not None, BLOCK=_CHUNK_BLOCK), 4,
                   f"a {names[a]}" + (f" b {names[b]}" if b is not None else ""))
    yield (_reduce_kernel, {"PARTIAL": "*fp32", "FIRST": "*i64", "LAST": "*i64", "OUT": "*fp32", "OUT_ROWS": "*i64"},
           {}, 4, "")
