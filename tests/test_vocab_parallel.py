"""Vocabulary-parallel losses (spkern.vocab_parallel): the gradient kernel of their second
pass against its float64 reference on every backend and dtype; one slice holding every
class equal to the unsharded loss; and on 2 gloo processes (tests/tp_loss_worker.py)
logits sharded over the classes equal to one process holding them whole, and to plain
torch in float64, for every option, with clear errors for placements spkern cannot use."""

import os

import pytest
import torch

import spkern
from spkern import registry, vocab_parallel
from spkern.cross_entropy import CROSS_ENTROPY, MSE_LOGITS, MSE_PROBS, logit_grad_reference

from conftest import BACKENDS, CPU_ISAS, backend_used, run_worlds

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _grad_call(kind, prob, weight, cap, C, dtype, M=6):
    x = torch.randn(M, C) * 3
    lse = torch.logsumexp(x, 1) + torch.rand(M)  # a slice's share of the row: below 1
    rows = torch.stack([lse, torch.randn(M), torch.rand(M) + 0.1, torch.randn(M)], 1).contiguous()
    if prob:
        target = torch.softmax(torch.randn(M, C), 1).to(dtype)
    else:
        target = torch.randint(0, C, (M,))
        target[1] = -2  # the target is in another slice
        target[2] = -1  # ignored (ignore_index = -1)
    w = torch.rand(C) + 0.5 if weight else None
    return x.to(dtype), target, w, rows, kind, -1, float(cap or 0.0)


GRAD_CASES = [(CROSS_ENTROPY, False, False, None), (CROSS_ENTROPY, False, True, 5.0),
              (CROSS_ENTROPY, True, True, 4.0), (MSE_LOGITS, False, False, None), (MSE_PROBS, False, False, None)]


@pytest.mark.parametrize("C", [37, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,prob,weight,cap", GRAD_CASES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS + CPU_ISAS if b != "reference"])  # (the reference: the truth)
def test_logit_grad_kernel_matches_float64_reference(backend, kind, prob, weight, cap, dtype, C):
    args = _grad_call(kind, prob, weight, cap, C, dtype)
    with backend_used(backend) as name:
        kernel = registry.resolve("logit_grad", args[0])
        assert kernel.backend == name
        got = kernel.fn(*args)
        # written into grad_out when given
        out = torch.empty_like(args[0])
        assert kernel.fn(*args, out) is out and torch.equal(out, got)
    x = args[0]
    want = logit_grad_reference(*args, torch.empty(x.shape, dtype=torch.float64))  # (in float64)
    assert got.dtype == dtype and got.shape == x.shape
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < TOL[dtype], err
    assert bool((got[2] == 0).all()) if not prob else True  # the ignored row


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["ce", "ce smoothing weight", "ce z softcap", "ce probs", "mse logits",
                                  "mse probs"])
def test_one_slice_holding_every_class_is_the_unsharded_loss(backend, case, reduction):
    # the vocabulary-parallel op with no group (offset 0, every class here) gives the
    # unsharded op's loss, statistics and gradient
    C, M = 37, 7
    kind = {"ce": CROSS_ENTROPY, "ms": MSE_LOGITS if "logits" in case else MSE_PROBS}[case[:2]]
    eps = 0.1 if "smoothing" in case else 0.0
    z, cap = (1e-3, 5.0) if "softcap" in case else (0.0, None)
    x = (torch.randn(M, C) * 3).requires_grad_()
    if "probs" in case and kind == CROSS_ENTROPY:
        y = torch.softmax(torch.randn(M, C), 1)
    else:
        y = torch.randint(0, C, (M,))
        y[2] = -100
    w = torch.rand(C) + 0.5 if "weight" in case else None
    loss, stats, _ = vocab_parallel.run(x, y, w, kind, -100, eps, z, cap, reduction, True, (None, 0, C))
    (g,) = torch.autograd.grad(loss.sum(), x)
    loss0, stats0, _ = torch.ops.spkern.logit_loss(x, y, w, kind, -100, eps, z, float(cap or 0), reduction, True, True)
    (g0,) = torch.autograd.grad(loss0.sum(), x)
    tol = dict(rtol=1e-5, atol=1e-6)  # (float32 logits: float32 results on every backend)
    torch.testing.assert_close(loss, loss0, **tol)
    torch.testing.assert_close(stats, stats0, **tol)
    torch.testing.assert_close(g, g0, **tol)


def test_partials_per_row():
    assert vocab_parallel.partials_per_row(CROSS_ENTROPY, False, 0.0) == 7
    assert vocab_parallel.partials_per_row(CROSS_ENTROPY, False, 0.1) == 8
    assert vocab_parallel.partials_per_row(MSE_PROBS, False, 0.0) == 8
    assert vocab_parallel.partials_per_row(CROSS_ENTROPY, True, 0.0) == 11


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return run_worlds(os.path.join(HERE, "tp_loss_worker.py"), tmp_path_factory.mktemp("tp_loss"), worlds=(2,))[2]


def _limits(name):
    dtype = name.split()[1]
    one = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 1e-5}[dtype]  # the same kernels on a slice
    f64 = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-2}[dtype]  # (bfloat16 rounding of sums)
    return one, f64


