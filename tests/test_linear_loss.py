"""spkern.linear_cross_entropy / linear_mse_onehot_loss against F.linear + the float64 loss."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import spkern
from test_cross_entropy import TOL
from test_cross_entropy import torch_reference as ce_reference
from test_mse_onehot import torch_reference as mse_reference


def make(N=23, D=19, V=1003, dtype=torch.float32, bias=True, ignore=True, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = lead + (D,) if lead else (N, D)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 2 / D**0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, V, shape[:-1], generator=g)
    if ignore:
        t.view(-1)[::4] = -100
    return x, w, b, t


def check(x, w, b, t, tol, loss_fn, ref_fn, grad_out=None, **kw):
    leaves = [a.clone().requires_grad_() for a in (x, w) + ((b,) if b is not None else ())]
    out = loss_fn(leaves[0], leaves[1], t, leaves[2] if b is not None else None, **kw)
    ref_leaves = [a.double().requires_grad_() for a in (x, w) + ((b,) if b is not None else ())]
    logits = F.linear(ref_leaves[0], ref_leaves[1], ref_leaves[2] if b is not None else None)
    ref = ref_fn(logits, t)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, **tol)
    go = torch.randn_like(ref) if grad_out is None else grad_out
    grads = torch.autograd.grad(out, leaves, go.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, go)
    for name, g, gr in zip(("input", "weight", "bias"), grads, ref_grads):
        assert g.dtype == x.dtype, name
        scale = gr.abs().max().item() or 1.0
        torch.testing.assert_close(g.double(), gr, rtol=tol["rtol"], atol=tol["atol"] * scale * 10, msg=name)


CE_CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.2, z_loss=1e-3),
    dict(softcap=4.0, class_weight=True),
    dict(softcap=4.0, class_weight=True, label_smoothing=0.1, z_loss=1e-2, reduction="none"),
]


@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 23, 40])
def test_linear_cross_entropy_matches_torch(backend, case, chunk_size):
    x, w, b, t = make()
    kw = dict(case, chunk_size=chunk_size)
    if kw.pop("class_weight", False):
        kw["class_weight"] = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(3)) + 0.5
    ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    if "class_weight" in ref_kw:
        ref_kw["weight"] = ref_kw.pop("class_weight")
    check(x, w, b, t, TOL[torch.float32], spkern.linear_cross_entropy,
          lambda logits, t: ce_reference(logits, t, **ref_kw), **kw)


@pytest.mark.parametrize("on", ["logits", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_linear_mse_matches_torch(backend, on, reduction, chunk_size):
    x, w, b, t = make(V=515)
    check(x, w, b, t, TOL[torch.float32], spkern.linear_mse_onehot_loss,
          lambda logits, t: mse_reference(logits, t, on, reduction),
          on=on, reduction=reduction, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision(backend, dtype, reduction):
    x, w, b, t = make(D=24, V=517, dtype=dtype)
    tol = dict(rtol=TOL[dtype]["rtol"] * 2, atol=TOL[dtype]["atol"] * 2)
    check(x, w, b, t, tol, spkern.linear_cross_entropy,
          lambda logits, t: ce_reference(logits, t, reduction=reduction, label_smoothing=0.1),
          reduction=reduction, label_smoothing=0.1, chunk_size=6)


def test_three_dimensional_input_and_no_bias(backend):
    x, w, b, t = make(lead=(3, 7), bias=False)
    check(x, w, None, t, TOL[torch.float32], spkern.linear_cross_entropy,
          lambda logits, t: ce_reference(logits.reshape(-1, logits.shape[-1]), t.reshape(-1)))
    x, w, b, t = make(lead=(3, 7))
    check(x, w, b, t, TOL[torch.float32], spkern.linear_cross_entropy,
          lambda logits, t: ce_reference(logits.reshape(-1, logits.shape[-1]), t.reshape(-1),
                                         reduction="none").reshape(t.shape),
          reduction="none", chunk_size=4)


def test_stats_equal_those_of_cross_entropy(backend):
    x, w, b, t = make(lead=(2, 9))
    loss, st = spkern.linear_cross_entropy(x, w, t, b, return_stats=True, chunk_size=5, softcap=3.0)
    ref_loss, ref_st = spkern.cross_entropy(F.linear(x, w, b).reshape(18, -1), t.reshape(-1),
                                            return_stats=True, softcap=3.0)
    torch.testing.assert_close(loss, ref_loss)
    for a, r in zip(st, ref_st):
        assert a.shape == t.shape
        torch.testing.assert_close(a.reshape(-1), r, rtol=1e-5, atol=1e-5)


def test_nan_class_weight_and_huge_logits(backend):
    # a NaN class weight reaches the rows of that class only, as in torch; logits of 1e17
    # (squares beyond float32) still give their norm
    g = torch.Generator().manual_seed(3)
    x, W = torch.randn(8, 16, generator=g), torch.randn(33, 16, generator=g)
    target = torch.tensor([0, 1, 2, 5, 1, -100, 4, 5])
    w = torch.rand(33, generator=g) + 0.5
    w[5] = float("nan")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = spkern.linear_cross_entropy(x1, W, target, reduction="none", class_weight=w)
    ref = F.cross_entropy(F.linear(x2, W), target, weight=w, reduction="none")
    loss.sum().backward()
    ref.sum().backward()
    assert torch.isnan(loss).tolist() == torch.isnan(ref).tolist() == [False] * 3 + [True] + [False] * 3 + [True]
    assert torch.isnan(x1.grad).any(1).tolist() == torch.isnan(x2.grad).any(1).tolist()
    torch.testing.assert_close(loss[~torch.isnan(ref)], ref[~torch.isnan(ref)], **TOL[torch.float32])
    _, st = spkern.linear_cross_entropy(x * 1e17, W, target, return_stats=True)
    torch.testing.assert_close(st.logit_norm.double(), (x.double() * 1e17 @ W.double().t()).norm(dim=1),
                               rtol=1e-5, atol=0)


def test_only_the_gradients_asked_for(backend):
    x, w, b, t = make()
    x.requires_grad_()
    loss = spkern.linear_cross_entropy(x, w, t, b)
    (gx,) = torch.autograd.grad(loss, x)
    ref = torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), t), x)[0]
    torch.testing.assert_close(gx, ref, rtol=1e-5, atol=1e-6)
    w.requires_grad_()
    loss = spkern.linear_cross_entropy(x.detach(), w, t, b)
    loss.backward()
    assert w.grad is not None and b.grad is None
    with torch.no_grad():
        assert not spkern.linear_cross_entropy(x, w, t, b).requires_grad


def test_input_not_modified_and_retain_graph(backend):
    x, w, b, t = make()
    for a in (x, w, b):
        a.requires_grad_()
    before = [a.detach().clone() for a in (x, w, b)]
    loss = spkern.linear_cross_entropy(x, w, t, b)
    loss.backward(retain_graph=True)
    first = [a.grad.clone() for a in (x, w, b)]
    loss.backward()
    for a, b0, g in zip((x, w, b), before, first):
        assert torch.equal(a.detach(), b0)
        torch.testing.assert_close(a.grad, 2 * g)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, w, t, b: spkern.linear_cross_entropy(x, w[:, :5], t, b), ValueError, "weight"),
    (lambda x, w, t, b: spkern.linear_cross_entropy(x, w.double(), t, b), TypeError, "weight dtype"),
    (lambda x, w, t, b: spkern.linear_cross_entropy(x, w, t[:3], b), ValueError, "target"),
    (lambda x, w, t, b: spkern.linear_cross_entropy(x, w, t.float(), b), TypeError, "target"),
    (lambda x, w, t, b: spkern.linear_cross_entropy(x, w, t, b[:4]), ValueError, "bias"),
    (lambda x, w, t, b: spkern.linear_cross_entropy(x, w, t, b.double()), TypeError, "bias dtype"),
    (lambda x, w, t, b: spkern.linear_cross_entropy(x, w, t, b, chunk_size=0), ValueError, "chunk_size"),
    (lambda x, w, t, b: spkern.linear_cross_entropy(x, w, t, b, chunk_size=2.5), ValueError, "chunk_size"),
    (lambda x, w, t, b: spkern.linear_cross_entropy(x, w, t, b, class_weight=torch.ones(3)), ValueError,
     "class_weight"),
    (lambda x, w, t, b: spkern.linear_cross_entropy(x, w, t, b, reduction="avg"), ValueError, "reduction"),
    (lambda x, w, t, b: spkern.linear_cross_entropy(x, w, t, b, z_loss=float("nan")), ValueError, "z_loss"),
    (lambda x, w, t, b: spkern.linear_cross_entropy(x, w, t.to("meta"), b), ValueError, "device"),
    (lambda x, w, t, b: spkern.linear_cross_entropy(x.long(), w, t, b), TypeError, "input"),
    (lambda x, w, t, b: spkern.linear_mse_onehot_loss(x, w, t, b, on="x"), ValueError, "on must be"),
])
def test_bad_arguments(call, error, match):
    x, w, b, t = make()
    with pytest.raises(error, match=match):
        call(x, w, t, b)


def test_target_out_of_range(backend):
    x, w, b, t = make()
    t[5] = w.shape[0]
    with pytest.raises(IndexError, match="out of bounds"):
        spkern.linear_cross_entropy(x, w, t, b)


def test_module():
    x, w, b, t = make()
    m = spkern.LinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=4)
    torch.testing.assert_close(m(x, w, t, b), F.cross_entropy(F.linear(x, w, b), t, label_smoothing=0.1))
    m = spkern.LinearCrossEntropyLoss(return_stats=True, class_weight=torch.rand(w.shape[0]) + 0.5)
    loss, st = m(x, w, t)
    assert st.lse.shape == t.shape and "class_weight" in m.state_dict()


def test_auto_chunk_rows():
    from spkern.linear_loss import auto_chunk_rows

    cpu = torch.device("cpu")
    assert auto_chunk_rows(10, 5, torch.float32, cpu) == 10
    big = auto_chunk_rows(4096, 32768, torch.float32, cpu)
    assert big * 32768 * 4 <= 0.05 * 2 * 4096 * 32768 * 4  # under 5% of logits + gradient
    assert big % 16 == 0 and big >= 64
    assert auto_chunk_rows(16384, 131072, torch.float32, cpu) * 131072 * 4 <= 64 << 20


def test_opcheck():
    x, w, b, t = make(N=6, D=5, V=9)
    x.requires_grad_()
    w.requires_grad_()
    cw = torch.rand(9) + 0.5
    for reduction, needs in (("mean", (True, True, False)), ("none", (False, False, False))):
        args = (x, w, t, b, cw, 0, -100, 0.1, 1e-3, 3.0, reduction, True, *needs, 4)
        torch.library.opcheck(torch.ops.spkern.linear_logit_loss.default, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 12)
            self.head = torch.nn.Linear(12, 50)

        def forward(self, h, t):
            loss, st = spkern.linear_cross_entropy(torch.relu(self.proj(h)), self.head.weight, t,
                                                   self.head.bias, return_stats=True, chunk_size=8)
            return loss, st.logit_norm.mean()

    model = Head()
    h, t = torch.randn(20, 12), torch.randint(0, 50, (20,))
    eager = model(h, t)
    eager[0].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(h, t)
    out[0].backward()
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch, spkern
    N, D, V = map(int, sys.argv[1:4])
    def status(field):
        with open("/proc/self/status") as f:
            return int(next(l.split()[1] for l in f if l.startswith(field + ":"))) * 1024
    x = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D).mul_(D ** -0.5).requires_grad_()
    t = torch.randint(0, V, (N,))
    spkern.linear_cross_entropy(x[:8], w, t[:8]).backward()  # imports and one-time setup
    x.grad = w.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    spkern.linear_cross_entropy(x, w, t).backward()
    grads = x.grad.nbytes + w.grad.nbytes
    print(json.dumps(dict(extra=status("VmHWM") - base - grads, logits=N * V * 4)))
""")


@pytest.mark.slow
def test_memory_does_not_grow_with_vocab():
    """Peak resident memory above inputs and gradients stays under one capped chunk of
    logits while the vocabulary grows 4x (the unfused loss would hold N x V logits and
    their gradient: 4 GB and 16 GB here)."""
    extra = {}
    for V in (32768, 131072):
        out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, "16384", "16", str(V)],
                             capture_output=True, text=True, check=True)
        extra[V] = json.loads(out.stdout.strip().splitlines()[-1])
    chunk_cap = 64 << 20
    for V, r in extra.items():
        assert r["extra"] < chunk_cap + (24 << 20), (V, r)
        assert r["extra"] < 0.05 * 2 * r["logits"], (V, r)
    assert abs(extra[131072]["extra"] - extra[32768]["extra"]) < 16 << 20, extra
