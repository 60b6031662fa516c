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


@triton.jit
def _paired_linear_kernel(X, W, W0, Y, Z, M, N, K, sxm, sxk, swn, swk, s0n, s0k,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Y = X W^T and Z = X W0^T for one (BM, BN) tile: each tile of X is loaded once and
    multiplied with both weights in the same order, so that Y - Z = X (W - W0)^T is as
    accurate as the products themselves (the RCC's effective update)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM).to(tl.int64)
    rn = tl.program_id(1) * BN + tl.arange(0, BN).to(tl.int64)
    acc_y = tl.zeros((BM, BN), tl.float32)
    acc_z = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK).to(tl.int64)
        kmask = rk < K
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm < M)[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        wmask = kmask[:, None] & (rn < N)[None, :]
        w = tl.load(W + rn[None, :] * swn + rk[:, None] * swk, mask=wmask, other=0.0).to(tl.float32)
        w0 = tl.load(W0 + rn[None, :] * s0n + rk[:, None] * s0k, mask=wmask, other=0.0).to(tl.float32)
        # float32 products (no TF32): the difference of the two must stay accurate
        acc_y = tl.dot(x, w, acc_y, input_precision="ieee")
        acc_z = tl.dot(x, w0, acc_z, input_precision="ieee")
    offs = rm[:, None] * N + rn[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(Y + offs, acc_y, mask=mask)
    tl.store(Z + offs, acc_z, mask=mask)


def paired_linear(x, weight, weight0):
    """(x W^T, x W0^T) in float32 for x (M, K), W and W0 (N, K): one pass over x."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=torch.float32)
    z = torch.empty(M, N, device=x.device, dtype=torch.float32)
    if M == 0 or N == 0:
        return y, z
    bm = 16 if M <= 16 else 64
    bn, bk = 64, 32
    _paired_linear_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        x, weight, weight0, y, z, M, N, K, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        weight0.stride(0), weight0.stride(1), BM=bm, BN=bn, BK=bk)
    return y, z
