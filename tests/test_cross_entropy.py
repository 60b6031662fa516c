"""spkern.cross_entropy against PyTorch in float64, on every backend this machine has."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import spkern
from spkern import registry
from spkern.cross_entropy import cross_entropy_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Loss and gradient tolerances per input dtype (outputs are rounded to the input dtype).
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
    torch.float16: dict(rtol=3e-3, atol=3e-4),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}


def torch_reference(x, target, weight=None, ignore_index=-100, reduction="mean",
                    label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The loss written with torch.nn.functional in float64, z_loss and softcap added on top."""
    x = x.double()
    if target.is_floating_point():
        target = target.double()
    if weight is not None:
        weight = weight.double()
    xc = softcap * torch.tanh(x / softcap) if softcap else x
    loss = F.cross_entropy(xc, target, weight=weight, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(xc, dim=1 if x.dim() > 1 else 0)
        if target.is_floating_point():
            valid, denom = torch.ones_like(lse, dtype=torch.bool), lse.numel()
        else:
            valid = target != ignore_index
            denom = (weight[torch.where(valid, target, 0)] * valid).sum() if weight is not None \
                else valid.sum()
        zl = torch.where(valid, z_loss * lse**2, 0.0)
        loss = loss + {"none": zl, "sum": zl.sum(), "mean": zl.sum() / denom}[reduction]
    return loss


def make_inputs(shape, dtype, kind="index", ignore=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    C = shape[0] if len(shape) == 1 else shape[1]
    if kind == "prob":
        target = torch.softmax(torch.randn(shape, generator=g) * 2, dim=0 if len(shape) == 1 else 1)
        return x, target.to(dtype)
    tshape = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = torch.randint(0, C, tshape, generator=g)
    if ignore and target.dim() > 0:
        target.view(-1)[:: 3] = -100
    return x, target


def check_against_torch(x, target, tol, grad_out=None, **kw):
    xs = x.clone().requires_grad_()
    loss = spkern.cross_entropy(xs, target, **kw)
    assert loss.dtype == x.dtype
    xr = x.double().requires_grad_()
    ref = torch_reference(xr, target, **kw)
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss.double(), ref, **tol)
    go = torch.ones_like(ref) if grad_out is None else grad_out
    (g,) = torch.autograd.grad(loss, xs, go.to(loss.dtype))
    (gr,) = torch.autograd.grad(ref, xr, go.double())
    assert g.dtype == x.dtype
    scale = gr.abs().max().item() or 1.0
    torch.testing.assert_close(g.double(), gr, rtol=tol["rtol"], atol=tol["atol"] * scale * 10)


CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(weight=True),
    dict(ignore=True),
    dict(ignore=True, weight=True, reduction="mean"),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.3, weight=True, ignore=True),
    dict(label_smoothing=0.2, reduction="none", ignore=True),
    dict(z_loss=1e-2),
    dict(z_loss=1e-2, ignore=True, weight=True),
    dict(softcap=5.0),
    dict(softcap=4.0, label_smoothing=0.1, z_loss=1e-3, weight=True, ignore=True),
    dict(kind="prob"),
    dict(kind="prob", weight=True, label_smoothing=0.1),
    dict(kind="prob", softcap=3.0, z_loss=1e-2, reduction="sum"),
    dict(ignore_index=2, ignore=False),
]


def _case(case, C, dtype, shape=None, seed=0):
    case = dict(case)
    kind = case.pop("kind", "index")
    ignore = case.pop("ignore", False)
    use_w = case.pop("weight", False)
    x, target = make_inputs(shape or (13, C), dtype, kind, ignore, seed)
    if use_w:
        case["weight"] = torch.rand(C, generator=torch.Generator().manual_seed(seed + 1)) + 0.1
    return x, target, case


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("C", [1, 3, 1000, 4099])
def test_matches_torch_float32(backend, case, C):
    x, target, kw = _case(case, C, torch.float32)
    check_against_torch(x, target, TOL[torch.float32], **kw)


