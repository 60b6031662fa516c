"""Norms of many tensors in one launch, and operator norms by warm-started Lanczos.

Definitions (all norms of a tensor flattened to a vector unless said otherwise):

    fro(A)   = sqrt(sum_ij A_ij^2)                 Frobenius norm
    rms(A)   = fro(A) / sqrt(numel(A))
    op(A)    = largest singular value of the matrix A (spectral norm)
    rms_op(A) = sqrt(fan_in / fan_out) * op(A)      the RMS-to-RMS operator norm of a
               (fan_out, fan_in) weight: how much it scales the RMS of an input vector

:func:`multi_tensor_norms` returns the squared sums from which these follow, per tensor,
without a host sync; :func:`spectral_norm` returns op and rms_op.
"""

import functools
import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from spkern import registry
from spkern.distributed import check_like, check_summable, is_dtensor, local, matrix_split, sharded_gram, sum_over_shards

# ---------------------------------------------------------------------------------------
# multi-tensor pair norms
# ---------------------------------------------------------------------------------------

from spkern.constants import NORM_COLUMNS, Sum  # ||a||^2, ||b||^2, ||a - b||^2, <a, b>


def multi_tensor_norms_reference(a, b):
    """Float64 reference: (T, 4) rows of ||a||^2, ||b||^2, ||a-b||^2, <a,b> (b = 0 if empty)."""
    rows = []
    for i, x in enumerate(a):
        x = x.double().reshape(-1)
        y = b[i].double().reshape(-1) if b else torch.zeros_like(x)
        row = [None] * len(NORM_COLUMNS)
        row[Sum.A_SQ], row[Sum.B_SQ] = x.square().sum(), y.square().sum()
        row[Sum.DIFF_SQ], row[Sum.DOT] = (x - y).square().sum(), x.dot(y)
        rows.append(torch.stack(row))
    device = a[0].device if a else torch.device("cpu")
    return torch.stack(rows).float() if rows else torch.zeros(0, 4, device=device)


@torch.library.custom_op("spkern::multi_tensor_norms", mutates_args=())
def _multi_tensor_norms_op(a: list[Tensor], b: list[Tensor]) -> Tensor:
    if not a:
        return torch.zeros(0, 4)
    # one backend for the whole list: the first tensor the kernels cannot take decides
    probe = next((t for t in list(a) + list(b) if t.dtype not in registry.KERNEL_DTYPES), a[0])
    return registry.resolve("multi_tensor_norms", probe).fn(list(a), list(b))


@_multi_tensor_norms_op.register_fake
def _(a, b):
    return a[0].new_empty((len(a), 4), dtype=torch.float32) if a else torch.empty(0, 4)


