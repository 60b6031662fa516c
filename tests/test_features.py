"""spkern.pair_stats (and multi_pair_stats, many pairs in one call) against the float64 reference,
per backend, dtype and shape."""

import pytest
import torch

import spkern
from spkern.features import pair_stats_reference

SHAPES = [(1, 1), (3, 7), (37, 129), (5, 1100), (2, 3, 50)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    a = torch.where(torch.rand(shape, generator=g) < 0.3, torch.zeros_like(a), a)  # some exact zeros
    b = a + 0.1 * torch.randn(shape, generator=g)
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_b", [True, False])
def test_against_reference(backend, shape, dtype, with_b):
    a, b = _pair(shape, dtype)
    a_before, b_before = a.clone(), b.clone()
    total, rows = spkern.pair_stats(a, b if with_b else None, per_row=True)
    a2 = a.reshape(-1, shape[-1])
    ref_rows = pair_stats_reference(a2, b.reshape(-1, shape[-1]) if with_b else None).double()
    assert rows.dtype == torch.float64 and rows.shape == (a2.shape[0], 5)
    torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total.double(), ref_rows.sum(0), rtol=1e-5, atol=1e-5)
    assert total[4].item() == (a == 0).sum().item()
    assert torch.equal(a, a_before) and torch.equal(b, b_before)


@pytest.mark.parametrize("scale", [1e30, 1e19, 1e-20, 1e-40], ids=str)
@pytest.mark.parametrize("n", [5, 1100])
def test_overflow_and_underflow_safe(backend, scale, n):
    # float32 squares of 1e30 overflow and of 1e-20 underflow; rows of ordinary values
    # beside them keep their fast-path sums
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, n, generator=g)
    b = a + 0.5 * torch.randn(4, n, generator=g)
    a[1], b[1] = a[1] * scale, b[1] * scale
    a[2, 0] = scale  # one extreme entry in an ordinary row
    a[3] = 0.0  # a dead row: no recomputation needed, exact zeros
    for with_b in (True, False):
        total, rows = spkern.pair_stats(a, b if with_b else None, per_row=True)
        ref = pair_stats_reference(a, b if with_b else None)
        assert torch.isfinite(rows).all() and torch.isfinite(total).all()
        torch.testing.assert_close(rows, ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(total, ref.sum(0), rtol=1e-5, atol=0)


def test_columns_and_default_is_total():
    a, b = _pair((4, 10), torch.float32)
    t = spkern.pair_stats(a, b)
    assert t.shape == (5,) and t.dtype == torch.float64
    assert spkern.features.PAIR_COLUMNS == ("a_sq", "b_sq", "diff_sq", "dot", "zeros")
    torch.testing.assert_close(t[2], (a - b).double().square().sum(), rtol=1e-6, atol=0)


def test_compiles_without_graph_break():
    a, b = _pair((8, 33), torch.float32)
    f = torch.compile(lambda x, y: spkern.pair_stats(x, y) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(a, b), spkern.pair_stats(a, b) * 2)


@pytest.mark.parametrize("a, b, error, match", [
    (torch.ones(3, 4), torch.ones(3, 5), ValueError, "shape"),
    (torch.ones(3, 4), torch.ones(3, 4, dtype=torch.float64), ValueError, "dtype"),
    (torch.ones(3, 4, dtype=torch.long), None, TypeError, "floating"),
    ("x", None, TypeError, "a must be"),
    (torch.ones(3, 4), [1.0], TypeError, "b must be"),
])
def test_bad_input(a, b, error, match):
    with pytest.raises(error, match=match):
        spkern.pair_stats(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_pair_stats_against_reference(backend, dtype):
    # pairs of several shapes (one without rows, rows that are not a multiple of the tile,
    # a vector) in one call; with and without b; row i is pair_stats of pair i
    shapes = [(3, 7), (0, 5), (37, 1100), (2, 3, 50), (9,), (1, 1)]
    pairs = []
    for i, shape in enumerate(shapes):
        a, b = _pair(shape, dtype, seed=i)
        pairs.append((a, b if i % 2 == 0 else None))
    before = [(a.clone(), None if b is None else b.clone()) for a, b in pairs]
    got = spkern.features.multi_pair_stats(pairs)
    assert got.shape == (len(pairs), 5) and got.dtype == torch.float64
    for i, (a, b) in enumerate(pairs):
        rows = a.reshape(-1, a.shape[-1]) if a.dim() > 1 else a.reshape(1, -1)
        ref = pair_stats_reference(rows, None if b is None else b.reshape(rows.shape)).sum(0)
        torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-5)
        assert got[i, 4].item() == (a == 0).sum().item()
    for (a, b), (a0, b0) in zip(pairs, before):
        assert torch.equal(a, a0) and (b is None or torch.equal(b, b0))


def test_multi_pair_stats_mixed_dtypes_and_overflow():
    # each pair its own dtype; a row of 1e30 entries is summed in float64 there as in pair_stats
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 300, generator=g)
    a[1] *= 1e30
    pairs = [(a, a * 0.5), (a[:2].bfloat16(), None), (torch.randn(5, 17, generator=g).half(), None)]
    got = spkern.features.multi_pair_stats(pairs)
    assert torch.isfinite(got).all()
    for i, (x, y) in enumerate(pairs):
        torch.testing.assert_close(got[i], spkern.pair_stats(x, y), rtol=1e-6, atol=0)


