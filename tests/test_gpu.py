"""The GPU backends (Triton and CUDA) against the reference, on CUDA tensors.

Skipped on machines without a GPU; bench/gpu_run.sh runs it on a lent one.
"""

import pytest
import torch
import torch.nn.functional as F

import spkern
from spkern import registry
from spkern.cross_entropy import CROSS_ENTROPY, MSE_LOGITS, MSE_PROBS, cross_entropy_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = ["triton", "cuda"]
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3)}


def _backend_or_skip(name):
    reason = registry.reason("cross_entropy", name, torch.empty(0, device="cuda"))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("C", [1, 3, 1000, 4099, 50257, 131072])
@pytest.mark.parametrize("kind", [CROSS_ENTROPY, MSE_LOGITS, MSE_PROBS])
@pytest.mark.parametrize("options", ["plain", "all", "prob"])
def test_kernel_against_reference(backend, dtype, C, kind, options):
    _backend_or_skip(backend)
    if kind != CROSS_ENTROPY and options != "plain":
        pytest.skip("squared errors take no options")
    g = torch.Generator(device="cuda").manual_seed(C)
    M = 37
    x = (torch.randn(M, C, device="cuda", generator=g) * 3).to(dtype)
    if options == "prob":
        target = torch.softmax(torch.randn(M, C, device="cuda", generator=g), 1).to(dtype)
    else:
        target = torch.randint(0, C, (M,), device="cuda", generator=g)
        target[::5] = -100
    w = torch.rand(C, device="cuda", generator=g) + 0.5 if options != "plain" else None
    eps, z, cap = (0.1, 1e-3, 20.0) if options != "plain" else (0.0, 0.0, 0.0)
    scalars = torch.tensor([0.125, float(w.sum()) if w is not None else float(C)], device="cuda")
    args = (x, target, w, scalars, kind, -100, eps, z, cap, True, True, None)
    got = registry.kernels()[("cross_entropy", backend)].fn(*args)
    ref = cross_entropy_reference(*args)
    rtol, atol = TOL[dtype]
    for a, b, name in zip(got, ref, ("loss", "stats", "grad")):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name == "grad":
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * b.abs().max().item())
        else:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_public_api_on_gpu(backend):
    _backend_or_skip(backend)
    x = torch.randn(64, 3000, device="cuda", requires_grad=True)
    t = torch.randint(0, 3000, (64,), device="cuda")
    with spkern.use_backend(backend):
        loss = spkern.cross_entropy(x, t, label_smoothing=0.1)
        (g,) = torch.autograd.grad(loss, x)
    ref = F.cross_entropy(x.double(), t, label_smoothing=0.1)
    (gr,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, gr.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy_on_gpu(backend, dtype):
    _backend_or_skip(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 96, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(5003, 96, device="cuda", generator=g) / 10).to(dtype).requires_grad_()
    t = torch.randint(0, 5003, (300,), device="cuda", generator=g)
    with spkern.use_backend(backend):
        loss = spkern.linear_cross_entropy(x, w, t, chunk_size=64)
        gx, gw = torch.autograd.grad(loss, (x, w))
    xd, wd = x.double(), w.double()
    ref = F.cross_entropy(xd @ wd.t(), t)
    rx, rw = torch.autograd.grad(ref, (x, w))
    rtol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=rtol)
    torch.testing.assert_close(gx.double(), rx.double(), rtol=rtol, atol=rtol * rx.abs().max().item())
    torch.testing.assert_close(gw.double(), rw.double(), rtol=rtol, atol=rtol * rw.abs().max().item())


