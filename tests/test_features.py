"""spkern.pair_stats against the float64 reference, per backend, dtype and shape."""

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
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), x64 @ w.double().t(), **tol)
    torch.testing.assert_close(z.double(), x64 @ w0.double().t(), **tol)
    if dtype == torch.float32:  # the difference is the effective update, accurately
        eff = x64 @ (w.double() - w0.double()).t()
        assert ((y - z).double() - eff).abs().max() < 1e-4 * eff.abs().max() + 1e-5


def test_paired_linear_bad_input():
    with pytest.raises(ValueError, match="features"):
        spkern.features.paired_linear(torch.ones(2, 3), torch.ones(4, 5), torch.ones(4, 5))
    with pytest.raises(ValueError, match="one shape"):
        spkern.features.paired_linear(torch.ones(2, 3), torch.ones(4, 3), torch.ones(5, 3))
    with pytest.raises(TypeError, match="weight0"):
        spkern.features.paired_linear(torch.ones(2, 3), torch.ones(4, 3), None)


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
