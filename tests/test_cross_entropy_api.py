"""Errors, the module, backend choice, torch.library checks and torch.compile."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spkern
from spkern import registry


def _inputs(N=6, C=10):
    return torch.randn(N, C), torch.randint(0, C, (N,))


# ---------------------------------------------------------------------------------------
# bad input: a clear Python error naming the argument, from every backend


@pytest.mark.parametrize("call, error, match", [
    (lambda x, t: spkern.cross_entropy(x, t[:-1]), ValueError, "target"),
    (lambda x, t: spkern.cross_entropy(x, t[:, None]), ValueError, "target"),
    (lambda x, t: spkern.cross_entropy(x[None], t), ValueError, "target"),
    (lambda x, t: spkern.cross_entropy(x.long(), t), TypeError, "input"),
    (lambda x, t: spkern.cross_entropy(x, t.bool()), TypeError, "target"),
    (lambda x, t: spkern.cross_entropy(x, t.float()), TypeError, "class indices must be int64.*float32"),
    (lambda x, t: spkern.cross_entropy(x, t.int()), TypeError, "int64.*got torch.int32"),  # (as torch refuses it)
    (lambda x, t: spkern.cross_entropy(x, t.float()[:, None].expand(-1, 3)), ValueError, "probability target"),
    (lambda x, t: spkern.cross_entropy(x, t, weight=torch.ones(3)), ValueError, "weight"),
    (lambda x, t: spkern.cross_entropy(x, t, weight=torch.ones(10, dtype=torch.long)), TypeError, "weight"),
    (lambda x, t: spkern.cross_entropy(x, t, reduction="avg"), ValueError, "reduction"),
    (lambda x, t: spkern.cross_entropy(x, t, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda x, t: spkern.cross_entropy(x, t, z_loss=math.nan), ValueError, "z_loss"),
    (lambda x, t: spkern.cross_entropy(x, t, z_loss=math.inf), ValueError, "z_loss"),
    (lambda x, t: spkern.cross_entropy(x, t, z_loss=-1.0), ValueError, "z_loss"),
    (lambda x, t: spkern.cross_entropy(x, t, softcap=0.0), ValueError, "softcap"),
    (lambda x, t: spkern.cross_entropy(x, t, softcap=math.inf), ValueError, "softcap"),
    (lambda x, t: spkern.cross_entropy(x[0, 0], t[0]), ValueError, "0-d"),
    (lambda x, t: spkern.cross_entropy(x[:, :0], t), ValueError, "no classes"),
    (lambda x, t: spkern.cross_entropy(x, t.to("meta")), ValueError, "device"),
    (lambda x, t: spkern.cross_entropy(x, t, weight=torch.ones(10, device="meta")), ValueError, "device"),
    (lambda x, t: spkern.cross_entropy(x.numpy(), t), TypeError, "input"),
    (lambda x, t: spkern.cross_entropy(x, [1, 2]), TypeError, "target"),
    (lambda x, t: spkern.cross_entropy(x, t, weight=torch.ones(10, requires_grad=True)), ValueError, "weight"),
    (lambda x, t: spkern.cross_entropy(x, torch.rand(6, 10, requires_grad=True), z_loss=1e-3), ValueError,
     "no z_loss or softcap"),
])
def test_bad_arguments(backend, call, error, match):
    x, t = _inputs()
    with pytest.raises(error, match=match):
        call(x, t)


@pytest.mark.parametrize("bad", [10, -1, -101, 2**40])
def test_target_out_of_range(backend, bad):
    x, t = _inputs()
    t[4] = bad
    before = x.clone()
    with pytest.raises(IndexError, match=f"target {bad} is out of bounds"):
        spkern.cross_entropy(x.requires_grad_(), t)
    assert torch.equal(x.detach(), before)


def test_target_equal_to_custom_ignore_index_is_fine(backend):
    x, t = _inputs()
    t[0] = 55
    loss = spkern.cross_entropy(x, t, ignore_index=55)
    torch.testing.assert_close(loss, F.cross_entropy(x, t, ignore_index=55))


def test_compiled_kernel_checks_targets_itself():
    C_ext = registry.compiled()
    if C_ext is None:
        pytest.skip("spkern._C not built")
    x, t = _inputs()
    t[2] = 99
    with pytest.raises(IndexError, match="out of bounds"):
        C_ext.cross_entropy_fwd_cpu(x, t, None, torch.tensor([1.0, 10.0]), 0, -100, 0.0, 0.0, 0.0, False, False, None)
    with pytest.raises(RuntimeError, match="int64"):
        C_ext.cross_entropy_fwd_cpu(x, t.int(), None, torch.tensor([1.0, 10.0]), 0, -100, 0.0, 0.0, 0.0, False, False, None)


# ---------------------------------------------------------------------------------------
# the module


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(reduction="sum", label_smoothing=0.1),
    dict(ignore_index=3, reduction="none"),
    dict(weight=torch.rand(10) + 0.1, label_smoothing=0.05),
    dict(size_average=False),
    dict(reduce=False),
])
def test_module_is_a_drop_in(kwargs):
    x, t = _inputs(8, 10)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # legacy size_average / reduce
        ours = spkern.CrossEntropyLoss(**kwargs)
        theirs = nn.CrossEntropyLoss(**kwargs)
    a, b = ours(x1, t), theirs(x2, t)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.reduction == theirs.reduction


def test_module_extras_and_repr():
    x, t = _inputs()
    m = spkern.CrossEntropyLoss(z_loss=1e-3, softcap=10.0, return_stats=True)
    loss, st = m(x, t)
    assert isinstance(st, spkern.LogitStats) and st.lse.shape == (6,)
    assert "z_loss=0.001" in repr(m) and "softcap=10.0" in repr(m)
    if torch.cuda.is_available():
        m.cuda()
        assert m(x.cuda(), t.cuda())[0].device.type == "cuda"


# ---------------------------------------------------------------------------------------
# backend choice


def test_use_backend_and_environment(monkeypatch):
    x, t = _inputs()
    assert registry.requested_backend(x.device) == "cpu"
    with spkern.use_backend("reference"):
        assert registry.requested_backend(x.device) == "reference"
    monkeypatch.setenv("SPKERN_BACKEND", "reference")
    assert registry.requested_backend(x.device) == "reference"
    with spkern.use_backend("cpu"):  # the context manager wins over the environment
        assert registry.requested_backend(x.device) == "cpu"
    monkeypatch.setenv("SPKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="SPKERN_BACKEND"):
        spkern.cross_entropy(x, t)
    with pytest.raises(ValueError, match="backend"):
        with spkern.use_backend("fast"):
            pass


def test_fallback_warns_once():
    registry._warn_once.cache_clear()
    x, t = _inputs()
    with spkern.use_backend("cuda"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = spkern.cross_entropy(x, t)
        b = spkern.cross_entropy(x, t)
    messages = [str(w.message) for w in caught if "backend 'cuda'" in str(w.message)]
    assert len(messages) == 1 and "device cpu" in messages[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, F.cross_entropy(x, t))


def test_float64_runs_on_the_reference():
    registry._warn_once.cache_clear()
    x, t = _inputs()
    with pytest.warns(RuntimeWarning, match="float64"):
        loss = spkern.cross_entropy(x.double(), t)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, F.cross_entropy(x.double(), t), rtol=1e-12, atol=1e-12)


def test_extension_is_built():
    # The package is installed with its extension (pip install -e .); a missing build
    # would silently test the reference twice.
    assert registry.compiled() is not None
    assert registry.compiled().cpu_isa() in ("avx512", "avx2", "default")


# ---------------------------------------------------------------------------------------
# torch.library and torch.compile


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(backend, kind, reduction):
    x = torch.randn(5, 7, requires_grad=True)
    t = torch.softmax(torch.randn(5, 7), 1) if kind == "prob" else torch.randint(0, 7, (5,))
    w = torch.rand(7) + 0.5
    args = (x, t, w, 0, -100, 0.1, 1e-3, 3.0, reduction, True, True)
    torch.library.opcheck(torch.ops.spkern.logit_loss.default, args)


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 33)

    def forward(self, h, target):
        loss, st = spkern.cross_entropy(self.proj(h), target, label_smoothing=0.1, z_loss=1e-4,
                                        return_stats=True)
        return loss, st.logit_norm.mean(), st.correct.float().mean()


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()
    model = _Head()
    h = torch.randn(12, 16)
    t = torch.randint(0, 33, (12,))
    t[3] = -100
    eager = model(h, t)
    eager[0].backward()
    g_eager = model.proj.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    out = compiled(h, t)
    out[0].backward()
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(model.proj.weight.grad, g_eager)


@pytest.mark.parametrize("fused", ["cross_entropy", "linear_cross_entropy", "mse_onehot_loss"])
def test_double_backward_is_refused_not_silently_wrong(backend, fused):
    # a gradient penalty: loss + c * ||d loss / d x||^2 needs the second-order terms
    x = torch.randn(6, 8, dtype=torch.float32, requires_grad=True)
    w = torch.randn(5, 8)
    t = torch.randint(0, 5, (6,))
    loss_fn = {"cross_entropy": lambda: spkern.cross_entropy(x @ w.T, t),
               "linear_cross_entropy": lambda: spkern.linear_cross_entropy(x, w, t),
               "mse_onehot_loss": lambda: spkern.mse_onehot_loss(x @ w.T, t)}[fused]
    loss = loss_fn()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    # the first-order gradient is unchanged
    (g,) = torch.autograd.grad(loss_fn(), x)
    xr = x.detach().clone().requires_grad_()
    ref = {"cross_entropy": lambda: torch.nn.functional.cross_entropy(xr @ w.T, t),
           "linear_cross_entropy": lambda: torch.nn.functional.cross_entropy(xr @ w.T, t),
           "mse_onehot_loss": lambda: torch.nn.functional.mse_loss(xr @ w.T, torch.nn.functional.one_hot(t, 5).float())}[fused]
    (gr,) = torch.autograd.grad(ref(), xr)
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("shape", [(6, 10), (10,), (3, 7, 4, 2), (1, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2}, {"weight": True}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probability_target_gets_its_gradient(backend, shape, reduction, options, dtype):
    # the target's gradient, as torch gives it (torch's own loss runs: a documented
    # fallback); the statistics still come from spkern's pass on the detached tensors
    g = torch.Generator().manual_seed(0)
    C = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype)
    p = torch.rand(shape, generator=g, dtype=dtype).softmax(0 if len(shape) == 1 else 1)
    kw = dict(options)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(C, generator=g, dtype=dtype) + 0.5
    xs, ps = x.clone().requires_grad_(), p.clone().requires_grad_()
    xt, pt = x.clone().requires_grad_(), p.clone().requires_grad_()
    with spkern.use_backend(backend):
        ours, stats = spkern.cross_entropy(xs, ps, reduction=reduction, return_stats=True, **kw)
    theirs = F.cross_entropy(xt, pt, reduction=reduction, **kw)
    gout = torch.randn(theirs.shape, generator=g, dtype=dtype)
    (ours * gout).sum().backward()
    (theirs * gout).sum().backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(xs.grad, xt.grad)
    torch.testing.assert_close(ps.grad, pt.grad)
    with spkern.use_backend(backend):
        _, plain = spkern.cross_entropy(x, p, reduction=reduction, return_stats=True, **kw)
    for a, b in zip(stats, plain):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------
# degenerate shapes and options, as torch's own tests use them: torch's numbers

DEGENERATE = [("two-d", (5, 7)), ("one class", (5, 1)), ("one row", (1, 7)), ("unbatched", (7,)),
              ("spatial 1-d", (3, 7, 4)), ("spatial 2-d", (2, 7, 3, 4)), ("spatial 3-d", (2, 5, 2, 3, 2)),
              ("empty batch", (0, 7)), ("empty spatial", (2, 7, 0))]


@pytest.mark.slow_on_triton
@pytest.mark.parametrize("name, shape", DEGENERATE, ids=[n for n, _ in DEGENERATE])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_degenerate_shapes_and_options_match_torch(backend, name, shape, kind):
    # every reduction, with smoothing, class weights, an ignored class and every target
    # ignored (mean: NaN, as torch), in float32 and float64: loss and gradient as torch's
    C = shape[1] if len(shape) > 1 else shape[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "index":
        target = torch.randint(0, C, (shape[0], *shape[2:]) if len(shape) > 1 else (), generator=g)
    else:
        target = torch.randn(shape, generator=g, dtype=torch.float64).softmax(1 if len(shape) > 1 else 0)
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.1
    options = [{}, {"label_smoothing": 0.3}, {"weight": weight}]
    if kind == "index":
        options += [{"ignore_index": min(1, C - 1)}, {"ignore_index": -100, "all_ignored": True},
                    {"weight": weight, "label_smoothing": 0.1, "all_ignored": True}]
    for opts, reduction, dtype in [(o, r, d) for o in options for r in ("mean", "sum", "none")
                                   for d in (torch.float32, torch.float64)]:
        opts = dict(opts)
        t = target.clone()
        if opts.pop("all_ignored", False):
            t.fill_(-100)
        t = t.to(dtype) if kind == "prob" else t
        opts = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
        a, b = x.to(dtype).requires_grad_(), x.to(dtype).requires_grad_()
        want = F.cross_entropy(a, t, reduction=reduction, **opts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (float64 on the reference path)
            got = spkern.cross_entropy(b, t, reduction=reduction, **opts)
        where = (name, kind, reduction, dtype, sorted(opts))
        assert got.shape == want.shape and got.dtype == want.dtype, where
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, equal_nan=True, msg=str(where))
        if want.numel():
            want.sum().backward()
            got.sum().backward()
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, equal_nan=True, msg=str(where))
