"""The initial weights and the reference the tracker compares with.

:class:`Reference` keeps W_0 of every parameter the measurements need (the tracked
parameters, and the layers' own parameters for the refined coordinate check), one copy
per parameter (a weight tied to another shares it), in ``dtype`` (default: the
parameter's). W_0 is taken, in this order, from a ``reference`` model (its parameter of
the same name), from the optimizer's own initial weights (an :mod:`spkern.optim`
optimizer that keeps them: after a resume they are the true W_0), or from the parameter
as it is when the tracker is made. With ``probe="batch"`` it also keeps every parameter
and buffer at initialisation (the reference pass runs the model on them).
"""

from typing import Optional

import torch
from torch import Tensor, nn

from spkern.distributed import is_dtensor
from spkern.monitor.layers import is_parametrized


def whole(w):
    """A sharded W_0 gathered for one product (as FSDP2 gathers W_t), else W_0 itself."""
    return w.full_tensor() if is_dtensor(w) else w


def evaluate_parametrization(module: nn.Module, name: str, originals) -> Tensor:
    """The weight ``module.{name}`` computed from ``originals`` (the parametrization's
    ``original`` tensors) with the parametrizations in eval mode: no power iteration is
    advanced, nothing is written (what ``ParametrizationList.forward`` computes)."""
    plist = module.parametrizations[name]
    modes = [(m, m.training) for m in plist.modules()]
    try:
        plist.eval()
        with torch.no_grad():
            x = plist[0](*originals) if len(originals) > 1 else plist[0](originals[0])
            for p in list(plist)[1:]:
                x = p(x)
        return x
    finally:
        for m, mode in modes:
            m.training = mode


def _originals(module, name):
    plist = module.parametrizations[name]
    if hasattr(plist, "original"):
        return [("original", plist.original)]
    return [(n, getattr(plist, n)) for n in sorted(k for k, _ in plist.named_parameters(recurse=False))]


def current_weight(layer) -> Tensor:
    """The layer's weight matrix as its forward uses it (a parametrized one computed without
    side effects)."""
    if is_parametrized(layer.module, layer.weight):
        originals = [p for _, p in _originals(layer.module, layer.weight)]
        return evaluate_parametrization(layer.module, layer.weight, originals)
    return getattr(layer.module, layer.weight)


