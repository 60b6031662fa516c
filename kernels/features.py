"""Statistics of activation pairs, Triton: per row of a (current) and b (reference),
||a||^2, ||b||^2, ||a - b||^2, <a, b> and the number of exact zeros of a.

Each program takes BLOCK_R rows and walks their features in BLOCK_F columns, keeping
float32 partial sums per lane, then reduces across lanes once at the end.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _pair_stats_kernel(A, B, OUT, rows, n, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = r < rows
    aa = tl.zeros((BLOCK_R, BLOCK_F), tl.float32)
    bb = tl.zeros((BLOCK_R, BLOCK_F), tl.float32)
    dd = tl.zeros((BLOCK_R, BLOCK_F), tl.float32)
    ab = tl.zeros((BLOCK_R, BLOCK_F), tl.float32)
    zz = tl.zeros((BLOCK_R, BLOCK_F), tl.float32)
    for f0 in range(0, n, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        mask = rmask[:, None] & (f < n)[None, :]
        offs = r[:, None] * n + f[None, :]
        x = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        aa += x * x
        zz += tl.where(mask & (x == 0.0), 1.0, 0.0)
        if HAS_B:
            y = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
            d = x - y
            bb += y * y
            dd += d * d
            ab += x * y
    if not HAS_B:
        dd = aa
    o = OUT + r * 5
    tl.store(o, tl.sum(aa, 1), mask=rmask)
    tl.store(o + 1, tl.sum(bb, 1), mask=rmask)
    tl.store(o + 2, tl.sum(dd, 1), mask=rmask)
    tl.store(o + 3, tl.sum(ab, 1), mask=rmask)
    tl.store(o + 4, tl.sum(zz, 1), mask=rmask)


def pair_stats(a, b=None):
    """Same contract as spkern._C.pair_stats_cpu: (rows, 5) float32 per-row statistics of
    contiguous (rows, features) a and b (same shape and dtype; None: b = 0)."""
    rows, n = a.shape
    out = torch.empty(rows, 5, device=a.device, dtype=torch.float32)
    if rows == 0:
        return out
    block_f = min(1024, triton.next_power_of_2(max(n, 1)))
    block_r = max(1, min(16, 4096 // block_f))
    _pair_stats_kernel[(triton.cdiv(rows, block_r),)](
        a, b if b is not None else a, out, rows, n, HAS_B=b is not None, BLOCK_R=block_r, BLOCK_F=block_f)
    return out