@pytest.mark.parametrize("case", CASES[::2], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_torch_half(backend, case, dtype):
    x, target, kw = _case(case, 517, dtype)
    check_against_torch(x, target, TOL[dtype], **kw)


@pytest.mark.parametrize("C", [50257, 131072])
@pytest.mark.parametrize("case", [dict(), dict(softcap=30.0, label_smoothing=0.1, z_loss=1e-4, ignore=True)],
                         ids=["plain", "all"])
def test_large_vocab(backend, C, case):
    if backend == "triton" and C > 50257:
        pytest.skip("the Triton interpreter is too slow for this size; 50257 covers a partial last block")
    x, target, kw = _case(case, C, torch.float32, shape=(3, C))
    check_against_torch(x, target, TOL[torch.float32], **kw)


@pytest.mark.parametrize("shape", [(4, 7, 3, 5), (2, 11, 6)])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k_dimensional(backend, shape, kind, reduction):
    x, target = make_inputs(shape, torch.float32, kind, ignore=True)
    check_against_torch(x, target, TOL[torch.float32], reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_dimensional_input(backend, kind, reduction):
    x, target = make_inputs((10,), torch.float32, kind)
    check_against_torch(x, target, TOL[torch.float32], reduction=reduction)


def test_grad_output_not_one(backend):
    x, target = make_inputs((9, 300), torch.float32, ignore=True)
    check_against_torch(x, target, TOL[torch.float32], grad_out=torch.tensor(-2.5))
    check_against_torch(x, target, TOL[torch.float32], reduction="none",
                        grad_out=torch.randn(9, dtype=torch.float64))


def test_all_rows_ignored(backend):
    x, target = make_inputs((4, 50), torch.float32)
    target[:] = -100
    xs = x.clone().requires_grad_()
    loss = spkern.cross_entropy(xs, target)
    ref = F.cross_entropy(x.double().requires_grad_(), target)
    assert torch.isnan(loss) and torch.isnan(ref)
    loss.backward()
    assert torch.equal(xs.grad, torch.zeros_like(x))


def test_input_not_modified_and_retain_graph(backend):
    x, target = make_inputs((6, 200), torch.float32)
    x.requires_grad_()
    before = x.detach().clone()
    loss = spkern.cross_entropy(x, target, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.backward()
    assert torch.equal(x.detach(), before)
    torch.testing.assert_close(x.grad, 2 * g1)


def test_no_grad_and_detached(backend):
    x, target = make_inputs((5, 100), torch.float32)
    with torch.no_grad():
        a = spkern.cross_entropy(x.requires_grad_(), target)
    b = spkern.cross_entropy(x.detach(), target)
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------
# statistics


def stats_reference(x, target, softcap=None, ignore_index=-100):
    x = x.double()
    xc = softcap * torch.tanh(x / softcap) if softcap else x
    lse = torch.logsumexp(xc, 1)
    p = torch.softmax(xc, 1)
    am = x.argmax(1)
    if target.is_floating_point():
        correct = target.gather(1, am[:, None])[:, 0] == target.max(1).values
    else:
        correct = (am == target) & (target != ignore_index)
    return dict(lse=lse, logit_norm=x.norm(dim=1), logit_max=x.max(1).values,
                max_prob=p.max(1).values, entropy=torch.special.entr(p).sum(1), correct=correct)


@pytest.mark.parametrize("C", [1, 5, 1000, 4099])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_stats(backend, C, softcap, kind):
    x, target = make_inputs((11, C), torch.float32, kind, ignore=True)
    if kind == "index":
        target[1] = x[1].argmax()  # at least one correct row
    loss, st = spkern.cross_entropy(x, target, softcap=softcap, return_stats=True)
    ref = stats_reference(x, target, softcap)
    for name, value in ref.items():
        got = getattr(st, name)
        assert got.shape == (11,), name
        if name == "correct":
            assert got.dtype == torch.bool
            assert torch.equal(got, value), name
        else:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), value, rtol=2e-5, atol=2e-5, msg=name)


def test_stats_shapes_and_loss_unchanged(backend):
    x, target = make_inputs((3, 17, 4), torch.float32, ignore=True)
    plain = spkern.cross_entropy(x, target, reduction="none")
    loss, st = spkern.cross_entropy(x, target, reduction="none", return_stats=True)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    for value in st:
        assert value.shape == target.shape
    x1, t1 = make_inputs((17,), torch.float32)
    _, st1 = spkern.cross_entropy(x1, t1, return_stats=True)
    assert all(v.shape == () for v in st1)


def test_stats_with_masked_logits(backend):
    # -inf logits (masked vocabulary) are common; every statistic must stay finite
    x, target = make_inputs((6, 300), torch.float32)
    x[:, 100:250] = -math.inf
    target = target % 100
    loss, st = spkern.cross_entropy(x, target, return_stats=True)
    ref = stats_reference(x, target)
    assert torch.isfinite(loss)
    torch.testing.assert_close(st.entropy.double(), ref["entropy"], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(st.lse.double(), ref["lse"], rtol=2e-5, atol=2e-5)
    assert torch.isinf(st.logit_norm).all()
    check_against_torch(x, target, TOL[torch.float32])


def test_stats_bfloat16(backend):
    x, target = make_inputs((7, 777), torch.bfloat16)
    _, st = spkern.cross_entropy(x, target, return_stats=True)
    ref = stats_reference(x, target)
    for name in ("lse", "logit_norm", "logit_max", "max_prob", "entropy"):
        torch.testing.assert_close(getattr(st, name).double(), ref[name], rtol=1e-4, atol=1e-4, msg=name)


def test_nan_and_inf_propagate_like_torch(backend):
    x, target = make_inputs((5, 64), torch.float32)
    x[1, 3] = math.nan
    x[3, 7] = math.inf
    loss = spkern.cross_entropy(x, target, reduction="none")
    ref = F.cross_entropy(x.double(), target, reduction="none")
    assert torch.equal(torch.isnan(loss), torch.isnan(ref))
    torch.testing.assert_close(loss[[0, 2, 4]].double(), ref[[0, 2, 4]], **TOL[torch.float32])
    assert torch.isnan(spkern.cross_entropy(x, target))


@pytest.mark.parametrize("scale", [1e30, 1e20, 1e-20, 0.0], ids=str)
@pytest.mark.parametrize("C", [10, 4099])
def test_logit_norm_never_overflows(backend, scale, C):
    # float32 squares of 1e30 (and of 1e20 summed) overflow, of 1e-20 underflow: the norm
    # is still that of the reference, on rows beside ordinary ones
    x, target = make_inputs((3, C), torch.float32)
    x[1] = x[1] * scale
    _, st = spkern.cross_entropy(x, target, reduction="none", return_stats=True)
    ref = x.double().norm(dim=1)
    assert torch.isfinite(st.logit_norm).all()
    torch.testing.assert_close(st.logit_norm.double(), ref, rtol=1e-5, atol=0)
    if scale >= 1e30:
        x[2, 5] = math.inf  # an infinite logit: an infinite norm
        _, st = spkern.cross_entropy(x, target, reduction="none", return_stats=True)
        assert st.logit_norm[2] == math.inf and torch.isfinite(st.logit_norm[[0, 1]]).all()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_nan_class_weight_reaches_only_its_rows(backend, reduction, label_smoothing):
    x, target = make_inputs((8, 33), torch.float32)
    target[:] = torch.tensor([0, 1, 2, 5, 1, -100, 4, 5])
    w = torch.rand(33) + 0.5
    w[5] = math.nan  # class 5: rows 3 and 7
    w[0] = math.nan if reduction == "none" else w[0]  # also class 0 of the ignored row's index 0
    if reduction == "mean":  # mean over rows that do not hold the NaN class: finite, as in torch
        keep = torch.tensor([0, 1, 2, 4, 5, 6])
        x, target = x[keep], target[keep]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = spkern.cross_entropy(x1, target, weight=w, reduction=reduction, label_smoothing=label_smoothing)
    ref = F.cross_entropy(x2, target, weight=w, reduction=reduction, label_smoothing=label_smoothing)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    torch.testing.assert_close(loss[ok], ref[ok], **TOL[torch.float32])
    g = torch.randn_like(loss) if reduction == "none" else None
    loss.backward(g)
    ref.backward(g)
    ignored = target == -100
    # torch's smoothing term puts NaN even into the ignored row's gradient; it stays 0 here
    assert torch.equal(x1.grad[ignored], torch.zeros_like(x1.grad[ignored]))
    assert torch.equal(torch.isnan(x1.grad[~ignored]), torch.isnan(x2.grad[~ignored]))
    if label_smoothing == 0.0 and reduction == "none":  # rows of classes 0 and 5
        assert torch.isnan(x1.grad).any(1).tolist() == [True, False, False, True, False, False, False, True]
    ok = ~torch.isnan(x2.grad) & ~ignored[:, None]
    torch.testing.assert_close(x1.grad[ok], x2.grad[ok], **TOL[torch.float32])


# ---------------------------------------------------------------------------------------
# each backend against the reference, at the op level


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_contract_matches_reference(backend, dtype):
    x, target = make_inputs((9, 4099), dtype, ignore=True)
    w = torch.rand(4099) + 0.5
    scalars = torch.tensor([0.25, float(w.sum())])
    args = (x, target, w, scalars, 0, -100, 0.1, 1e-3, 7.0, True, True, None)
    got = registry.kernels()[("cross_entropy", backend)].fn(*args)
    ref = cross_entropy_reference(*args)
    for a, b, name in zip(got, ref, ("loss", "stats", "grad")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        tol = dict(rtol=1e-5, atol=1e-5) if name != "grad" else TOL[dtype]
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=name)


def test_triton_kernel_never_reads_out_of_range_targets():
    reason = registry.reason("cross_entropy", "triton", torch.empty(0))
    if reason:
        pytest.skip(reason)
    # Without the Python check (as on a GPU), a bad target yields NaN for its row only.
    kernels = registry.triton_kernels("cross_entropy")
    x, target = make_inputs((4, 70), torch.float32)
    target[2] = 1000
    loss, _, grad = kernels.cross_entropy_fwd(x, target, None, torch.tensor([1.0, 70.0]), 0, -100,
                                              0.0, 0.0, 0.0, False, True)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    assert torch.isfinite(loss[[0, 1, 3]]).all()


@pytest.mark.parametrize("shape", [(3, 5), (4, 3, 2)])
def test_gradcheck_float64(shape):
    x, target = make_inputs(shape, torch.float64, ignore=False)
    x.requires_grad_()
    w = torch.rand(shape[1], dtype=torch.float64) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for kw in (dict(), dict(weight=w, label_smoothing=0.2, z_loss=0.1, softcap=2.0),
                   dict(reduction="none", label_smoothing=0.1)):
            assert torch.autograd.gradcheck(lambda x: spkern.cross_entropy(x, target, **kw), (x,))
        xp, tp = make_inputs(shape, torch.float64, "prob")
        assert torch.autograd.gradcheck(
            lambda x: spkern.cross_entropy(x, tp, softcap=3.0, z_loss=0.1), (xp.requires_grad_(),))


@pytest.mark.slow
def test_int64_indexing_cpu():
    """rows x vocab above 2**31 elements: the last rows must be right (no int32 wrap)."""
    if registry.compiled() is None:
        pytest.skip("spkern._C not built")
    rows, C = 2049, 1 << 20 | 1
    assert rows * C > 2**31
    x = torch.empty(rows, C, dtype=torch.bfloat16)
    x.fill_(0.25)
    tail = torch.randn(2, C).to(torch.bfloat16)
    x[-2:] = tail
    target = torch.full((rows,), 7)
    target[-1] = 123456
    with spkern.use_backend("cpu"):
        loss, st = spkern.cross_entropy(x, target, reduction="none", return_stats=True)
    ref = F.cross_entropy(tail.double(), target[-2:], reduction="none")
    torch.testing.assert_close(loss[-2:].double(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(st.lse[-2:].double(), torch.logsumexp(tail.double(), 1), rtol=1e-5, atol=1e-4)


def test_strided_input_and_target(backend):
    base = torch.randn(10, 300)
    x = base[::2, 7:290]  # row stride 600, classes contiguous
    xt = torch.randn(283, 5).t()  # classes strided
    t = torch.randint(0, 283, (10,))[::2]
    for logits in (x, xt):
        check_against_torch(logits, t, TOL[torch.float32], label_smoothing=0.1)
    probs = torch.softmax(torch.randn(283, 5), 0).t()
    check_against_torch(xt, probs, TOL[torch.float32])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_returns_float32_like_torch(backend, reduction):
    x, target = make_inputs((8, 64), torch.float32, ignore=True)
    lin = torch.nn.Linear(64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        ours = spkern.cross_entropy(logits, target, reduction=reduction)
        theirs = F.cross_entropy(logits, target, reduction=reduction)
    assert ours.dtype == theirs.dtype == torch.float32
    (g1,) = torch.autograd.grad(ours.sum(), lin.weight, retain_graph=True)
    (g2,) = torch.autograd.grad(theirs.sum(), lin.weight)
    ref = F.cross_entropy(logits.detach().double(), target, reduction=reduction)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g2, rtol=2e-2, atol=2e-2 * g2.abs().max().item())
