"""spkern.experiments.param: init variances and per-layer learning rates against their formulas."""

import math

import pytest
import torch

from spkern.experiments import param as P

EXPECTED_C = {  # (sgd, adam) exponents for (input, hidden, output)
    "sp": ((0, 0, 0), (0, 0, 0)),
    "mup": ((-1, 0, 1), (0, 1, 1)),
    "ntp": ((0, 1, 1), (0, 0.5, 0.5)),
    "sp-full-align": ((-0.5, 0.5, 1), (0, 1, 1)),
}


@pytest.mark.parametrize("name", list(P.PARAMETERIZATIONS))
def test_init_variances(name):
    torch.manual_seed(0)
    width, d_in, n_out = 512, 300, 400
    model = P.MLP(d_in, width, 2, n_out, bias=True, param=name)
    expected = {"input": 2 / d_in, "hidden": 2 / width,
                "output": (1 / width**2) if name == "mup" else 2 / width}
    for layer, role in zip(model.layers, model.roles()):
        var = layer.weight.detach().double().var().item()
        assert math.isclose(var, expected[role], rel_tol=0.03), (role, var, expected[role])
        assert math.isclose(P.get(name).init_var(role, layer.in_features), expected[role], rel_tol=1e-12)
        assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("name", list(P.PARAMETERIZATIONS))
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_layer_learning_rates(name, optim):
    model = P.MLP(10, 256, 3, 5, bias=True, param=name)
    groups = P.param_groups(model, name, optim, 0.1, base_width=64)
    c = dict(zip(("input", "hidden", "output"), EXPECTED_C[name][optim == "adam"]))
    weights = [g for g in groups if not g["role"].endswith("bias")]
    assert [g["role"] for g in weights] == ["input", "hidden", "hidden", "output"]
    for g in weights:
        assert math.isclose(g["lr"], 0.1 * (256 / 64) ** -c[g["role"]], rel_tol=1e-12)
    for g in groups:
        if g["role"] == "output bias":
            assert g["lr"] == 0.1
        elif g["role"].endswith("bias"):
            assert math.isclose(g["lr"], 0.1 * 4 ** -c["input"], rel_tol=1e-12)
    # at the base width every layer trains at lr
    base = P.MLP(10, 64, 3, 5, param=name)
    assert all(g["lr"] == 0.1 for g in P.param_groups(base, name, optim, 0.1, base_width=64))


def test_param_groups_work_with_the_optimizers():
    import spkern

    model = P.MLP(10, 32, 2, 5, param="mup")
    opt = spkern.optim.SGD(P.param_groups(model, "mup", "sgd", 0.1, 16), lr=0.1)
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    assert set(opt.norm_stats()) == {"layers.0.weight", "layers.1.weight", "layers.2.weight"}


def test_table_lists_every_parameterization():
    table = P.table_markdown()
    for name in P.PARAMETERIZATIONS:
        assert f"| {name} |" in table


@pytest.mark.parametrize("call, match", [
    (lambda: P.get("spx"), "unknown parameterization"),
    (lambda: P.MLP(0, 8, 1, 2), "d_in"),
    (lambda: P.get("sp").lr_exponent("rmsprop", "input"), "optim"),
    (lambda: P.get("sp").init_var("middle", 3), "role"),
    (lambda: P.param_groups(P.MLP(2, 4, 1, 2), "sp", "sgd", -1.0, 4), "lr"),
    (lambda: P.param_groups(P.MLP(2, 4, 1, 2), "sp", "sgd", 0.1, 0), "base_width"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
