"""Statistics of activation pairs, Triton: per row of a (current) and b (reference),
||a||^2, ||b||^2, ||a - b||^2, <a, b> and the number of exact zeros of a.

Each program takes BLOCK_R rows and walks their features in BLOCK_F columns, keeping
float32 partial sums per lane, then reduces across lanes once at the end; a row whose
float32 sums overflowed or underflowed is summed again in float64. Output in float64.
"""

import torch
import triton
import triton.language as tl

from spkern.constants import Sum

A_SQ, B_SQ, DIFF_SQ, DOT, ZEROS = (tl.constexpr(int(c)) for c in Sum)
NCOL = tl.constexpr(len(Sum))


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
    s_aa = tl.sum(aa, 1).to(tl.float64)
    s_bb = tl.sum(bb, 1).to(tl.float64)
    s_dd = tl.sum(dd, 1).to(tl.float64)
    s_ab = tl.sum(ab, 1).to(tl.float64)
    s_zz = tl.sum(zz, 1)
    # A float32 sum that overflowed (entries beyond ~1e18) or squares that underflowed
    # (entries below ~1e-15): these rows again in float64 (rare; the fast path stays float32).
    big = (tl.abs(s_aa) + tl.abs(s_bb) + tl.abs(s_dd) + tl.abs(s_ab)) > 1e37
    tiny = ((s_aa < 1e-30) & (s_zz < n)) | ((s_bb < 1e-30) & (s_bb > 0.0))
    again = rmask & (big | tiny | (s_aa != s_aa) | (s_ab != s_ab))
    if tl.max(again.to(tl.int32), 0) > 0:
        # (BLOCK_R,) accumulators, reduced per tile: few registers for a path seldom taken
        aa64 = tl.zeros((BLOCK_R,), tl.float64)
        bb64 = tl.zeros((BLOCK_R,), tl.float64)
        dd64 = tl.zeros((BLOCK_R,), tl.float64)
        ab64 = tl.zeros((BLOCK_R,), tl.float64)
        for f0 in range(0, n, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            mask = again[:, None] & (f < n)[None, :]
            offs = r[:, None] * n + f[None, :]
            x = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
            aa64 += tl.sum(x * x, 1)
            if HAS_B:
                y = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
                bb64 += tl.sum(y * y, 1)
                dd64 += tl.sum((x - y) * (x - y), 1)
                ab64 += tl.sum(x * y, 1)
        s_aa = tl.where(again, aa64, s_aa)
        s_bb = tl.where(again, bb64, s_bb)
        s_dd = tl.where(again, dd64, s_dd)
        s_ab = tl.where(again, ab64, s_ab)
    if not HAS_B:
        s_dd = s_aa
    o = OUT + r * NCOL
    tl.store(o + A_SQ, s_aa, mask=rmask)
    tl.store(o + B_SQ, s_bb, mask=rmask)
    tl.store(o + DIFF_SQ, s_dd, mask=rmask)
    tl.store(o + DOT, s_ab, mask=rmask)
    tl.store(o + ZEROS, s_zz.to(tl.float64), mask=rmask)


def _pair_blocks(n):
    """(rows, features) of a program's block for rows of n features."""
    block_f = min(1024, triton.next_power_of_2(max(n, 1)))
    return max(1, min(16, 4096 // block_f)), block_f


def pair_stats(a, b=None):
    """Same contract as spkern._C.pair_stats_cpu: (rows, 5) float64 per-row statistics of
    contiguous (rows, features) a and b (same shape and dtype; None: b = 0)."""
    rows, n = a.shape
    out = torch.empty(rows, 5, device=a.device, dtype=torch.float64)
    if rows == 0:
        return out
    block_r, block_f = _pair_blocks(n)
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


def _paired_blocks(M):
    return (16 if M <= 16 else 64), 64, 32


def paired_linear(x, weight, weight0):
    """(x W^T, x W0^T) in float32 for x (M, K), W and W0 (N, K): one pass over x."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=torch.float32)
    z = torch.empty(M, N, device=x.device, dtype=torch.float32)
    if M == 0 or N == 0:
        return y, z
    bm, bn, bk = _paired_blocks(M)
    _paired_linear_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        x, weight, weight0, y, z, M, N, K, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        weight0.stride(0), weight0.stride(1), BM=bm, BN=bn, BK=bk)
    return y, z


def compile_configs():
    """Every launch configuration spkern.compile_check compiles."""
    for dt in ("fp32", "bf16", "fp16"):
        for n in (8, 256, 4096):
            block_r, block_f = _pair_blocks(n)
            for has_b in (True, False):
                sig = {"A": f"*{dt}", "B": f"*{dt}", "OUT": "*fp64", "rows": "i32", "n": "i32"}
                yield (_pair_stats_kernel, sig, dict(HAS_B=has_b, BLOCK_R=block_r, BLOCK_F=block_f), 4,
                       f"{dt} n={n}" + (" b" if has_b else ""))
        for w0 in ("fp32", "bf16", "fp16"):
            for M in (16, 256):
                bm, bn, bk = _paired_blocks(M)
                sig = {"X": f"*{dt}", "W": f"*{dt}", "W0": f"*{w0}", "Y": "*fp32", "Z": "*fp32",
                       **{k: "i32" for k in ("M", "N", "K", "sxm", "sxk", "swn", "swk", "s0n", "s0k")}}
                yield _paired_linear_kernel, sig, dict(BM=bm, BN=bn, BK=bk), 4, f"{dt} W0 {w0} M={M}"
