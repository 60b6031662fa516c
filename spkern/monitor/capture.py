"""The tracker's own passes over a model, and how they see the Linear products.

A pass of the tracker's own (the probe, the reference) must leave training as it was: it
runs without gradients, restores the random number generators, every module's own mode
and, when asked, the buffers, and it edits no module: the products on tracked Linear
weights are taken by capturing ``F.linear`` for the duration of the pass.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


class _LinearCapture(TorchFunctionMode):
    """Inside a tracker pass, ``F.linear`` on a tracked weight runs ``linear(name, x,
    weight, bias)`` instead: the tracker's products without editing any module (an
    instance-patched forward, accelerate's hooks or an adapter still run as they are).
    ``weights`` is {name: weight}, or a function giving it now (FSDP2 puts a gathered
    weight in place of the sharded one for the duration of a module's forward)."""

    def __init__(self, weights, linear):
        super().__init__()
        self.linear = linear
        self.current = weights if callable(weights) else None
        self.names = {} if callable(weights) else {id(w): n for n, w in weights.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.names.get(id(weight))
            if name is None and self.current is not None:
                self.names = {id(w): n for n, w in self.current().items()}
                name = self.names.get(id(weight))
            if name is not None:
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return self.linear(name, x, weight, bias)
        return func(*args, **kwargs)


def first_tensor(out):
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def as_args(probe):
    return tuple(probe) if isinstance(probe, (tuple, list)) else (probe,)


@contextlib.contextmanager
def own_pass(model, training, weights=None, linear=None, restore_buffers=False):
    """Every module of ``model`` in ``training`` mode, without gradients, and ``F.linear``
    on the weights ``weights`` ({name: tensor}, or a function giving it) running
    ``linear(name, x, weight, bias)``.
    Afterwards each module has its own mode again (restored one by one) and the random
    number generators their state, so that the training run with the tracker is the run
    without it; with ``restore_buffers`` (a training-mode pass on a model's own buffers)
    the buffers are restored too."""
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.is_cuda})
    buffers = [(b, b.clone()) for b in model.buffers()] if restore_buffers else []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            stack.enter_context(torch.no_grad())
            if linear is not None:
                stack.enter_context(_LinearCapture(weights, linear))
            model.train(training)
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for b, saved in buffers:
            b.copy_(saved)
