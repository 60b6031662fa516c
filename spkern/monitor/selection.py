"""Which layers and parameters the tracker measures.

:class:`Selection` walks the model once: every layer the tracker knows how to measure
(:func:`spkern.monitor.layers.layer_kind`), or the modules named in ``modules=``, each a
:class:`Layer`; then the parameters their statistics cover. Parametrizations are not
layers (their modules live under ``parametrizations``). ``nn.MultiheadAttention``
applies its weights inside ``F.multi_head_attention_forward``, where no hook fires: its
input projection is the layer ``{name}.in_proj`` (or ``.q_proj``, ``.k_proj``,
``.v_proj`` when the three are separate weights) and its ``out_proj`` a layer of its own,
both measured where ``F.linear`` applies their weights.
"""

import dataclasses
import re
from typing import Optional, Sequence

from torch import nn

from spkern.monitor.layers import (CONV1D, LINEAR, LinearMap, is_parametrization, is_parametrized, layer_kind, linear_map,
                                   own_buffers, own_parameters)


@dataclasses.dataclass(eq=False)
class Layer:
    """A measured layer: ``kind`` says how (:mod:`spkern.monitor.layers`), ``weight`` names
    the attribute of ``module`` that holds its weight matrix, ``hooked`` whether a forward
    hook on ``module`` sees its calls (not for attention's projections, seen in F.linear)."""
    name: str
    module: nn.Module
    kind: str
    map: Optional[LinearMap] = None
    weight: str = "weight"
    hooked: bool = True

    @property
    def transposed(self) -> bool:
        """Its weight is stored (in, out) and applied as x W (transformers' Conv1D)."""
        return self.map is CONV1D

    @property
    def rcc(self) -> bool:
        """Whether the layer gets the refined coordinate check."""
        return self.kind in ("linear", "map", "generic")

    @property
    def parametrized(self) -> bool:
        """Whether its weight is computed by a parametrization (torch.nn.utils.parametrize)."""
        return self.hooked and is_parametrized(self.module, self.weight)

    @property
    def matrix(self) -> bool:
        """Whether the tracker knows its weight matrix (operator norms, alignments)."""
        return self.kind in ("linear", "map")

    def parameters(self) -> dict:
        """θ: {name in the module: parameter} of the layer's own parameters."""
        if not self.hooked:  # an attention projection: its weight alone
            return {self.weight: getattr(self.module, self.weight)}
        return own_parameters(self.module)

    def buffers(self) -> dict:
        """The layer's own buffers (a spectral norm's vectors, say): part of its state."""
        return own_buffers(self.module) if self.hooked else {}


def _attention_layers(name, m):
    prefix = f"{name}." if name else ""
    if getattr(m, "in_proj_weight", None) is not None:
        return [Layer(f"{prefix}in_proj", m, "linear", LINEAR, "in_proj_weight", hooked=False)]
    return [Layer(f"{prefix}{p}_proj", m, "linear", LINEAR, f"{p}_proj_weight", hooked=False)
            for p in "qkv" if getattr(m, f"{p}_proj_weight", None) is not None]


class Selection:
    """The layers (``layers``: {name: :class:`Layer`}, in the model's order) and, with
    :meth:`parameters`, the parameters the tracker measures.

    ``modules``: None (every layer :func:`layer_kind` knows, norm layers included), or
    modules, names or regular expressions matched against the names of
    ``model.named_modules()`` and of attention's projections; a named module that is no
    layer (a block) gets output statistics. ``rcc=False``: no refined coordinate check
    (the layers get output and input statistics only)."""

    def __init__(self, model: nn.Module, modules: Optional[Sequence] = None, rcc: bool = True):
        self.model = model
        named = {n: m for n, m in model.named_modules() if not is_parametrization(n)}
        every = {}  # name -> Layer, for every module that is a layer, and attention's projections
        for n, m in named.items():
            kind = layer_kind(m)
            if kind is not None:
                every[n] = Layer(n, m, kind, linear_map(m))
            if isinstance(m, nn.MultiheadAttention):
                every.update({layer.name: layer for layer in _attention_layers(n, m)})
        if modules is None:
            layers = list(every.values())
        else:
            layers = [every.get(n) or Layer(n, named[n], "output") if n in named else every[n]
                      for n in self._names(modules, named, every)]
        if not layers:
            raise ValueError("the tracker found no module to track (pass modules=...)")
        self.rcc = rcc
        self.all_params = modules is None
        self.layers = {layer.name: layer for layer in layers}

    @staticmethod
    def _names(modules, named, every):
        if isinstance(modules, (str, nn.Module)):
            modules = [modules]
        by_module = {id(m): n for n, m in named.items()}
        names = []
        for spec in modules:
            if isinstance(spec, nn.Module):
                if id(spec) not in by_module:
                    raise ValueError(f"modules: {type(spec).__name__} is not a submodule of the model")
                found = [by_module[id(spec)]]
            elif isinstance(spec, str):
                candidates = list(named) + [n for n in every if n not in named]
                found = [n for n in candidates if n == spec] or [n for n in candidates if re.fullmatch(spec, n)]
                if not found:
                    raise ValueError(f"modules: no module of the model is named or matches {spec!r}")
            else:
                raise TypeError(f"modules: expected modules, names or regexes, got {type(spec).__name__}")
            names += [n for n in found if n not in names]
        return names

    def parameters(self):
        """(name, parameter) of every parameter of the tracked layers, once each (a tied
        weight under its first name); with the default modules, then every other parameter
        of the model (a ``cls_token``, say)."""
        seen, out = set(), []
        for layer in self.layers.values():
            if layer.hooked:
                items = [(f"{layer.name}.{pn}" if layer.name else pn, p)
                         for pn, p in layer.module.named_parameters()]
            else:  # an attention projection: its weight, under the attention module's name
                owner = layer.name.rsplit(".", 1)[0] if "." in layer.name else ""
                items = [(f"{owner}.{layer.weight}" if owner else layer.weight, getattr(layer.module, layer.weight))]
            for n, p in items:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((n, p))
        if self.all_params:
            for n, p in self.model.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((n, p))
        return out