class Reference:
    """W_0 of the parameters (``w0``: {tracked parameter's name: W_0}; :meth:`of` for any
    parameter a layer needs), each layer's θ_0 (:meth:`theta0`) and weight matrix
    (:meth:`weight0`), and with ``keep_state`` every parameter and buffer at
    initialisation (:attr:`init_state`)."""

    def __init__(self, model: nn.Module, layers, params, *, model_ref: Optional[nn.Module] = None,
                 dtype: Optional[torch.dtype] = None, given: Optional[dict] = None, keep_state: bool = False):
        self.model, self.model_ref, self.dtype = model, model_ref, dtype
        self._given = given or {}
        self._names = {}
        for n, p in model.named_parameters():
            self._names.setdefault(id(p), n)
        self._ref_params = dict(model_ref.named_parameters(remove_duplicate=False)) if model_ref is not None else None
        self._copies = {}  # id(parameter) -> W_0
        self._versions = {}  # id(tensor W_0 was copied from) -> its version then
        self._keep = []  # the parameters, so that their ids stay theirs
        self.w0 = {n: self._take(p, n) for n, p in params}
        # each layer's θ_0 and W_0 matrix, found now (under FSDP2 a module's forward puts
        # gathered parameters in place of those registered); a parametrized weight is
        # computed from θ_0 and the parametrization's state now, once
        self._theta0 = {layer.name: {**{n: self._take(p) for n, p in layer.parameters().items()},
                                     **{n: b.detach().clone() for n, b in layer.buffers().items()}}
                        for layer in layers if layer.kind == "generic"}
        self._weight0 = {layer.name: self._matrix0(layer) for layer in layers if layer.matrix}
        self._params = {layer.name: layer.module._parameters.get(layer.weight) for layer in layers if layer.matrix}
        self.init_state = None
        if keep_state:  # (tracked parameters share the copies above)
            self.init_state = {n: (self._take(p, n), p.dtype) for n, p in model.named_parameters()}
            for n, b in model.named_buffers():
                self.init_state[n] = (b.detach().clone(), b.dtype)

    def _take(self, p, name=None):
        got = self._copies.get(id(p))
        if got is not None:
            return got
        name = name or self._names.get(id(p))
        if self._ref_params is not None:
            w = self._ref_params.get(name) if name is not None else None
            if w is None or w.shape != p.shape:
                raise ValueError(f"reference has no parameter {name!r} of shape {tuple(p.shape)}")
            self._versions[id(w)] = w._version
            w = w.detach()
        elif p in self._given:
            w = self._given[p].detach()
        else:
            self._versions[id(p)] = p._version
            w = p.detach().clone()
        got = self._copies[id(p)] = w.to(self.dtype or p.dtype)
        self._keep.append(p)
        return got

    def add(self, name, p):
        """A parameter that joins later (``add_param_group``): its W_0 is its value now."""
        self.w0[name] = self._take(p, name)

    def tensors(self) -> list:
        """Every copy of W_0 this reference keeps (its memory: one per parameter)."""
        return list(self._copies.values())

    def is_initial(self, w) -> bool:
        """Whether the tensor ``w`` (a parameter of the model or of the reference model) still
        holds the value W_0 was copied from (nothing has written it since)."""
        return self._versions.get(id(w), -1) == w._version

    def mark_initial(self, w):
        """``w`` still holds the value W_0 was copied from (written and put back)."""
        if id(w) in self._versions:
            self._versions[id(w)] = w._version

    def of(self, p) -> Tensor:
        """W_0 of a parameter the tracker took it for."""
        return self._copies[id(p)]

    def _matrix0(self, layer):
        if not is_parametrized(layer.module, layer.weight):
            return self._take(getattr(layer.module, layer.weight))
        originals = [self._take(p) for _, p in _originals(layer.module, layer.weight)]
        return evaluate_parametrization(layer.module, layer.weight, originals)

    def parameter(self, layer) -> Optional[Tensor]:
        """The layer's weight parameter as the optimizer holds it (None: parametrized), found
        when the tracker was made (under FSDP2 the sharded one)."""
        return self._params.get(layer.name)

    def theta0(self, layer) -> dict:
        """θ_0: {name in the layer: tensor} of the layer's own parameters and buffers at
        initialisation (a layer of kind "generic")."""
        return self._theta0[layer.name]

    def weight0(self, layer) -> Tensor:
        """W_0 of the layer's weight matrix (a parametrized one: computed from θ_0 with the
        parametrization's state when the tracker was made)."""
        return self._weight0[layer.name]

    # -- saving and restoring (Tracker.state_dict) ---------------------------------------

    def state_dict(self) -> dict:
        """The copies by parameter name (and the initial buffers)."""
        out = {"w0": {self._names.get(pid, f"<{i}>"): w for i, (pid, w) in enumerate(self._copies.items())},
               "weight0": {n: w for n, w in self._weight0.items() if all(w is not c for c in self._copies.values())}}
        if self.init_state is not None:
            out["buffers"] = {n: b for n, (b, _) in self.init_state.items() if n not in out["w0"]}
        return out

    def load_state_dict(self, state: dict):
        """Copies saved W_0 into this reference's copies (in place, so that an optimizer
        holding them sees them too)."""
        saved = state["w0"]
        by_name = {self._names.get(pid): w for pid, w in self._copies.items()}
        for n, w in by_name.items():
            if n not in saved:
                raise ValueError(f"Tracker.load_state_dict: the saved tracker has no W_0 of parameter {n!r}")
            if saved[n].shape != w.shape:
                raise ValueError(f"Tracker.load_state_dict: W_0 of {n!r} has shape {tuple(saved[n].shape)}, "
                                 f"the parameter {tuple(w.shape)}")
            with torch.no_grad():
                w.copy_(saved[n])
        for name, w in state.get("weight0", {}).items():  # (computed ones: as the saved run computed them)
            with torch.no_grad():
                self._weight0[name].copy_(w)
        if self.init_state is not None:
            for n, b in state.get("buffers", {}).items():
                if n in self.init_state:
                    with torch.no_grad():
                        self.init_state[n][0].copy_(b)