def multi_tensor_norms(a: Sequence[Tensor], b: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Per-tensor squared norms of many tensors (for example all parameters of a model)
    in one pass: a float32 tensor of shape ``(len(a), 4)`` on their device, with the
    columns of :data:`NORM_COLUMNS` (read them by name, ``out[:, spkern.Sum.DIFF_SQ]``):
    ``||a_i||^2``, ``||b_i||^2``, ``||a_i - b_i||^2``, ``<a_i, b_i>`` (``b_i = 0`` when
    ``b`` is None). Nothing is read back to the host.

    ``a_i`` and ``b_i`` must have the same number of elements and may differ in dtype
    (float32, bfloat16, float16; for example weights and their initial values kept in
    bfloat16). Sums accumulate in float32 per chunk and float64 across chunks.

    DTensors (FSDP2's sharded parameters, say) give the whole tensors' sums: each rank
    sums its local shards, and the rows of sharded tensors are added over the ranks in one
    all-reduce for the list (replicated ones counted once); ``b_i`` must then be placed as
    ``a_i``. Every rank of the mesh must call it with the same list.
    """
    a = list(a)
    if not all(isinstance(t, Tensor) for t in a):
        raise TypeError("a must be a sequence of Tensors")
    b_list = [] if b is None else list(b)
    if b is not None:
        if not all(isinstance(t, Tensor) for t in b_list):
            raise TypeError("b must be None or a sequence of Tensors")
        if len(b_list) != len(a):
            raise ValueError(f"b has {len(b_list)} tensors but a has {len(a)}")
    for name, seq in (("a", a), ("b", b_list)):
        for i, t in enumerate(seq):
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}] must be floating point, got {t.dtype}")
            if a and t.device != a[0].device:
                raise ValueError(f"{name}[{i}] is on device {t.device} but a[0] is on device {a[0].device}")
    for i, (x, y) in enumerate(zip(a, b_list)):
        if x.numel() != y.numel():
            raise ValueError(f"b[{i}] has {y.numel()} elements but a[{i}] has {x.numel()} "
                             f"(shapes {tuple(y.shape)} and {tuple(x.shape)})")
    if any(is_dtensor(t) for t in a + b_list):
        for i, t in enumerate(a):
            check_summable(t, f"a[{i}]")  # any dimensions: the sums add up
            if b_list:
                check_like(b_list[i], t, f"b[{i}]", f"a[{i}]")
        out = torch.ops.spkern.multi_tensor_norms([local(t).detach().contiguous() for t in a],
                                                  [local(t).detach().contiguous() for t in b_list])
        return sum_over_shards(out, a)
    a = [t.detach().contiguous() for t in a]
    b_list = [t.detach().contiguous() for t in b_list]
    return torch.ops.spkern.multi_tensor_norms(a, b_list)


# ---------------------------------------------------------------------------------------
# operator norms
# ---------------------------------------------------------------------------------------


class SpectralNorm(NamedTuple):
    """Result of :func:`spectral_norm`; ``state`` warm-starts the next call."""

    op: Tensor  # largest singular value, float32 scalar on the matrix's device
    rms_op: Tensor  # sqrt(fan_in / fan_out) * op
    state: Tensor  # (fan_in,) float32 unit vector: the estimated top right singular vector
    iters: Optional[int] = None  # products with A^T A used (Lanczos steps)


COLD_ITERS = 50
WARM_ITERS = 4


def spectral_norm(matrix: Tensor, state: Optional[Tensor] = None, iters: Optional[int] = None, *,
                  minus: Optional[Tensor] = None, tol: Optional[float] = None,
                  max_iters: int = 200, product: Optional[Tensor] = None) -> SpectralNorm:
    """Operator (spectral) norm of ``matrix - minus`` (``minus`` None: of ``matrix``) by
    Lanczos on ``A^T A`` (:func:`lanczos`), without a host sync and without forming ``A^T A``.

    Args:
        matrix: ``(fan_out, fan_in)``; more dimensions are flattened to
            ``(shape[0], -1)`` as for convolution weights.
        state: the ``state`` of the previous call on the same (slowly changing) matrix:
            its top right singular vector (the Ritz vector), so that a few steps suffice.
        iters: products with ``A^T A`` (Lanczos steps); default 50 from a cold start, 4
            from a warm one.
        minus: a matrix of the same shape (for example the initial weights W_0, in any
            float dtype); ``matrix - minus`` is never materialised: each product is
            ``matrix v - minus v``.
        tol: None (default): exactly ``iters`` steps, no host sync. A relative tolerance:
            rounds of ``iters`` steps, each restarted from the last Ritz vector, until two
            rounds' estimates agree to ``tol`` (one host read per round), at most
            ``max_iters`` steps in all; ``result.iters`` says how many were used.
        product: ``A^T A state``, when it is already computed (by :mod:`spkern.optim`'s
            CPU step, from the rows it writes: :meth:`spkern.optim.SGD.request_products`):
            the first step uses it instead of a pass over the matrix.

    Each step is one product with ``A^T A`` (A = matrix - minus): O(fan_out * fan_in),
    against O(fan_out * fan_in * min(...)) for an SVD. On CPU it is one pass over the
    matrix and ``minus`` (csrc/cpu/gram.cpp: each row is used for A v and A^T A v while
    it is in cache), elsewhere two matrix-vector products with each. The estimate, the
    square root of the largest Ritz value of the steps' Krylov space, never exceeds the
    true norm and approaches it from below.

    A DTensor ``matrix`` (FSDP2's sharded weights) is never gathered: each rank multiplies
    with its own rows (``Shard(0)``: ``A^T A v`` is the sum over the ranks of
    ``A_r^T A_r v``) or columns (``Shard(1)``: iterated on ``A A^T``, and ``state`` is then
    the top *left* singular vector, ``(fan_out,)``), with one all-reduce of the vector per
    iteration; ``minus`` must then be placed as ``matrix``. Every rank gets the same result
    and must make the same call.
    """
    if not isinstance(matrix, Tensor) or not matrix.is_floating_point():
        raise TypeError("matrix must be a floating-point Tensor")
    if matrix.dim() < 2:
        raise ValueError(f"matrix must have at least 2 dimensions, got shape {tuple(matrix.shape)}")
    if is_dtensor(matrix) or is_dtensor(minus):
        return _sharded_spectral_norm(matrix, state, iters, minus, tol, max_iters)
    gram, v, n_iter, product, fan_ratio = _prepared(matrix, state, iters, minus, product)
    return converged(gram, v, n_iter, fan_ratio, tol, max_iters, product)


def _prepared(matrix, state, iters, minus, product):
    """spectral_norm's checked call: (x -> A^T A x, start vector, steps, product or None,
    fan_in / fan_out)."""
    A = matrix.detach().reshape(matrix.shape[0], -1)
    fan_out, fan_in = A.shape
    B = None
    if minus is not None:
        if not isinstance(minus, Tensor) or minus.numel() != matrix.numel() or minus.shape[0] != matrix.shape[0]:
            raise ValueError(f"minus must have the shape of matrix {tuple(matrix.shape)}, got "
                             f"{tuple(minus.shape) if isinstance(minus, Tensor) else type(minus).__name__}")
        if minus.device != matrix.device:
            raise ValueError(f"minus is on device {minus.device} but matrix is on device {matrix.device}")
        B = minus.detach().reshape(fan_out, fan_in)
    v, n_iter = start_vector(fan_in, A.device, state, iters)
    if product is not None:
        if state is None:
            raise ValueError("product is A^T A state: it needs the state it was computed from")
        if not isinstance(product, Tensor) or product.shape != (fan_in,) or product.device != A.device:
            raise ValueError(f"product must be a ({fan_in},) vector on {A.device}, got "
                             f"{tuple(product.shape) if isinstance(product, Tensor) else type(product).__name__}")
        product = product.float()
    return registry.resolve("spectral_norm", A, B).fn(A, B), v, n_iter, product, fan_in / fan_out


def spectral_norm_steps(matrices: Sequence[Tensor], states: Sequence[Tensor], *,
                        minus: Optional[Sequence[Optional[Tensor]]] = None,
                        products: Optional[Sequence[Optional[Tensor]]] = None) -> list:
    """One warm Lanczos step for each of many matrices: ``[spectral_norm(m, s, 1, minus=b,
    product=p) for ...]`` (the same estimates and states, up to rounding), with the
    estimates and next states of all the matrices computed together, in a few operations
    rather than a few per matrix (a tracker's measurement: one step per layer). ``states``
    are the previous calls' states (a cold start needs :func:`spectral_norm`); ``minus``
    and ``products`` are lists whose entries may be None, as the arguments of
    :func:`spectral_norm`; a product not given is one pass over its matrix. Matrices that
    are DTensors, or not all on one device, take :func:`spectral_norm` one by one."""
    L = len(matrices)
    minus = list(minus) if minus is not None else [None] * L
    products = list(products) if products is not None else [None] * L
    if not (len(states) == len(minus) == len(products) == L):
        raise ValueError(f"states, minus and products must have one entry per matrix ({L})")
    for m in matrices:
        if not isinstance(m, Tensor) or not m.is_floating_point() or m.dim() < 2:
            raise TypeError("matrices must be floating-point Tensors of at least 2 dimensions")
    if any(s is None for s in states):
        raise ValueError("spectral_norm_steps continues warm estimates: every state must be given")
    if L == 0:
        return []
    if (any(is_dtensor(m) or is_dtensor(b) for m, b in zip(matrices, minus))
            or len({m.device for m in matrices}) > 1):
        return [spectral_norm(m, s, 1, minus=b, product=p) for m, s, b, p in zip(matrices, states, minus, products)]
    op, rms, states = _steps(matrices, states, minus, products)
    return [SpectralNorm(o, r, s, 1) for o, r, s in zip(op.unbind(0), rms.unbind(0), states)]


def _steps(matrices, states, minus, products):
    """spectral_norm_steps of plain tensors on one device: (op (L,), rms_op (L,), states)."""
    ws, vs, ratios = [], [], []
    for m, s, b, p in zip(matrices, states, minus, products):
        gram, v, _, p, ratio = _prepared(m, s, 1, b, p)
        vs.append(v)
        ws.append(gram(v) if p is None else p)
        ratios.append(ratio)
    return _lanczos_step_many(ws, vs, ratios)


def _lanczos_step_many(ws, vs, fan_ratios):
    """:func:`lanczos` with one step (the estimate |A^T A v|^2 / |A v|^2 and the next state
    A^T A v / |A^T A v|) of many operators at once, given w = A^T A v of each: float64 sums
    (no squares overflow or underflow), one operation for all of them at each stage;
    (op (L,), rms_op (L,), states)."""
    sizes = [v.numel() for v in vs]
    lengths, ratios = _segments(tuple(sizes), tuple(fan_ratios), vs[0].device)
    w, v = torch.cat(ws), torch.cat(vs)
    wd = w.double()
    sums = torch.segment_reduce(torch.stack([wd * v.double(), wd * wd], 1), "sum", lengths=lengths, axis=0)
    a, nsq = sums.unbind(1)  # |A v|^2, |A^T A v|^2
    op = (nsq / a).where((a > 0) | a.isnan() | nsq.isnan(), 0.0).sqrt().float()  # (a NaN in A: NaN)
    scale = torch.repeat_interleave(nsq.rsqrt().where(nsq > 0, 0.0).float(), lengths, output_size=w.numel())
    u = (w * scale).where(scale > 0, v)  # (A = 0: keep v, a valid start for later calls)
    return op, op * ratios, u.split(sizes)


@functools.lru_cache(maxsize=64)
def _segments(sizes, fan_ratios, device):
    """The lengths of vectors laid end to end, and sqrt(fan_in / fan_out) of each matrix."""
    return (torch.tensor(sizes, device=device),
            torch.tensor(fan_ratios, dtype=torch.float32, device=device).sqrt())


def _sharded_spectral_norm(matrix, state, iters, minus, tol=None, max_iters=200):
    split = matrix_split(matrix, "matrix")
    if minus is not None:
        if not isinstance(minus, Tensor) or minus.shape != matrix.shape:
            raise ValueError(f"minus must have the shape of matrix {tuple(matrix.shape)}, got "
                             f"{tuple(minus.shape) if isinstance(minus, Tensor) else type(minus).__name__}")
        check_like(minus, matrix, "minus", "matrix")
    fan_out = matrix.shape[0]
    fan_in = matrix.numel() // max(fan_out, 1)
    rows = local(matrix).shape[0]  # the rank's rows and columns of the (fan_out, fan_in) view
    A = local(matrix).detach().reshape(rows, split.cols)
    B = local(minus).detach().reshape(rows, split.cols) if minus is not None else None

    def forward(x):  # (A - B) x, of the rank's block
        return A.float() @ x if B is None else A.float() @ x - B.float() @ x

    def backward(y):
        return A.t().float() @ y if B is None else A.t().float() @ y - B.t().float() @ y
    local_gram = (registry.resolve("spectral_norm", A, B).fn(A, B) if A.numel()
                  else lambda x: torch.zeros_like(x))  # an empty shard adds nothing
    gram = sharded_gram(split, fan_in, forward, backward, local_gram)
    v, n_iter = start_vector(fan_in, A.device, state, iters)
    return converged(gram, v, n_iter, fan_in / max(fan_out, 1), tol, max_iters)


def start_vector(fan_in: int, device, state: Optional[Tensor], iters: Optional[int]):
    """The checked start of a power iteration: (unit vector, iterations)."""
    if iters is not None and (not isinstance(iters, int) or iters < 1):
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if state is not None:
        if not isinstance(state, Tensor) or state.shape != (fan_in,):
            raise ValueError(f"state must be the ({fan_in},) vector returned with a previous result, got "
                             f"{tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__}")
        v = state.to(device=device, dtype=torch.float32)
    else:
        g = torch.Generator(device=device).manual_seed(0)
        v = torch.randn(fan_in, device=device, dtype=torch.float32, generator=g)
        v = v / v.norm()
    return v, iters or (WARM_ITERS if state is not None else COLD_ITERS)


def lanczos(gram, v: Tensor, steps: int, fan_ratio: float, first: Optional[Tensor] = None) -> SpectralNorm:
    """Top singular value of an operator A given by ``gram``: x -> A^T A x, by ``steps``
    Lanczos steps from the unit vector v (each one product with A^T A, as a power iteration,
    and a full re-orthogonalisation against the previous vectors: O(steps * fan_in) more).

    The k steps give an orthonormal basis Q of the Krylov space spanned by v, A^T A v, ...,
    the tridiagonal T = Q^T A^T A Q and the last residual r, with A^T A Q = Q T + r e_k^T.
    The estimate is the largest Rayleigh quotient of A A^T on the space spanned by A Q:
    the largest theta with (T^2 + |r|^2 e_k e_k^T) c = theta T c, from the same products
    (the plain Lanczos estimate, the largest eigenvalue of T, is the quotient of A^T A on Q;
    this one sees half a step further). It is a Rayleigh quotient, so the estimate never
    exceeds the norm; with one step it is |A^T A v|^2 / |A v|^2, against |A v|^2 of the
    Ritz value and |A^T A v| of a power iteration, and it is much closer to the norm than
    either when the top singular values are close (bench/bench_op_norm.py). The next state
    is A^T A Q c, normalised: the best vector of the space, one power step further. No host
    sync: on a device the small problem is solved without one (Cholesky, then the top
    eigenvector by repeated squaring). ``first``: ``gram(v)``, already computed."""
    tiny = torch.finfo(torch.float32).tiny
    k = steps
    if k == 1:  # (the tracker's default: a few operations)
        w = gram(v) if first is None else first
        a, norm = w @ v, _norm(w)  # |A v|^2, |A^T A v|
        theta = torch.where(a > 0, norm * (norm / a.clamp_min(tiny)), 0.0)  # (no |A^T A v|^2: it overflows first)
        u = torch.where(norm > 0, w / norm.clamp_min(tiny), v)  # (A = 0: keep v, a valid start for later calls)
        return _result(theta.clamp_min(0).sqrt(), u, v, w, fan_ratio, k)
    V = v.new_zeros(k + 1, v.numel())  # Q and, last, r / |r|
    alpha, beta = v.new_zeros(k), v.new_zeros(k)
    V[0] = v
    for j in range(k):
        w = gram(V[j]) if j or first is None else first
        if j == 0:
            w_first = w
        alpha[j] = w @ V[j]
        Q = V[: j + 1]
        w = w - Q.t() @ (Q @ w)
        w = w - Q.t() @ (Q @ w)  # (twice is enough to stay orthogonal in float32)
        b = _norm(w)
        # an invariant subspace (A^T A v in span(V), A = 0 say): stop growing it
        keep = b > 1e-6 * alpha[: j + 1].abs().max()
        beta[j] = torch.where(keep, b, 0.0)
        V[j + 1] = torch.where(keep, w / b.clamp_min(tiny), torch.zeros_like(w))
    # the small problem scaled by s (its squares would overflow float32 first)
    s = alpha.abs().max().clamp_min(tiny)
    T = (torch.diag(alpha) + torch.diag(beta[: k - 1], 1) + torch.diag(beta[: k - 1], -1)) / s
    N = T @ T  # (A^T A Q)^T (A^T A Q) / s^2 = T^2 + |r / s|^2 e_k e_k^T
    N[k - 1, k - 1] = N[k - 1, k - 1] + (beta[k - 1] / s) ** 2
    # T may be singular (A of rank below k, or 0): the problem is solved on T + eps I
    Tr = T + 1e-6 * torch.eye(k, dtype=T.dtype, device=T.device)
    c = _top_generalized(N, Tr, on_host=T.device.type == "cpu" and bool(torch.isfinite(N).all()))
    theta = s * (c @ (N @ c)) / (c @ (Tr @ c)).clamp_min(tiny)
    theta = torch.where(torch.isfinite(theta), theta, 0.0)
    T = T * s
    u = V[:k].t() @ (T @ c) + (beta[k - 1] * c[k - 1]) * V[k]  # A^T A Q c
    u = torch.where(u @ v < 0, -u, u)  # (the sign of an eigenvector is arbitrary: on v's side)
    norm = _norm(u)
    u = torch.where(norm > 0, u / norm.clamp_min(tiny), v)  # (A = 0: keep v, a valid start for later calls)
    return _result(theta.clamp_min(0).sqrt(), u, v, w_first, fan_ratio, k)


def _result(op, u, v, w, fan_ratio, k):
    """The estimate; NaN where A has a NaN (``w``, a product with A^T A, has one): the
    state then stays ``v``, a valid start once A is finite again."""
    bad = w.isnan().any()
    op = torch.where(bad, torch.full_like(op, float("nan")), op)
    return SpectralNorm(op, op * math.sqrt(fan_ratio), torch.where(bad, v, u), k)


def _norm(w: Tensor) -> Tensor:
    """|w| without overflow or underflow of the squares (|A^T A v| of a tiny or a huge A)."""
    m = w.abs().amax().clamp_min(torch.finfo(w.dtype).tiny)
    return m * (w / m).norm()


def _top_generalized(N: Tensor, T: Tensor, on_host: bool) -> Tensor:
    """The top eigenvector c of N c = theta T c (N symmetric, T positive definite, k x k).
    On the host directly, in float64; on a device without a host sync: T = L L^T, then the
    top eigenvector of L^-1 N L^-T by repeated squaring of its normalised copy."""
    tiny = torch.finfo(torch.float32).tiny
    k = T.shape[0]
    if on_host:
        # on T's range only: where the Krylov space of a matrix of low rank is exhausted, T's
        # smallest eigenvalues are rounding, of either sign (about 1e-6 of the largest), and
        # 1 / sqrt of them would blow the problem up
        d, U = torch.linalg.eigh(T.double())
        kept = (d > 1e-5 * d.max().clamp_min(torch.finfo(torch.float64).tiny)) | (d == d.max())
        S = U[:, kept] / d[kept].clamp_min(torch.finfo(torch.float64).tiny).sqrt()
        return (S @ torch.linalg.eigh(S.t() @ N.double() @ S)[1][:, -1]).to(T.dtype)
    # (on a device: T shifted by 1e-5 of its scale, past the rounding of an exhausted space)
    T = T + 1e-5 * torch.eye(k, dtype=T.dtype, device=T.device)
    L = torch.linalg.cholesky_ex(T)[0]
    Li = torch.linalg.solve_triangular(L, torch.eye(k, dtype=T.dtype, device=T.device), upper=False)
    M = Li @ N @ Li.t()
    M = M / M.diagonal().abs().sum().clamp_min(tiny)
    for _ in range(40):
        M = M @ M
        M = M / M.diagonal().sum().clamp_min(tiny)
    return Li.t() @ M[:, M.norm(dim=0).argmax()]


def converged(gram, v: Tensor, steps: int, fan_ratio: float, tol: Optional[float] = None,
              max_iters: int = 200, first: Optional[Tensor] = None) -> SpectralNorm:
    """:func:`lanczos`; with ``tol``, restarted rounds of ``steps`` until two rounds agree
    to ``tol`` (relative), at most ``max_iters`` steps (see :func:`spectral_norm`);
    ``first`` is ``gram(v)`` when already computed."""
    if tol is not None and (not isinstance(tol, (int, float)) or not 0 < tol < 1):
        raise ValueError(f"tol must be None or a number in (0, 1), got {tol!r}")
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
    r = lanczos(gram, v, min(steps, max_iters), fan_ratio, first)
    if tol is None:
        return r
    used = r.iters
    while used < max_iters:
        nxt = lanczos(gram, r.state, min(steps, max_iters - used), fan_ratio)
        used += nxt.iters
        done = bool(((nxt.op - r.op).abs() <= tol * nxt.op) | nxt.op.isnan())  # (the host read of this round)
        r = nxt
        if done:
            break
    return r._replace(iters=used)


def power_iteration(gram, v: Tensor, iters: int, fan_ratio: float, first: Optional[Tensor] = None) -> SpectralNorm:
    """(The method before :func:`lanczos`, kept as bench/bench_op_norm.py's baseline.)
    Top singular value of an operator A given by ``gram``: x -> A^T A x (one pass over
    A, two matrix-vector products, or an operator rebuilt block by block), from the unit
    vector v; fan_ratio = fan_in / fan_out for the RMS-to-RMS norm. The estimate is
    sqrt(||A^T A v||) for the last v iterated on: at most the norm, since
    ||A^T A v|| <= ||A||^2 for a unit v, and no further product is needed."""
    tiny = torch.finfo(torch.float32).tiny
    for i in range(iters):
        w = gram(v) if i or first is None else first
        norm = w.norm()
        # A = 0 (say W_t - W_0 before the first step): keep v, a valid start for later calls
        v = torch.where(norm > 0, w / norm.clamp_min(tiny), v)
    op = norm.sqrt()
    return SpectralNorm(op, op * math.sqrt(fan_ratio), v, iters)


__all__ = ["NORM_COLUMNS", "SpectralNorm", "multi_tensor_norms", "power_iteration", "spectral_norm",
           "spectral_norm_steps"]
