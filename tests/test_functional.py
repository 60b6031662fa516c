"""spkern.functional.linear_cross_entropy against torch.nn.functional.linear_cross_entropy
(torch 2.13) over the argument combinations torch accepts: the same loss and gradients
(input, linear weight and bias, and a probability target that requires grad), fused
where the kernel takes the call, torch's own function otherwise."""

import pytest
import torch
import torch.nn.functional as F

import spkern
from spkern.functional import fused_reason, linear_cross_entropy

CASES = {
    "rows": dict(N=6, D=5, C=9),
    "one row": dict(N=1, D=5, C=9),
    "one class": dict(N=6, D=5, C=1),
    "unbatched": dict(N=None, D=5, C=9),
    "K-dim weight": dict(N=6, D=5, C=4, extra=(3,)),
}


def _make(case, probs, bias, dtype, g, ignore=-100):
    N, D, C, extra = case["N"], case["D"], case["C"], case.get("extra", ())
    x = torch.randn(*(() if N is None else (N,)), D, generator=g, dtype=dtype)
    w = torch.randn(C, *extra, D, generator=g, dtype=dtype) * D**-0.5
    b = torch.randn(C, *extra, generator=g, dtype=dtype) if bias else None
    lead = () if N is None else (N,)
    if probs:
        t = torch.rand(*lead, C, *extra, generator=g, dtype=dtype).softmax(len(lead))
    else:
        t = torch.randint(0, C, (*lead, *extra), generator=g)
        if t.numel() > 2:
            t.view(-1)[1] = ignore  # one ignored target
    return x, w, b, t


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("options", [{}, {"reduction": "sum", "label_smoothing": 0.1},
                                     {"reduction": "none", "class_weight": True}, {"ignore_index": 2}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cross_entropy_equals_torch(backend, case, probs, options, dtype):
    g = torch.Generator().manual_seed(0)
    kw = dict(options)
    x, w, b, t = _make(CASES[case], probs, bias=True, dtype=dtype, g=g, ignore=kw.get("ignore_index", -100))
    if kw.pop("class_weight", False):
        kw["weight"] = torch.rand(w.shape[0], generator=g, dtype=dtype) + 0.5
    if probs and "ignore_index" in kw:
        pytest.skip("ignore_index applies to class indices")
    leaves = [x, w, b] + ([t] if probs else [])
    ours_in = [a.clone().requires_grad_() for a in leaves]
    theirs_in = [a.clone().requires_grad_() for a in leaves]

    def call(fn, args):
        xx, ww, bb = args[:3]
        tt = args[3] if probs else t
        return fn(xx, ww, tt, linear_bias=bb, **kw)
    with spkern.use_backend(backend):
        ours = call(linear_cross_entropy, ours_in)
    theirs = call(F.linear_cross_entropy, theirs_in)
    torch.testing.assert_close(ours, theirs, equal_nan=True)  # (every target ignored: nan, as torch)
    gout = torch.randn(theirs.shape, generator=g, dtype=dtype)
    (ours * gout).sum().backward()
    (theirs * gout).sum().backward()
    for a, b_ in zip(ours_in, theirs_in):
        torch.testing.assert_close(a.grad, b_.grad, equal_nan=True)


def test_fused_where_it_can_be():
    x, w, t = torch.randn(4, 3), torch.randn(5, 3), torch.randint(0, 5, (4,))
    assert fused_reason(x, w, t, None) is None and fused_reason(x[0], w, t[0], torch.randn(5)) is None
    assert fused_reason(x, w, torch.rand(4, 5), None) == "probability targets"
    assert "linear_weight" in fused_reason(x, torch.randn(5, 2, 3), t, None)
    assert "3-d input" in fused_reason(torch.randn(2, 4, 3), w, t, None)
    with pytest.raises(RuntimeError, match="dimensionality"):  # torch's own error for what torch refuses
        linear_cross_entropy(torch.randn(2, 4, 3), w, torch.randint(0, 5, (2, 4)))
