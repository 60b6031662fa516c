"""What a layer is to the tracker, and how it applies its weight.

The refined coordinate check of a layer is defined on the layer's own map f(x; θ): its
output with its parameters θ, the biases left out (see :mod:`spkern.monitor.measure`).
How the tracker evaluates f depends on what it knows of the layer (:func:`layer_kind`):

``"linear"``   ``F.linear`` on a plain weight: ``nn.Linear`` (and subclasses that do not
               override its forward nor add parameters), and the projections of
               ``nn.MultiheadAttention``; ``torch.addmm`` on transformers' ``Conv1D``
               weight. The tracker's passes capture the call on the weight and compute
               W_t x and W_0 x together (one pass over x).
``"map"``      a known layer that applies its weight as a linear map (the table below, or
               :func:`register_layer`), its weight plain or parametrized
               (``torch.nn.utils.parametrize``): f(x; θ) = ``map.apply(x, W(θ))``.
``"generic"``  any other layer with a weight matrix of its own: an ``nn.Linear`` subclass
               with an adapter, a layer under ``torch.nn.utils.spectral_norm``, a layer of
               your own: f(x; θ) is the layer's own forward with θ in place of its
               parameters (no operator norms: the tracker does not know its matrix).
``"output"``   norm layers, and blocks named in ``modules=``: output statistics.

Known maps:

    torch.nn.Linear                      x W^T
    transformers' Conv1D (GPT-2 & co.)   x W, the weight stored (in, out)
    torch.nn.Embedding                   W[x]: x are indices (no input statistics)
    torch.nn.Conv1d / Conv2d / Conv3d    the convolution with W (op of W as a (out, in*k...) matrix)

Norm layers are found by duck type (:func:`is_norm`: a class named ``...Norm...`` with a
1-D weight and no submodules: LayerNorm, RMSNorm, nanoGPT's and Hugging Face's own).
Teach the tracker a layer of your own, for its operator norms and alignments, with
:func:`register_layer`::

    class MyMap(spkern.monitor.LinearMap):
        def apply(self, module, x, weight):
            return my_op(x, weight)            # the layer's output without its bias

    spkern.monitor.register_layer(MyLayer, MyMap())

Nothing here reads a parametrized weight (each read of ``.weight`` under
``parametrizations.spectral_norm`` in training mode advances its power iteration): the
parameters are found in the modules' own tables.
"""

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize


class LinearMap:
    """How a layer applies its weight. Subclass and override :meth:`apply` (and the
    attributes where they differ), then :func:`register_layer`."""

    float_input = True  # the input is an activation (input statistics); False: indices
    alignments = True   # eff_align and prop_align: ||A x|| <= op(A) ||x|| for the layer's x
    per_row = True      # row_l2 entries: the output's rows are its last dimension's vectors

    def apply(self, module, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's output on ``x`` with ``weight`` in place of its own, bias left out."""
        raise NotImplementedError


class _Linear(LinearMap):
    def apply(self, module, x, weight):
        return F.linear(x, weight.to(x.dtype))


class _Conv1D(LinearMap):  # transformers.pytorch_utils.Conv1D: weight (in, out), y = x W + b
    def apply(self, module, x, weight):
        return torch.matmul(x, weight.to(x.dtype))


class _Embedding(LinearMap):
    float_input = False
    alignments = False

    def apply(self, module, x, weight):
        rows = F.embedding(x, weight)
        if getattr(module, "max_norm", None) is None:
            return rows
        # the rows as the layer's forward renormalises them (F.embedding's max_norm), without
        # writing the weight
        norm = rows.norm(p=module.norm_type, dim=-1, keepdim=True)
        return rows * torch.where(norm > module.max_norm, module.max_norm / (norm + 1e-7), 1.0)


class _Conv(LinearMap):
    alignments = False  # (op of the flattened kernel does not bound the convolution's gain)
    per_row = False

    def apply(self, module, x, weight):
        return module._conv_forward(x, weight.to(x.dtype), None)


def _is_hf_conv1d(m):
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and weight_parameter(m) is not None


LINEAR, CONV1D = _Linear(), _Conv1D()

_LAYERS = [
    (nn.Linear, LINEAR),
    (_is_hf_conv1d, CONV1D),
    (nn.Embedding, _Embedding()),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _Conv()),
]
_BUILTIN = {nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d}


