"""op(W_t - W_0) of the measured layers: warm-started Lanczos, one step per measurement
by default, the layers' steps taken together (:func:`spkern.norms.spectral_norm_steps`);
and op(W_0), once, for the propagating update's alignment.

The estimate is a lower bound that approaches op(W_t - W_0) from below (``op_tol``
tightens it). Each layer keeps its Lanczos vector (``states``, saved by
:meth:`spkern.Tracker.state_dict`). A NaN in W_t gives a NaN estimate.
"""

import torch

from spkern.monitor.values import Table
from spkern.norms import _steps as spectral_norm_steps, spectral_norm


class _Steps(Table):
    """The warm Lanczos steps of a measurement's layers, one each, taken together when its
    pass is over: :meth:`add` gives a layer's op(W_t - W_0) as a table entry; the layers'
    next states are written into ``states``."""

    def __init__(self, states, device):
        self._states, self._asked, self.device = states, [], device
        super().__init__(self._take)

    def add(self, name, weight, w0, state, product):
        i = len(self._asked)
        self._asked.append((name, weight, w0, state, product))
        return self[i]

    def _take(self):
        names, weights, w0s, states, products = zip(*self._asked)
        self._asked = []
        op, _, new = spectral_norm_steps(weights, states, w0s, products)
        self._states.update(zip(names, new))
        return op


class OpNorms:
    """op(W_t - W_0) per layer (:meth:`add`, then :meth:`flush` once the pass is over) and
    op(W_0) (:attr:`w0`)."""

    def __init__(self, iters=1, tol=None, sharded=False):
        self.iters, self.tol, self.sharded = iters, tol, sharded
        self.states = {}  # layer name -> Lanczos vector
        self.w0 = {}  # layer name -> op(W_0)
        self._steps = None
        self.products = None  # () -> {parameter: (v, A^T A v, version)} of the optimizer's last step

    def init_w0(self, layers, reference):
        self.w0 = {layer.name: spectral_norm(reference.weight0(layer)).op for layer in layers}

    def _product(self, weight, state):
        """A^T A state for op(W_t - W_0), when the last optimizer step computed it for this
        state and the weight has not changed since, else None."""
        got = self.products().get(weight) if self.products is not None and state is not None else None
        return got[1] if got is not None and got[0] is state and got[2] == weight._version else None

    def add(self, name, weight, w0, unmoved=False):
        """op(W_t - W_0) of layer ``name`` (``weight`` W_t: a sharded one is never gathered,
        each rank iterates on its rows), as a value; ``unmoved``: W_t is W_0 (the first
        step's forward with probe="batch"), 0 with no iteration. Returns (op, iters)."""
        if unmoved:
            return torch.zeros((), device=weight.device), 0.0
        state = self.states.get(name)
        product = self._product(weight, state)
        if (state is not None and self.iters == 1 and self.tol is None and not self.sharded
                and (self._steps is None or self._steps.device == weight.device)):
            # the default: one warm step, taken with the other layers' (on the same device)
            if self._steps is None:
                self._steps = _Steps(self.states, weight.device)
            return self._steps.add(name, weight, w0, state, product), 1.0
        r = spectral_norm(weight, state, self.iters if state is not None else None, minus=w0, tol=self.tol,
                          product=product)
        self.states[name] = r.state
        return r.op, float(r.iters)

    def flush(self):
        if self._steps is not None:
            self._steps.compute()
            self._steps = None

    def state_dict(self):
        return {"states": dict(self.states)}

    def load_state_dict(self, state):
        self.states = {n: v.clone() for n, v in state["states"].items()}

