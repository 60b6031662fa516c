"""The drop-ins against torch on torch's own test inputs: every sample that torch's OpInfo
database (torch.testing._internal.common_methods_invocations) gives for
F.cross_entropy and F.linear_cross_entropy (its plain, chunked and chunked-"none"
variants), in float32 and float64 with gradients: the same loss, the same gradients of
every input that requires them (input, weights, bias, probability targets), and an error
where torch raises one."""

import warnings

import pytest
import torch

import spkern
import spkern.functional
from torch.testing._internal.common_methods_invocations import op_db

OURS = {"nn.functional.cross_entropy": spkern.cross_entropy,
        "nn.functional.linear_cross_entropy": spkern.functional.linear_cross_entropy}
OPS = [o for o in op_db if o.name in OURS]


def _leaves(sample):
    tensors = [sample.input, *[a for a in sample.args if isinstance(a, torch.Tensor)],
               *[v for v in sample.kwargs.values() if isinstance(v, torch.Tensor)]]
    return [t for t in tensors if t.requires_grad]


def _describe(op, dtype, s):
    def one(v):
        return tuple(v.shape) if isinstance(v, torch.Tensor) else v
    return (f"{op.name}[{op.variant_test_name}] {dtype} input {one(s.input)} args {[one(a) for a in s.args]} "
            f"kwargs { {k: one(v) for k, v in s.kwargs.items() if k != 'options'} }")


def test_the_opinfo_database_has_the_ops():
    assert {(o.name, o.variant_test_name) for o in OPS} >= {
        ("nn.functional.cross_entropy", ""), ("nn.functional.linear_cross_entropy", ""),
        ("nn.functional.linear_cross_entropy", "chunked"), ("nn.functional.linear_cross_entropy", "chunked_none")}


@pytest.mark.parametrize("op", OPS, ids=lambda o: f"{o.name.split('.')[-1]}-{o.variant_test_name or 'plain'}")
def test_same_numbers_as_torch_on_its_own_samples(backend, op):
    ours = OURS[op.name]
    mismatches, samples, fused = [], 0, 0
    for dtype in (torch.float32, torch.float64):
        for s in op.sample_inputs("cpu", dtype, requires_grad=True):
            samples += 1
            mine = s.transform(lambda t: t.detach().clone().requires_grad_(t.requires_grad)
                               if isinstance(t, torch.Tensor) else t)
            where = _describe(op, dtype, s)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (torch's chunking notes, spkern's float64 fallback)
                try:
                    want = op.op(s.input, *s.args, **s.kwargs)
                except Exception:  # torch refuses the call: so must the drop-in
                    with pytest.raises(Exception):
                        ours(mine.input, *mine.args, **mine.kwargs)
                    continue
                got = ours(mine.input, *mine.args, **mine.kwargs)
            if op.name.endswith("linear_cross_entropy"):
                fused += spkern.functional.fused_reason(s.input, s.args[0], s.args[1],
                                                        s.kwargs.get("linear_bias")) is None
            if got.shape != want.shape or got.dtype != want.dtype or not torch.allclose(
                    got, want, rtol=1e-4, atol=1e-6, equal_nan=True):
                mismatches.append(f"{where}: loss")
                continue
            theirs_leaves, our_leaves = _leaves(s), _leaves(mine)
            if not want.requires_grad or not theirs_leaves:
                continue
            g_want = torch.autograd.grad(want.sum(), theirs_leaves, allow_unused=True)
            g_got = torch.autograd.grad(got.sum(), our_leaves, allow_unused=True)
            for i, (a, b) in enumerate(zip(g_want, g_got)):
                if (a is None) != (b is None) or (a is not None and not torch.allclose(
                        b, a, rtol=1e-4, atol=1e-6, equal_nan=True)):
                    mismatches.append(f"{where}: gradient of tensor {i}")
    assert samples > 20
    assert not mismatches, f"{len(mismatches)} of {samples} samples differ:\n" + "\n".join(mismatches[:20])
    if op.name.endswith("linear_cross_entropy"):
        assert fused > 0  # (some samples take spkern's kernel, the others torch's own function)