def test_sharded_logits_equal_one_process_and_float64(two):
    assert two["world"] == 2
    names = list(two["cases"])
    assert len(names) == len(set(names)) and len(names) >= 16 * 3
    for name, measured in two["cases"].items():
        one, f64 = _limits(name)
        assert measured.pop("is plain tensor") is True, name
        for what, err in measured.items():
            assert err <= (f64 if "float64" in what else one), (name, what, err)


def test_colwise_parallel_head_and_loss_parallel(two):
    # a ColwiseParallel head's logits (batch, seq, vocab) -> rows, the loss, and back to the
    # head's sharded weight and bias; the same inside torch's loss_parallel()
    for ctx in ("plain", "loss_parallel"):
        got = two["head"][ctx]
        assert got.pop("placements") == "(Shard(dim=2),)"
        for what, err in got.items():
            assert err < 1e-5, (ctx, what, err)
    assert two["head"]["3-d"]["shape"] is True
    assert two["head"]["3-d"]["loss"] < 1e-6 and two["head"]["3-d"]["entropy"] < 1e-6


def test_bad_placements_name_the_tensor(two):
    e = two["errors"]
    assert e["rows sharded"].startswith("ValueError: input has placement (S(0))")
    assert "Partial" in e["partial"] and e["partial"].startswith("ValueError: input")
    assert "to_local()" in e["replicated"]
    assert e["target sharded"].startswith("ValueError: target has placement (S(0))")
    assert e["plain input, DTensor target"].startswith("ValueError: input is a plain tensor but target")
    assert e["target out of range"].startswith("IndexError: target 10 is out of bounds for 10 classes")
    assert e["weight sharded"].startswith("ValueError: weight has placement (S(0))")


def test_probability_target_requiring_grad_is_refused_on_sharded_logits():
    # (no process group needed: the check comes before any placement is read)
    from unittest import mock

    x = torch.randn(3, 5)
    t = torch.rand(3, 5, requires_grad=True)
    with mock.patch("spkern.cross_entropy.is_dtensor", return_value=True), \
            pytest.raises(ValueError, match="requires grad is not supported with vocabulary-sharded"):
        spkern.cross_entropy(x, t)


def test_vocab_parallel_linear_loss_equals_one_process_and_float64(two):
    # the head's weight and bias sharded over the vocabulary (Shard(0)), the hidden states
    # whole: loss, statistics, and the gradients of the input (all-reduced), of the weight's
    # and the bias's rows; several chunks; reduction "none" (gradients in backward)
    cases = two["linear"]
    assert len(cases) >= 19
    for name, measured in cases.items():
        bf16 = measured.pop("dtype") == "bfloat16"
        for what, err in measured.items():
            if "float64" in what:
                limit = 2e-2 if bf16 else 1e-4
            else:  # (bfloat16: each rank's part of d input is rounded once before the sum)
                limit = 1e-2 if bf16 else 1e-5
            assert err <= limit, (name, what, err)


def test_vocab_parallel_linear_loss_bad_placements(two):
    e = two["errors"]
    assert e["linear: weight sharded on columns"].startswith("ValueError: weight has placement (S(1))")
    assert "Shard(0)" in e["linear: weight sharded on columns"]
    assert e["linear: bias plain"].startswith("ValueError: bias must be sharded as weight (S(0))")
    assert e["linear: weight plain, input DTensor"].startswith("ValueError: weight is a plain tensor")
    assert e["linear: input sharded"].startswith("ValueError: input has placement (S(0))")
