"""spkern.coord_check: the refined coordinate check of a model across widths, on an MLP
in standard parameterization and in muP, where the width exponents are known."""

import math
import subprocess
import sys

import pytest
import torch

import spkern
from spkern.experiments import param
from spkern.experiments.data import load

WIDTHS = [64, 128, 256, 512, 1024]


def _check(p, lr=0.002):
    data = load("digits")
    x, y = data.x_train[:128], data.y_train[:128]

    def optimizer(m):
        return torch.optim.SGD(param.param_groups(m, p, "sgd", lr, WIDTHS[0]), lr=lr)
    return spkern.coord_check(lambda n: param.MLP(data.d_in, n, 2, data.n_classes, param=p), (x, y), optimizer,
                              widths=WIDTHS, steps=3)


def test_standard_parameterization_at_a_fixed_rate():
    # SGD in SP: the input layer's effective update shrinks as width^(-1/2), the hidden
    # layer's grows as width^(1/2), the output layer's as width^1 (a little less here: the
    # widest models begin to saturate the softmax)
    check = _check("sp")
    eff = check.exponents["eff_rms"]
    assert -0.65 < eff["layers.0"] < -0.35 and 0.3 < eff["layers.1"] < 0.7 and 0.65 < eff["layers.2"] < 1.15
    assert -0.7 < check.exponents["prop_rms"]["layers.1"] < -0.35
    flagged = {(layer, metric): how for layer, metric, _, how in check.flags}
    assert flagged[("layers.1", "eff_rms")] == "grows" and flagged[("layers.0", "eff_rms")] == "shrinks"
    assert len(check.history["eff_rms"]["layers.1"]) == len(WIDTHS) and len(check.history["eff_rms"]["layers.1"][0]) == 3


def test_mup_keeps_every_layer_stable():
    check = _check("mup")
    for metric, layers in check.exponents.items():
        for layer, e in layers.items():
            assert e is None or abs(e) < 0.15, (metric, layer, e)
    assert not check.flags
    assert check.exponents["prop_rms"]["layers.0"] is None  # (the input does not move: no exponent)
    table = check.table()
    assert "| layers.1 |" in table and "!" not in table.split("\n\n")[0].replace("Exponents", "")


def test_plot_and_bad_arguments(tmp_path):
    data = (torch.randn(8, 5), torch.randint(0, 3, (8,)))

    def model(n):
        return torch.nn.Sequential(torch.nn.Linear(5, n), torch.nn.ReLU(), torch.nn.Linear(n, 3))

    def opt(m):
        return torch.optim.SGD(m.parameters(), lr=0.1)
    check = spkern.coord_check(model, [data, data], opt, widths=[8, 16], steps=2)
    check.plot(str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert math.isfinite(check.exponents["eff_rms"]["2"])
    with pytest.raises(ValueError, match="widths"):
        spkern.coord_check(model, data, opt, widths=[8])
    with pytest.raises(TypeError, match="data"):
        spkern.coord_check(model, 3, opt, widths=[8, 16])


def test_the_command_on_a_model_of_yours(tmp_path):
    factory = tmp_path / "mine.py"
    factory.write_text("import torch\n\n"
                       "def make(width):\n"
                       "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.Tanh(),\n"
                       "                               torch.nn.Linear(width, 10))\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "spkern", "coord-check", f"{factory}:make", "--widths", "32,64",
                           "--steps", "2", "--out", str(out), "--device", "cpu"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 1 |" in proc.stdout and (out / "coord.png").exists() and "mine.py:make" in (out / "coord.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "spkern", "coord-check", "nofile.py:make"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "FILE.py:FUNCTION" in bad.stderr