def test_multi_pair_stats_same_for_any_thread_count():
    pairs = [_pair((64, 2048), torch.float32, seed=s) for s in range(3)] + [(torch.randn(64, 10), None)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = spkern.features.multi_pair_stats(pairs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(spkern.features.multi_pair_stats(pairs), one)


@pytest.mark.parametrize("pairs, error, match", [
    ([], ValueError, "at least one"),
    ([(torch.ones(3, 4), torch.ones(3, 5))], ValueError, r"pairs\[0\]: b has shape"),
    ([(torch.ones(2), None), (torch.ones(3, 4), torch.ones(3, 4, dtype=torch.float64))], ValueError,
     r"pairs\[1\]: b has dtype"),
    ([(torch.ones(3, dtype=torch.long), None)], TypeError, "floating"),
    ([(torch.ones(3, 4), "b")], TypeError, "b must be"),
    ([(torch.ones(3), None), (torch.ones(3, device="meta"), None)], ValueError, r"pairs\[1\] is on device meta"),
])
def test_multi_pair_stats_bad_input(pairs, error, match):
    with pytest.raises(error, match=match):
        spkern.features.multi_pair_stats(pairs)


@pytest.mark.parametrize("shape", [(1, 5, 3), (17, 70, 33), (4, 2, 65, 40)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paired_linear(backend, shape, dtype):
    *lead, k, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    w0 = (w.float() + 1e-3 * torch.randn(n, k, generator=g)).to(dtype)
    y, z = spkern.features.paired_linear(x, w, w0)
    assert y.dtype == z.dtype == torch.float32 and y.shape == (*lead, n)
    x64 = x.double()
    tol = dict(rtol=1e-5, atol=1e-4)  # (float32 products of the exact values, whatever the dtype)
    torch.testing.assert_close(y.double(), x64 @ w.double().t(), **tol)
    torch.testing.assert_close(z.double(), x64 @ w0.double().t(), **tol)
    eff = x64 @ (w.double() - w0.double()).t()  # the difference is the effective update, to float32 rounding
    assert ((y - z).double() - eff).abs().max() < 1e-4 * eff.abs().max() + 2e-6 * y.abs().max()
    # one product alone is the first of a pair, bitwise; an input of another dtype than the
    # weights (autocast's bfloat16 activations) is taken exactly
    assert torch.equal(spkern.features.paired_linear(x, w), y)
    assert torch.equal(spkern.features.paired_linear(x, w0), spkern.features.paired_linear(x, w, w0)[1])
    y32 = spkern.features.paired_linear(x, w.float())
    torch.testing.assert_close(y32.double(), x64 @ w.double().t(), **tol)


def test_paired_linear_bad_input():
    with pytest.raises(ValueError, match="features"):
        spkern.features.paired_linear(torch.ones(2, 3), torch.ones(4, 5), torch.ones(4, 5))
    with pytest.raises(ValueError, match="one shape"):
        spkern.features.paired_linear(torch.ones(2, 3), torch.ones(4, 3), torch.ones(5, 3))
    with pytest.raises(TypeError, match="weight0"):
        spkern.features.paired_linear(torch.ones(2, 3), torch.ones(4, 3), torch.ones(4, 3, dtype=torch.long))


@pytest.mark.parametrize("rows", [3, 16, 64, 65])
def test_paired_linear_cpu_few_rows_against_a_large_weight(rows):
    # few rows and a large weight take the W x^T product; both products round alike
    pytest.importorskip("spkern._C")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 1024, generator=g)
    w = torch.randn(600, 1024, generator=g) / 32
    w0 = w + 1e-3 * torch.randn(600, 1024, generator=g)
    with spkern.use_backend("cpu"):
        y, z = spkern.features.paired_linear(x, w, w0)
        same = spkern.features.paired_linear(x, w, w.clone())
    assert y.is_contiguous() and z.is_contiguous() and y.shape == (rows, 600)
    x64 = x.double()
    torch.testing.assert_close(y.double(), x64 @ w.double().t(), rtol=1e-5, atol=1e-4)
    eff = x64 @ (w.double() - w0.double()).t()
    assert ((y - z).double() - eff).abs().max() < 1e-4 * eff.abs().max() + 1e-5
    assert torch.equal(same[0], same[1])
