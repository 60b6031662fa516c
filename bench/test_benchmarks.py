"""pytest-benchmark suites for the same cases as the benchmark scripts, at sizes that run
in seconds, so that regressions can be tracked:

    pytest bench --benchmark-only
    pytest bench --benchmark-only --benchmark-autosave       # store a baseline
    pytest bench --benchmark-only --benchmark-compare        # compare with the last one

Each group holds spkern and the PyTorch way of the same computation.
"""

import pytest
import torch
import torch.nn.functional as F

import spkern

pytest.importorskip("pytest_benchmark")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _logits(rows=1024, vocab=8192):
    x = torch.randn(rows, vocab, requires_grad=True)
    return x, torch.randint(0, vocab, (rows,))


@pytest.mark.parametrize("impl", ["torch", "spkern"])
def test_cross_entropy(benchmark, impl):
    benchmark.group = "cross-entropy fwd+bwd 1024x8192"
    x, t = _logits()

    def step():
        x.grad = None
        (F.cross_entropy(x, t) if impl == "torch" else spkern.cross_entropy(x, t, return_stats=True)[0]).backward()

    benchmark(step)


@pytest.mark.parametrize("impl", ["torch", "spkern"])
def test_mse_onehot(benchmark, impl):
    benchmark.group = "mse on one-hot fwd+bwd 1024x8192"
    x, t = _logits()

    def step():
        x.grad = None
        if impl == "torch":
            F.mse_loss(x, F.one_hot(t, x.shape[1]).float()).backward()
        else:
            spkern.mse_onehot_loss(x, t, return_stats=True)[0].backward()

    benchmark(step)


@pytest.mark.parametrize("impl", ["torch", "spkern"])
def test_linear_cross_entropy(benchmark, impl):
    benchmark.group = "linear cross-entropy 1024x256x8192"
    x = torch.randn(1024, 256, requires_grad=True)
    w = (torch.randn(8192, 256) / 16).requires_grad_()
    t = torch.randint(0, 8192, (1024,))

    def step():
        x.grad = w.grad = None
        if impl == "torch":
            F.cross_entropy(F.linear(x, w), t).backward()
        else:
            spkern.linear_cross_entropy(x, w, t, return_stats=True)[0].backward()

    benchmark(step)


def _mlp_params(width=1024):
    dims = [784] + [width] * 3 + [10]
    return [torch.randn(dims[i + 1], dims[i]) / dims[i] ** 0.5 for i in range(4)]


@pytest.mark.parametrize("impl", ["torch", "spkern"])
def test_multi_tensor_norms(benchmark, impl):
    benchmark.group = "pair norms of an MLP's parameters"
    a = _mlp_params()
    b = [p + 1e-3 for p in a]

    def torch_way():
        return torch.stack([torch.stack([(p - q).square().sum(), p.square().sum(), q.square().sum(), (p * q).sum()])
                            for p, q in zip(a, b)])

    benchmark(torch_way if impl == "torch" else lambda: spkern.multi_tensor_norms(a, b))


@pytest.mark.parametrize("impl", ["torch plain step", "torch step + naive norms", "spkern step with norms"])
def test_optimizer_step(benchmark, impl):
    benchmark.group = "AdamW step of an MLP"
    params = [torch.nn.Parameter(p) for p in _mlp_params()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    if impl.startswith("spkern"):
        opt = spkern.optim.AdamW(params, lr=1e-3)
        step = opt.step
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
        if impl == "torch plain step":
            step = opt.step
        else:
            def step():
                before = [p.detach().clone() for p in params]
                opt.step()
                return [((p - q).norm(), p.norm(), p.grad.norm()) for p, q in zip(params, before)]
    benchmark(step)


@pytest.mark.parametrize("impl", ["no tracking", "spkern Tracker"])
def test_tracked_training_step(benchmark, impl):
    benchmark.group = "training step of a 512-wide MLP"
    model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 10))
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    opt = spkern.optim.SGD(model.parameters(), lr=0.01)
    tracker = spkern.Tracker(model, opt, probe=x[:32]) if impl != "no tracking" else None

    def step():
        opt.zero_grad()
        loss, stats = spkern.cross_entropy(model(x), y, return_stats=True)
        loss.backward()
        opt.step()
        if tracker is not None:
            tracker.record_loss(loss, stats)
            return tracker.metrics()

    benchmark(step)