def test_no_host_sync_in_the_loss():
    x = torch.randn(256, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (256,), device="cuda")
    spkern.cross_entropy(x, t).backward()  # warm-up: lazy imports, compilation
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats = spkern.cross_entropy(x, t, return_stats=True)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_multi_tensor_norms_on_gpu(backend):
    _backend_or_skip(backend)
    from spkern.norms import multi_tensor_norms_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1,), (7,), (33, 3), (65537,), (300, 700), (4096, 4096)]
    a = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    a[2] = a[2].bfloat16()
    b = [(x.float() + 0.1).to(torch.float16 if i % 2 else torch.bfloat16) for i, x in enumerate(a)]
    with spkern.use_backend(backend):
        out = spkern.multi_tensor_norms(a, b)
        out_a = spkern.multi_tensor_norms(a)
    torch.testing.assert_close(out.double(), multi_tensor_norms_reference(a, b).double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out_a.double(), multi_tensor_norms_reference(a, []).double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_fused_optimizer_on_gpu(name, dtype):
    _backend_or_skip("triton")
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3) if name == "SGD" else dict(lr=1e-2)
    g = torch.Generator(device="cuda").manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g).to(dtype))
         for s in [(4096, 1000), (4096,), (3, 5)]]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    o1 = getattr(spkern.optim, name)(a, track_drift=True, **kw)
    o2 = getattr(torch.optim, name)(b, **kw)
    for _ in range(20):
        for x, y in zip(a, b):
            grad = torch.randn(x.shape, device="cuda", generator=g).to(dtype)
            x.grad, y.grad = grad.clone(), grad.clone()
        before = [x.detach().clone() for x in a]
        o1.step()
        o2.step()
    for x, y in zip(a, b):
        # bfloat16: torch's CUDA step (foreach) rounds after each op as spkern's does, but its
        # fused multiply-adds may differ: an ulp on a few elements, carried by later steps
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(x, y, **tol)
    st = o1.norm_stats()
    for x, q in zip(a, before):
        torch.testing.assert_close(st[x]["update_fro"].double(), (x.double() - q.double()).norm(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (37, 1000), (4099, 333), (3, 70000)], ids=str)
def test_pair_stats_on_gpu(backend, dtype, shape):
    _backend_or_skip(backend)
    from spkern.features import pair_stats_reference
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(shape, device="cuda", generator=g)
    a = torch.where(torch.rand(shape, device="cuda", generator=g) < 0.3, 0.0, a).to(dtype)
    b = (a.float() + 0.1 * torch.randn(shape, device="cuda", generator=g)).to(dtype)
    with spkern.use_backend(backend):
        total, rows = spkern.pair_stats(a, b, per_row=True)
    ref = pair_stats_reference(a, b).double()
    torch.testing.assert_close(rows.double(), ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(total.double(), ref.sum(0), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_paired_linear_on_gpu(dtype):
    _backend_or_skip("triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 1000, device="cuda", generator=g).to(dtype)
    w = torch.randn(700, 1000, device="cuda", generator=g).to(dtype)
    w0 = (w.float() + 1e-3 * torch.randn(700, 1000, device="cuda", generator=g)).to(dtype)
    with spkern.use_backend("triton"):
        y, z = spkern.features.paired_linear(x, w, w0)
    x64 = x.double()
    torch.testing.assert_close(y.double(), x64 @ w.double().t(), rtol=1e-4, atol=1e-3)
    eff = x64 @ (w.double() - w0.double()).t()
    assert ((y - z).double() - eff).abs().max() < 1e-3 * eff.abs().max() + 1e-4


@pytest.mark.parametrize("on", ["probe", "batch"])
def test_tracker_on_gpu(on):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).cuda()
    x = torch.randn(128, 64, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    opt = spkern.optim.SGD(model.named_parameters(), lr=0.1)
    tracker = spkern.Tracker(model, opt, probe=x[:32] if on == "probe" else "batch")
    for _ in range(3):
        opt.zero_grad()
        loss, stats = spkern.cross_entropy(model(x), y, return_stats=True)
        loss.backward()
        tracker.record_loss(loss, stats)
        opt.step()
    m = tracker.metrics()
    assert m["step"] == 3 and all(v == v for k, v in m.items() if not k.endswith("_align"))  # (0/0: NaN)
    assert m["2/eff_rms"] > 0 and m["2/prop_rms"] > 0 and 0 <= m["2/eff_align"] <= 1.001
