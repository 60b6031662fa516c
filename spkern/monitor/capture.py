"""The tracker's own passes over a model, and how they see the Linear products.

A pass of the tracker's own (the probe, the reference) must leave training as it was: it
runs without gradients, restores the random number generators, every module's own mode
and, when asked, the buffers, and it edits no module: the products on tracked Linear
weights are taken by capturing ``F.linear`` for the duration of the pass.
"""

import contextlib
import dataclasses
from collections.abc import Mapping

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
    """A module's output tensor: the output, or the first element of a tuple or list."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def model_output(out, key="logits"):
    """The tensor of a model's output to report under ``logits/``: a tensor; else the entry
    named ``key`` of a dict or an HF ``ModelOutput`` (a dict too), or the field of a
    dataclass, else their first tensor; the first tensor of a tuple or list."""
    if isinstance(out, Tensor):
        return out
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    if isinstance(out, Mapping):
        if isinstance(out.get(key), Tensor):
            return out[key]
        return next((v for v in out.values() if isinstance(v, Tensor)), None)
    if isinstance(out, (tuple, list)):
        return next((v for v in out if isinstance(v, Tensor)), None)
    return None


PROBE_FORMS = ("a Tensor, a tuple of positional arguments, a dict of keyword arguments, (args, kwargs), "
               "'batch' or None")


def as_call(probe):
    """A probe as the call it stands for, ``(args, kwargs)``: a Tensor is one positional
    argument; a dict, keyword arguments; a pair ``(tuple or list, dict)``, both; any other
    tuple or list, positional arguments (None and other values allowed: a mask left out,
    a flag). Tensors are detached. TypeError for anything else, or a call without a tensor."""
    if isinstance(probe, Tensor):
        args, kwargs = (probe,), {}
    elif isinstance(probe, Mapping):
        args, kwargs = (), dict(probe)
    elif (isinstance(probe, (tuple, list)) and len(probe) == 2 and isinstance(probe[0], (tuple, list))
          and isinstance(probe[1], Mapping)):
        args, kwargs = tuple(probe[0]), dict(probe[1])
    elif isinstance(probe, (tuple, list)):
        args, kwargs = tuple(probe), {}
    else:
        raise TypeError(f"probe must be {PROBE_FORMS}, got {type(probe).__name__}")
    if not any(isinstance(v, Tensor) for v in list(args) + list(kwargs.values())):
        raise TypeError(f"probe must hold at least one Tensor ({PROBE_FORMS})")
    detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
    return tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}


def call_rows(args, kwargs, rows):
    """The call with its first ``rows`` rows: every tensor whose first dimension is the
    batch's (the first tensor's) cut to ``rows``; other values as they are."""
    tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, Tensor) and v.dim()]
    if not tensors:
        return args, kwargs
    batch = tensors[0].shape[0]
    cut = lambda v: v[:rows] if isinstance(v, Tensor) and v.dim() and v.shape[0] == batch else v  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def describe_call(args, kwargs):
    def one(v):
        return f"{tuple(v.shape)} {v.dtype} on {v.device}" if isinstance(v, Tensor) else type(v).__name__
    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()])


def reshard(model):
    """Frees the parameters FSDP2 gathered for a pass of the tracker's own (it keeps the
    root module's after a forward, for the backward that a training forward has next)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


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
