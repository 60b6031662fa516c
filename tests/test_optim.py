"""spkern.optim.SGD / AdamW against torch.optim, and their norms against float64 ones
computed the slow way (copy, step, subtract)."""

import copy
import math

import pytest
import torch

import spkern

SHAPES = [(300, 37), (300,), (10, 300), (10,), (5, 7, 3)]


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


CASES = [
    (spkern.optim.SGD, torch.optim.SGD, dict(lr=0.1)),
    (spkern.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    (spkern.optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.5, dampening=0.3, maximize=True)),
    (spkern.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (spkern.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)),
    (spkern.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True)),
]


@pytest.mark.slow_on_triton
@pytest.mark.parametrize("ours, theirs, kw", CASES, ids=lambda c: getattr(c, "__module__", "") and "" or str(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_equals_torch_over_many_steps(backend, ours, theirs, kw, dtype):
    a, b = _params(dtype), _params(dtype)
    # two parameter groups with different learning rates
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": kw["lr"] / 3}]  # noqa: E731
    o1, o2 = ours(groups(a), **kw), theirs(groups(b), **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        for x, y in zip(a, b):
            grad = torch.randn(x.shape, generator=g).to(dtype)
            x.grad, y.grad = grad.clone(), grad.clone()
        a[3].grad = None  # a parameter without a gradient this step
        b[3].grad = None
        o1.step()
        o2.step()
    tol = dict(rtol=1e-6, atol=1e-7)
    # torch's kernels here fuse multiply-adds, as the AVX2 and AVX-512 CPU kernels do; the
    # Triton interpreter and the portable CPU kernels do not: a few ulps in 50 steps
    portable = backend == "cpu" and spkern.cpu_isa.current() == "default"
    if backend == "triton" or portable:
        tol["atol"] = 1e-6
    if dtype != torch.float32:
        # reduced precision rounds after each of torch's ops, as torch does; torch's add(x, y,
        # alpha) rounds alpha * y first on the elements of its scalar loop (the tail of each
        # vectorised range) and once elsewhere, as spkern does everywhere: a few elements
        # differ by an ulp, which later steps carry on
        tol = dict(rtol=2e-2, atol=2e-2)
        same = sum((x == y).sum().item() for x, y in zip(a, b)) / sum(x.numel() for x in a)
        assert same > (0.97 if backend != "triton" else 0.9), same
        if ours is spkern.optim.AdamW and backend == "cpu" and not portable:
            tol = dict(rtol=0, atol=0)  # AdamW has no add(x, y, alpha): bit for bit
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        assert s1["state"][k].keys() == s2["state"][k].keys()
        for name in s1["state"][k]:
            torch.testing.assert_close(s1["state"][k][name], s2["state"][k][name], **tol)


@pytest.mark.parametrize("ours, theirs, kw", CASES[1::2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_norms_against_the_slow_way(backend, ours, theirs, kw, dtype):
    params = _params(dtype)
    init = [p.detach().clone() for p in params]
    if dtype == torch.float16 and ours is spkern.optim.AdamW:
        kw = {**kw, "eps": 1e-4}  # eps=1e-8 rounds to 0 in float16: 0/0 where v underflows, in torch too
    opt = ours(params, track_drift=True, drift_dtype=torch.bfloat16, **kw)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        before = [p.detach().clone() for p in params]
        opt.step()
    stats = opt.norm_stats()
    floats = opt.norm_stats_floats()
    for p, q, p0 in zip(params, before, init):
        st, fl = stats[p], floats[p]
        n = math.sqrt(p.numel())
        p64, q64, g64 = p.detach().double(), q.double(), p.grad.double()
        w0 = p0.bfloat16().double()
        ref = dict(update_fro=(p64 - q64).norm(), weight_fro=p64.norm(), grad_fro=g64.norm(),
                   drift_fro=(p64 - w0).norm())
        ref.update(update_rms=ref["update_fro"] / n, weight_rms=ref["weight_fro"] / n,
                   grad_rms=ref["grad_fro"] / n, drift_rms=ref["drift_fro"] / n,
                   relative_update=ref["update_fro"] / ref["weight_fro"])
        assert st.keys() == ref.keys()
        for name, value in ref.items():
            torch.testing.assert_close(st[name].double(), value, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
            assert isinstance(fl[name], float) and math.isclose(fl[name], st[name].item(), rel_tol=1e-6)


def test_named_parameters_and_drift_every():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = spkern.optim.AdamW(model.named_parameters(), lr=1e-2, track_drift=True, drift_every=3)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    drifts = []
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        drifts.append(opt.norm_stats_floats()["0.weight"]["drift_fro"])
    assert set(opt.norm_stats()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    # measured at steps 0 and 3, kept in between
    assert drifts[1] == drifts[0] and drifts[2] == drifts[0] and drifts[3] > drifts[0]
    # a torch optimizer loads spkern's state and the other way round
    torch_opt = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    torch_opt.load_state_dict(opt.state_dict())
    opt.load_state_dict(torch_opt.state_dict())


def test_no_drift_without_tracking_and_no_copy():
    params = _params()
    opt = spkern.optim.SGD(params, lr=0.1, momentum=0.9)
    assert opt.initial_weights == {}
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert "drift_fro" not in next(iter(opt.norm_stats().values()))


@pytest.mark.parametrize("make, error, match", [
    (lambda ps: spkern.optim.SGD(ps, lr=0.1, drift_every=0), ValueError, "drift_every"),
    (lambda ps: spkern.optim.SGD(ps, lr=0.1, track_drift=True, drift_dtype=torch.int8), ValueError, "drift_dtype"),
    (lambda ps: spkern.optim.SGD(ps, lr=-1.0), ValueError, "learning rate"),
    (lambda ps: spkern.optim.AdamW(ps, lr=0.1, capturable=True), ValueError, "capturable"),
    (lambda ps: spkern.optim.SGD(ps, lr=0.1, differentiable=True), ValueError, "differentiable"),
])
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make(_params())


@pytest.mark.parametrize("lr", [math.nan, math.inf])
def test_non_finite_learning_rate(lr):
    params = _params()
    opt = spkern.optim.SGD(params, lr=0.1)
    opt.param_groups[0]["lr"] = lr
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="learning rate must be finite"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = spkern.optim.SGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_closure():
    p = torch.nn.Parameter(torch.ones(3))
    opt = spkern.optim.SGD([p], lr=0.5)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    torch.testing.assert_close(p.detach(), torch.zeros(3))


def test_given_initial_weights():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    by_name = spkern.optim.SGD(model.named_parameters(), lr=0.1, initial_weights=w0)
    by_order = spkern.optim.SGD(model.parameters(), lr=0.1, initial_weights=list(w0.values()),
                                drift_dtype=torch.bfloat16)
    assert by_order.initial_weights[model[0].weight].dtype == torch.bfloat16
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    by_name.step()
    st = by_name.norm_stats_floats()["0.weight"]
    assert math.isclose(st["drift_fro"], st["update_fro"], rel_tol=1e-6)  # W_0 was the start


@pytest.mark.parametrize("given, error, match", [
    (lambda m: [p.detach() for p in m.parameters()][:3], ValueError, "has 3 tensors"),
    (lambda m: [torch.zeros(2, 2)] + [p.detach() for p in m.parameters()][1:], ValueError, "shape"),
    (lambda m: {"0.weight": torch.zeros(16, 8)}, ValueError, "no entry"),
    (lambda m: [torch.zeros(16, 8, dtype=torch.long)] + [p.detach() for p in m.parameters()][1:], TypeError,
     "floating"),
])
def test_bad_initial_weights(given, error, match):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with pytest.raises(error, match=match):
        spkern.optim.AdamW(model.named_parameters(), lr=0.1, initial_weights=given(model))


@pytest.mark.parametrize("ours, kw", [
    (spkern.optim.SGD, dict(lr=0.1)),
    (spkern.optim.SGD, dict(lr=0.1, weight_decay=0.01, maximize=True)),
    (spkern.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
    (spkern.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)),
    (spkern.optim.AdamW, dict(lr=1e-2)),
    (spkern.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
])
def test_update_spectral_norm_without_a_copy(ours, kw, monkeypatch):
    monkeypatch.setattr(spkern.optim, "_BLOCK_ELEMENTS", 1000)  # several blocks of rows
    g = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(70, 45, generator=g))
    conv = torch.nn.Parameter(torch.randn(6, 3, 2, 2, generator=g))
    opt = ours([{"params": [w]}, {"params": [conv], "lr": kw["lr"] / 2}], **kw)
    state = None
    for _ in range(3):
        for p in (w, conv):
            p.grad = torch.randn(p.shape, generator=g)
        before = [w.detach().clone(), conv.detach().clone()]
        opt.step()
        for p, q in zip((w, conv), before):
            exact = torch.linalg.matrix_norm((p.detach() - q).reshape(p.shape[0], -1).double(), ord=2)
            r = opt.update_spectral_norm(p, iters=300)
            torch.testing.assert_close(r.op.double(), exact, rtol=1e-4, atol=0)
            fan_out, fan_in = p.shape[0], p.numel() // p.shape[0]
            torch.testing.assert_close(r.rms_op, r.op * math.sqrt(fan_in / fan_out))
        state = opt.update_spectral_norm(w, state=state).state  # warm start accepted


def test_update_spectral_norm_errors():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = spkern.optim.SGD(model.named_parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="not been updated"):
        opt.update_spectral_norm("0.weight")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.update_spectral_norm("0.weight").op.item() > 0
    with pytest.raises(ValueError, match="matrix"):
        opt.update_spectral_norm("0.bias")
    with pytest.raises(KeyError, match="nope"):
        opt.update_spectral_norm("nope")
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.update_spectral_norm("2.weight")


@pytest.mark.parametrize("opt_cls", [spkern.optim.SGD, spkern.optim.AdamW])
def test_drift_continues_after_a_state_dict_round_trip(backend, opt_cls):
    def fresh(values=None):
        ps = _params()
        if values is not None:
            with torch.no_grad():
                for p, v in zip(ps, values):
                    p.copy_(v)
        return ps

    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(6)]

    def steps(opt, params, which):
        for k in which:
            for p, gr in zip(params, grads[k]):
                p.grad = gr.clone()
            opt.step()

    a = fresh()
    oa = opt_cls(a, lr=0.05, track_drift=True)
    steps(oa, a, range(3))
    saved = copy.deepcopy(oa.state_dict())  # (torch's state dict holds the live state tensors)
    steps(oa, a, range(3, 6))
    # resume: a new model with the weights at step 3 and a new optimizer from the state dict
    b = fresh()
    ob0 = opt_cls(b, lr=0.05, track_drift=True)
    steps(ob0, b, range(3))
    b2 = fresh([p.detach() for p in b])
    ob = opt_cls(b2, lr=0.05, track_drift=True)  # its own W_0 would be the weights at resume time
    ob.load_state_dict(saved)
    steps(ob, b2, range(3, 6))
    for x, y in zip(a, b2):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    da, db = oa.norm_stats(), ob.norm_stats()
    for p, q in zip(a, b2):
        torch.testing.assert_close(da[p]["drift_fro"], db[q]["drift_fro"], rtol=1e-6, atol=0)
    # torch's own optimizer takes the same state dict (the extra keys are ignored)
    (torch.optim.SGD if opt_cls is spkern.optim.SGD else torch.optim.AdamW)(fresh(), lr=0.05).load_state_dict(saved)


@pytest.mark.parametrize("opt_cls", [spkern.optim.SGD, spkern.optim.AdamW])
def test_a_group_added_later_is_tracked_from_its_first_step(backend, opt_cls):
    params = _params()
    opt = opt_cls(params[:3], lr=0.05, track_drift=True)
    for p in params[:3]:
        p.grad = torch.ones_like(p)
    opt.step()
    extra = params[3:]
    start = [p.detach().clone() for p in extra]
    opt.add_param_group({"params": extra, "lr": 0.01})
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    stats = opt.norm_stats()
    for p, p0 in zip(extra, start):
        assert p in stats
        torch.testing.assert_close(stats[p]["drift_fro"], (p.detach() - p0).norm(), rtol=1e-5, atol=1e-7)


# -- the operator norm's Lanczos product, fused into the CPU step (request_products) --------

PRODUCT_SHAPES = [(300, 37), (37,), (1, 1), (5, 1000), (129, 300), (4, 3, 5)]


@pytest.mark.parametrize("ours, theirs, kw", CASES[1::2], ids=["sgd", "adamw", "adamw amsgrad"][:len(CASES[1::2])])
@pytest.mark.parametrize("dtype, drift_dtype", [(torch.float32, None), (torch.float32, torch.bfloat16),
                                                (torch.bfloat16, None), (torch.float16, torch.float32)], ids=str)
def test_step_products_against_float64(ours, theirs, kw, dtype, drift_dtype):
    # (W_{t+1} - W_0)^T (W_{t+1} - W_0) v from the CPU step's own pass, against float64 of
    # the weights it wrote; the step itself is the one without products, to the bit
    g = torch.Generator().manual_seed(3)
    if ours is spkern.optim.AdamW:  # (an eps that float16 keeps: with 1e-8, torch's step gives infinities too)
        kw = {**kw, "eps": 1e-3}
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in PRODUCT_SHAPES]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ours(params, track_drift=True, drift_dtype=drift_dtype, **kw)
    plain = ours(twin, track_drift=True, drift_dtype=drift_dtype, **kw)
    matrices = [p for p in params if p.dim() >= 2]
    for step in range(3):
        for p, q in zip(params, twin):
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
            q.grad = p.grad.clone()
        vs = {p: torch.randn(p.numel() // p.shape[0], generator=g) for p in matrices}
        opt.request_products({p: (v, opt.initial_weights[p]) for p, v in vs.items()})
        opt.step()
        plain.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twin))
        got = opt.step_products()
        assert set(got) == set(matrices)
        for p in matrices:
            v, w, version = got[p]
            assert v is vs[p] and version == p._version and w.dtype == torch.float32
            A = (p.detach().double() - opt.initial_weights[p].double()).reshape(p.shape[0], -1)
            want = A.t() @ (A @ v.double())
            torch.testing.assert_close(w.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item() + 1e-30)
    opt.step()  # a request is for one step: none the next
    assert opt.step_products() == {}


def test_step_products_only_where_they_can_be_fused():
    g = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(20, 30, generator=g))
    v = torch.randn(30, generator=g)
    for make, ok in [(lambda: spkern.optim.SGD([w], lr=0.1, track_drift=True), True),
                     (lambda: spkern.optim.SGD([w], lr=0.1), False),  # no W_0 read by the step
                     (lambda: spkern.optim.SGD([w], lr=0.1, track_drift=True, drift_every=2), "odd")]:
        opt = make()
        for step in range(2):
            w.grad = torch.randn(w.shape, generator=g)
            w0 = opt.initial_weights.get(w, torch.zeros_like(w))
            opt.request_products({w: (v, w0)})
            opt.step()
            expected = ok is True or (ok == "odd" and step == 0)
            assert (w in opt.step_products()) == expected
    # W_0 other than the optimizer's own: not computed against the wrong one
    opt = spkern.optim.SGD([w], lr=0.1, track_drift=True)
    w.grad = torch.randn(w.shape, generator=g)
    opt.request_products({w: (v, opt.initial_weights[w].clone())})
    opt.step()
    assert opt.step_products() == {}
    # a vector of the wrong length, or another backend: none, and no error
    opt.request_products({w: (torch.randn(7), opt.initial_weights[w])})
    opt.step()
    assert opt.step_products() == {}
    with spkern.use_backend("reference"):
        opt.request_products({w: (v, opt.initial_weights[w])})
        opt.step()
    assert opt.step_products() == {}


def test_step_products_kernel_errors():
    C = pytest.importorskip("spkern._C")
    p, g = torch.randn(4, 6), torch.randn(4, 6)
    stats = torch.empty(1, 4)
    args = ([p], [g], [], [], [p.clone()], stats, 0.1, 0.0, 0.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match="one entry per requested"):
        C.sgd_step_cpu(*args, gram_index=[0], gram_v=[], gram_out=[])
    with pytest.raises(RuntimeError, match="distinct parameters"):
        C.sgd_step_cpu(*args, gram_index=[1], gram_v=[torch.ones(6)], gram_out=[torch.empty(6)])
    with pytest.raises(RuntimeError, match="row length"):
        C.sgd_step_cpu(*args, gram_index=[0], gram_v=[torch.ones(4)], gram_out=[torch.empty(4)])
    with pytest.raises(RuntimeError, match="initial weights"):
        C.sgd_step_cpu([p], [g], [], [], [], stats, 0.1, 0.0, 0.0, 0.0, False, False, gram_index=[0],
                       gram_v=[torch.ones(6)], gram_out=[torch.empty(6)])
