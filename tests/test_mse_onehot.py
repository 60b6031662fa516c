"""spkern.mse_onehot_loss against F.mse_loss on one-hot targets in float64."""

import pytest
import torch
import torch.nn.functional as F

import spkern
from test_cross_entropy import TOL, make_inputs, stats_reference


def torch_reference(x, target, on="logits", reduction="mean", ignore_index=-100):
    x = x.double()
    C = x.shape[1] if x.dim() > 1 else x.shape[0]
    x2 = x.movedim(1, -1).reshape(-1, C) if x.dim() > 2 else x.reshape(-1, C)
    t2 = target.reshape(-1)
    valid = t2 != ignore_index
    pred = x2 if on == "logits" else torch.softmax(x2, 1)
    onehot = F.one_hot(torch.where(valid, t2, 0), C).double()
    rows = torch.where(valid, F.mse_loss(pred, onehot, reduction="none").sum(1), 0.0)
    if reduction == "none":
        return rows.reshape(target.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (valid.sum() * C)


@pytest.mark.parametrize("on", ["logits", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("C", [1, 3, 1000, 4099])
@pytest.mark.parametrize("ignore", [False, True])
def test_matches_torch(backend, on, reduction, C, ignore):
    x, target = make_inputs((11, C), torch.float32, ignore=ignore)
    if on == "logits":
        x = x / 3
    xs = x.clone().requires_grad_()
    loss = spkern.mse_onehot_loss(xs, target, on=on, reduction=reduction)
    xr = x.double().requires_grad_()
    ref = torch_reference(xr, target, on, reduction)
    torch.testing.assert_close(loss.double(), ref, **TOL[torch.float32])
    go = torch.randn_like(ref)
    (g,) = torch.autograd.grad(loss, xs, go.float())
    (gr,) = torch.autograd.grad(ref, xr, go)
    torch.testing.assert_close(g.double(), gr, rtol=2e-5, atol=2e-6 * max(gr.abs().max().item(), 1e-3))


def test_mean_equals_mse_loss_without_ignored_rows(backend):
    x, target = make_inputs((9, 37), torch.float32)
    for on, pred in (("logits", x), ("probs", torch.softmax(x, 1))):
        ref = F.mse_loss(pred, F.one_hot(target, 37).float())
        torch.testing.assert_close(spkern.mse_onehot_loss(x, target, on=on), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("on", ["logits", "probs"])
def test_half_precision(backend, dtype, on):
    x, target = make_inputs((7, 515), dtype, ignore=True)
    xs = x.clone().requires_grad_()
    loss = spkern.mse_onehot_loss(xs, target, on=on, reduction="sum")
    assert loss.dtype == dtype
    xr = x.double().requires_grad_()
    ref = torch_reference(xr, target, on, "sum")
    torch.testing.assert_close(loss.double(), ref, **TOL[dtype])
    loss.backward()
    ref.backward()
    scale = xr.grad.abs().max().item()
    torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale * 10)


def test_k_dimensional_and_stats(backend):
    x, target = make_inputs((3, 13, 5), torch.float32, ignore=True)
    loss, st = spkern.mse_onehot_loss(x, target, on="probs", reduction="none", return_stats=True)
    torch.testing.assert_close(loss.double(), torch_reference(x, target, "probs", "none"), **TOL[torch.float32])
    rows = x.movedim(1, -1).reshape(-1, 13)
    ref = stats_reference(rows, target.reshape(-1))
    for name, value in ref.items():
        got = getattr(st, name).reshape(-1)
        assert getattr(st, name).shape == target.shape
        if name == "correct":
            assert torch.equal(got, value)
        else:
            torch.testing.assert_close(got.double(), value, rtol=2e-5, atol=2e-5)


def test_gradcheck_float64():
    x, target = make_inputs((4, 6), torch.float64, ignore=True)
    for on in ("logits", "probs"):
        assert torch.autograd.gradcheck(
            lambda x: spkern.mse_onehot_loss(x, target, on=on, reduction="sum"), (x.requires_grad_(),))


@pytest.mark.parametrize("call, error, match", [
    (lambda x, t: spkern.mse_onehot_loss(x, t, on="loss"), ValueError, "on must be"),
    (lambda x, t: spkern.mse_onehot_loss(x, t.float()), TypeError, "class indices must be int64"),
    (lambda x, t: spkern.mse_onehot_loss(x, torch.rand(6, 10)), TypeError, "class indices"),
    (lambda x, t: spkern.mse_onehot_loss(x, t, reduction="avg"), ValueError, "reduction"),
    (lambda x, t: spkern.mse_onehot_loss(x, t[:3]), ValueError, "target"),
])
def test_bad_arguments(call, error, match):
    x, t = torch.randn(6, 10), torch.randint(0, 10, (6,))
    with pytest.raises(error, match=match):
        call(x, t)


def test_target_out_of_range(backend):
    x, t = torch.randn(6, 10), torch.randint(0, 10, (6,))
    t[1] = 10
    with pytest.raises(IndexError, match="out of bounds"):
        spkern.mse_onehot_loss(x, t, on="probs")
