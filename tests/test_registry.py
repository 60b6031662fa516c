"""The op registry: every public op resolves through it, a backend that cannot run a call
warns once per (op, reason) and names the one used, and `python -m spkern info` tells."""

import subprocess
import sys
import warnings

import pytest
import torch

import spkern
from spkern import registry


def _calls():
    """Every public op that resolves a kernel, as (op, call) on CPU float32 tensors."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 11, generator=g), torch.randint(0, 11, (6,), generator=g)
    h, w = torch.randn(5, 9, generator=g), torch.randn(7, 9, generator=g)

    p0, g0 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)

    def sgd():
        p = torch.nn.Parameter(p0.clone())
        p.grad = g0.clone()
        opt = spkern.optim.SGD([p], lr=0.1, momentum=0.9)
        opt.step()
        return opt.norm_stats()[p]["update_fro"]

    def adamw():
        p = torch.nn.Parameter(p0.clone())
        p.grad = g0.clone()
        opt = spkern.optim.AdamW([p], lr=0.1)
        opt.step()
        return opt.norm_stats()[p]["update_fro"]

    return {
        "cross_entropy": lambda: spkern.cross_entropy(x, t),
        # (the vocabulary-parallel op's gradient, with one slice holding every class)
        "logit_grad": lambda: torch.ops.spkern.logit_loss_vocab_parallel(
            x, t, None, 0, -100, 0.0, 0.0, 0.0, "mean", False, True, 0, 11, "")[2],
        "multi_tensor_norms": lambda: spkern.multi_tensor_norms([x, h], [x * 2, h]),
        "pair_stats": lambda: spkern.pair_stats(h, h * 0.5),
        "multi_pair_stats": lambda: spkern.features.multi_pair_stats([(h, h * 0.5), (x, None)]),
        "paired_linear": lambda: spkern.features.paired_linear(h, w, w * 0.5),
        "spectral_norm": lambda: spkern.spectral_norm(w, minus=w * 0.5).op,
        "sgd_step": sgd,
        "adamw_step": adamw,
    }


def test_every_op_is_called_here():
    assert set(_calls()) == set(registry.OPS)


@pytest.mark.parametrize("op", list(registry.OPS))
def test_a_backend_that_cannot_run_warns_once_and_the_result_is_right(op):
    call = _calls()[op]
    expected = call()
    registry._warn_once.cache_clear()
    with spkern.use_backend("cuda"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [call(), call()]
    messages = [str(w.message) for w in caught if f"spkern.{op}: backend 'cuda'" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert "device cpu" in messages[0] or f"no {op} kernel" in messages[0]
    assert "using 'cpu'" in messages[0]
    for value in got:
        for a, b in zip(value if isinstance(value, tuple) else (value,),
                        expected if isinstance(expected, tuple) else (expected,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_each_backend_resolves_what_it_registers():
    x = torch.randn(3, 4)
    for (op, backend), kernel in registry.kernels().items():
        assert kernel.op == op and kernel.backend == backend and callable(kernel.fn)
    with spkern.use_backend("reference"):
        assert registry.resolve("cross_entropy", x).backend == "reference"
        assert registry.resolve("sgd_step", x, [x], [x]) is None  # torch's own step
    assert registry.resolve("cross_entropy", x).backend == "cpu"
    # a layout the fused step cannot take: torch's step, and the reason names the layout
    reason = registry.reason("sgd_step", "cpu", x, [x, x.double()], [x, x.double()])
    assert "dtype" in reason


def test_register_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown op"):
        registry.register("softmax", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        registry.register("pair_stats", "tpu")


def test_info_lists_every_op_on_both_devices():
    out = subprocess.run([sys.executable, "-m", "spkern", "info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "spkern._C" in out and "triton" in out
    assert "ops on cpu tensors" in out and "ops on cuda tensors" in out
    for op in registry.OPS:
        assert out.count(op) >= 2, op
    table = registry.table()
    assert table["cpu"]["cross_entropy"][0] == "cpu"
    assert table["cuda"]["cross_entropy"][0] == "triton"
    assert table["cpu"]["cross_entropy"][1]["cuda"] == "device cpu"
