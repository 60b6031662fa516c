"""Width parameterizations: initialisation and per-layer learning rates as width grows.

Every parameterization here is written in "SP form": plain ``nn.Linear`` layers, no
output multipliers, a weight initialised N(0, var) and a per-layer learning rate

    lr_l = lr * (n / base_width) ** (-c_l)

where ``n`` is the width, ``lr`` the global learning rate (what a sweep varies) and
``c_l`` the exponent of layer l's role: ``input`` (d_in -> n), ``hidden`` (n -> n) or
``output`` (n -> classes). At ``n = base_width`` every layer trains at ``lr``.

=============  ==========================  ==================  ==================
name           init variance               SGD c (in/hid/out)  Adam c (in/hid/out)
=============  ==========================  ==================  ==================
sp             2 / fan_in everywhere (He)  0 / 0 / 0           0 / 0 / 0
mup            2 / fan_in; output 1 / n^2  -1 / 0 / 1          0 / 1 / 1
ntp            2 / fan_in everywhere       0 / 1 / 1           0 / 1/2 / 1/2
sp-full-align  2 / fan_in everywhere       -1/2 / 1/2 / 1      0 / 1 / 1
=============  ==========================  ==================  ==================

* ``sp``: standard parameterization, He initialisation and one global learning rate.
* ``mup``: the maximal-update parameterization (Yang & Hu 2021) for ReLU networks, with
  the output layer initialised at variance 1/n^2 and muP's per-layer rates.
* ``ntp``: the neural tangent parameterization (weights N(0, 1) times 1/sqrt(fan_in)),
  rewritten in SP form: the same functions at every step, with the rate of each matrix
  scaled by 1/fan_in for SGD and 1/sqrt(fan_in) for Adam.
* ``sp-full-align``: SP initialisation with the layerwise exponents that keep updates
  stable if weights and activations align fully (as in Haas et al. 2025, Everett et
  al. 2024).

Biases are initialised at zero and take the exponent of the input layer (they are
"vector-like": one entry per unit), except the output bias, which takes 0.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import nn

ROLES = ("input", "hidden", "output")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Parameterization:
    """Init variances (gain / fan_in ** power per role) and learning-rate exponents."""

    name: str
    init: Dict[str, tuple]  # role -> (gain, exponent of fan_in): var = gain / fan_in ** exponent
    lr_exponents: Dict[str, Dict[str, float]]  # optimizer -> role -> c

    def init_var(self, role: str, fan_in: int) -> float:
        """Variance of the initial weights of a layer in ``role`` with ``fan_in`` inputs."""
        gain, power = self.init[_role(role)]
        return gain / fan_in**power

    def lr_exponent(self, optim: str, role: str) -> float:
        """c_l of the table for ``optim`` ("sgd" or "adam") and ``role``."""
        if optim not in self.lr_exponents:
            raise ValueError(f"optim must be one of {OPTIMIZERS}, got {optim!r}")
        return self.lr_exponents[optim][_role(role)]

    def lr(self, lr: float, optim: str, role: str, width: int, base_width: int) -> float:
        """The learning rate of a layer: lr * (width / base_width) ** -c."""
        return lr * (width / base_width) ** -self.lr_exponent(optim, role)


def _role(role):
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return role


_HE = {"input": (2.0, 1), "hidden": (2.0, 1), "output": (2.0, 1)}
PARAMETERIZATIONS = {
    "sp": Parameterization("sp", _HE, {"sgd": dict(input=0, hidden=0, output=0),
                                       "adam": dict(input=0, hidden=0, output=0)}),
    "mup": Parameterization("mup", {"input": (2.0, 1), "hidden": (2.0, 1), "output": (1.0, 2)},
                            {"sgd": dict(input=-1, hidden=0, output=1), "adam": dict(input=0, hidden=1, output=1)}),
    "ntp": Parameterization("ntp", _HE, {"sgd": dict(input=0, hidden=1, output=1),
                                         "adam": dict(input=0, hidden=0.5, output=0.5)}),
    "sp-full-align": Parameterization("sp-full-align", _HE,
                                      {"sgd": dict(input=-0.5, hidden=0.5, output=1),
                                       "adam": dict(input=0, hidden=1, output=1)}),
}


def get(name: str) -> Parameterization:
    """The parameterization called ``name`` (see the table)."""
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {name!r}; choose from {sorted(PARAMETERIZATIONS)}")
    return PARAMETERIZATIONS[name]


class MLP(nn.Module):
    """ReLU MLP: ``d_in -> width x depth -> n_out``, ``depth`` hidden layers (so
    ``depth + 1`` Linear layers), initialised by :func:`init_`. Layers are named
    ``layers.0`` (input) ... ``layers.{depth}`` (output)."""

    def __init__(self, d_in: int, width: int, depth: int, n_out: int, *, bias: bool = False,
                 param: str = "sp"):
        super().__init__()
        for name, v in (("d_in", d_in), ("width", width), ("depth", depth), ("n_out", n_out)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        dims = [d_in] + [width] * depth + [n_out]
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1], bias=bias) for i in range(depth + 1))
        self.width, self.param = width, get(param)
        init_(self, param)

    def roles(self) -> List[str]:
        n = len(self.layers)
        return ["input" if i == 0 else "output" if i == n - 1 else "hidden" for i in range(n)]

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


@torch.no_grad()
def init_(model: MLP, param: str, generator=None):
    """Initialises ``model``'s weights with the variances of ``param``; biases at 0."""
    p = get(param)
    for layer, role in zip(model.layers, model.roles()):
        std = math.sqrt(p.init_var(role, layer.in_features))
        layer.weight.normal_(0.0, std, generator=generator)
        if layer.bias is not None:
            layer.bias.zero_()
    return model


def param_groups(model: MLP, param: str, optim: str, lr: float, base_width: int) -> List[dict]:
    """Optimizer parameter groups with each layer's learning rate (names included, so
    that :mod:`spkern.optim` and the tracker report by name)."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not isinstance(base_width, int) or base_width < 1:
        raise ValueError(f"base_width must be a positive int, got {base_width!r}")
    p = get(param)
    groups = []
    for i, (layer, role) in enumerate(zip(model.layers, model.roles())):
        groups.append({"params": [layer.weight], "param_names": [f"layers.{i}.weight"],
                       "lr": p.lr(lr, optim, role, model.width, base_width), "role": role})
        if layer.bias is not None:
            bias_role = "output" if role == "output" else "input"
            c = 0.0 if role == "output" else p.lr_exponent(optim, bias_role)
            groups.append({"params": [layer.bias], "param_names": [f"layers.{i}.bias"],
                           "lr": lr * (model.width / base_width) ** -c, "role": f"{role} bias"})
    return groups


def table_markdown(names: Sequence[str] = tuple(PARAMETERIZATIONS)) -> str:
    """The table of the module docstring, from the definitions (for reports)."""
    rows = ["| parameterization | init variance (input / hidden / output) | SGD c | Adam c |", "|---|---|---|---|"]
    for name in names:
        p = get(name)
        var = " / ".join(f"{g:g}/fan_in" + (f"^{e:g}" if e != 1 else "") for g, e in (p.init[r] for r in ROLES))
        sgd = " / ".join(f"{p.lr_exponents['sgd'][r]:g}" for r in ROLES)
        adam = " / ".join(f"{p.lr_exponents['adam'][r]:g}" for r in ROLES)
        rows.append(f"| {name} | {var} | {sgd} | {adam} |")
    return "\n".join(rows)


__all__ = ["MLP", "PARAMETERIZATIONS", "Parameterization", "get", "init_", "param_groups", "table_markdown"]