def register_layer(layer: Union[type, tuple, Callable[[nn.Module], bool]], linear_map: LinearMap):
    """Teaches the tracker a layer: modules of type ``layer`` (or for which the predicate
    ``layer(module)`` is true) are measured with ``linear_map``. Later registrations take
    precedence, so a known type can be given another map."""
    if not isinstance(linear_map, LinearMap):
        raise TypeError(f"linear_map must be a spkern.monitor.LinearMap, got {type(linear_map).__name__}")
    if not (isinstance(layer, (type, tuple)) or callable(layer)):
        raise TypeError(f"layer must be a module type, a tuple of them or a predicate, got {layer!r}")
    _LAYERS.insert(0, (layer, linear_map))


def is_parametrized(module: nn.Module, name: str = "weight") -> bool:
    return parametrize.is_parametrized(module, name)


def weight_parameter(module: nn.Module, name: str = "weight") -> Optional[Tensor]:
    """The tensor the layer's weight is made from, without computing a parametrized
    weight: the parameter itself, or a parametrization's ``original`` (None where there
    are several, as under ``weight_norm``, or none)."""
    if is_parametrized(module, name):
        return getattr(module.parametrizations[name], "original", None)
    w = module._parameters.get(name)
    return w if isinstance(w, Tensor) else None


def has_weight(module: nn.Module, name: str = "weight") -> bool:
    return is_parametrized(module, name) or isinstance(module._parameters.get(name), Tensor)


def _own(module, table, named):
    out = {n: t for n, t in getattr(module, table).items() if t is not None}
    if parametrize.is_parametrized(module):
        for pname, plist in module.parametrizations.items():
            for n, t in getattr(plist, named)():
                out[f"parametrizations.{pname}.{n}"] = t
    return out


def own_parameters(module: nn.Module) -> dict:
    """{name: parameter} of the layer's own parameters, as ``named_parameters`` names them
    (parametrizations' originals included), without those of its other submodules."""
    return _own(module, "_parameters", "named_parameters")


def own_buffers(module: nn.Module) -> dict:
    """{name: buffer} of the layer's own buffers (its parametrizations' included: the power
    iteration's vectors of a spectral norm), as ``named_buffers`` names them."""
    return _own(module, "_buffers", "named_buffers")


def _registered(module):
    """(the registration that matched, its map) or (None, None)."""
    for layer, mp in _LAYERS:
        hit = isinstance(module, layer) if isinstance(layer, (type, tuple)) else layer(module)
        if hit:
            return layer, mp
    return None, None


def linear_map(module: nn.Module) -> Optional[LinearMap]:
    """The map the tracker measures ``module`` with, or None."""
    layer, mp = _registered(module)
    return mp if mp is not None and has_weight(module) else None


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer by duck type: a class whose name has ``Norm`` in it, no
    submodules (but its parametrizations), and a 1-D weight (or none: no elementwise
    affine)."""
    if "Norm" not in type(module).__name__ or _submodules(module):
        return False
    w = weight_parameter(module)
    return (w is None and not has_weight(module)) or (w is not None and w.dim() == 1)


def _submodules(module):
    """The module's children, its parametrizations left out."""
    return [c for n, c in module.named_children() if not (n == "parametrizations" and is_parametrized(module))]


def _builtin_forward(module):
    """Whether the module computes what its known class computes: the class's forward
    (not overridden by a subclass) and no parameters but the weight and the bias."""
    base = next((b for b in type(module).__mro__ if b in _BUILTIN), None)
    if base is None:  # (a registered layer: taken at its word)
        return True
    names = {n.split(".")[0] if not n.startswith("parametrizations.") else n.split(".")[1]
             for n in own_parameters(module)}
    return type(module).forward is base.forward and names <= {"weight", "bias"}


def layer_kind(module: nn.Module) -> Optional[str]:
    """``"linear"``, ``"map"``, ``"generic"``, ``"output"`` (see above) or None: not a layer
    (a block; a block named in ``modules=`` gets output statistics)."""
    old_style = "weight_orig" in module._parameters and "weight" not in module._parameters
    mp = None if old_style else linear_map(module)
    if mp is not None:
        if not _builtin_forward(module):
            return "generic"
        if not is_parametrized(module, "weight") and (
                (mp is LINEAR and isinstance(module, nn.Linear)) or mp is CONV1D):
            return "linear"
        return "map"
    if is_norm(module):
        return "output"
    if not _submodules(module) and any(p.dim() >= 2 for p in own_parameters(module).values()):
        return "generic"
    return None


def is_parametrization(name: str) -> bool:
    """Whether the module named ``name`` is a parametrization or inside one (under a
    parametrized module's ``parametrizations``): not a layer of the model."""
    return ".parametrizations." in f".{name}."


__all__ = ["LinearMap", "is_norm", "layer_kind", "linear_map", "register_layer"]
