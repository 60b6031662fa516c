"""The tracker's own passes over a model, and how they see the layers.

A pass of the tracker's own (the probe, the reference) must leave training as it was: it
runs without gradients and without autocast (its activations then have one precision,
whatever context the training step runs in), restores the random number generators,
every module's own mode and every tensor the pass wrote (:class:`WriteGuard`: BatchNorm's
running statistics in training mode, an ``nn.Embedding(max_norm=...)``'s renormalised
rows), and it edits no module: the layers of kind "linear" are seen where ``F.linear``
applies their weight (:class:`Recorder`, a ``TorchFunctionMode``; inside
``F.multi_head_attention_forward`` too).
"""

import contextlib
import dataclasses
import types
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_MHA = F.multi_head_attention_forward


def _mha_body():
    """multi_head_attention_forward without its own torch-function check, so that the
    ``F.linear`` calls inside it reach the recorder (the check would hand the whole call to
    the mode, whose handler runs with the mode off)."""
    fn = _MHA
    body = types.FunctionType(fn.__code__, {**fn.__globals__, "has_torch_function": lambda *_: False},
                              fn.__name__, fn.__defaults__, fn.__closure__)
    body.__kwdefaults__ = fn.__kwdefaults__
    return body


_MHA_BODY = _mha_body()


class Recorder(TorchFunctionMode):
    """While active, ``F.linear`` on the weight of a layer of kind "linear" (or
    ``torch.addmm(bias, x, weight)`` on a Conv1D's) runs ``linear(layer, x, weight, bias,
    rows, call)`` instead (``rows``: the rows of the layer's weight a view applies,
    attention's split projections, or None; ``call()``: the call as it was). ``weights`` is
    {id(weight): layer}, or a function giving {layer: weight} now (FSDP2 puts a gathered
    weight in place of the sharded one for the duration of a module's forward).
    ``paused``: everything runs as it is."""

    def __init__(self, weights, linear):
        super().__init__()
        self.linear = linear
        self.current = weights if callable(weights) else None
        self.by_id = {} if callable(weights) else weights
        self.paused = False

    def _find(self, weight):
        layer = self.by_id.get(id(weight))
        if layer is None and self.current is not None:
            self.by_id = {id(w): layer for layer, w in self.current().items()}
            layer = self.by_id.get(id(weight))
        return layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            layer, rows = self._find(weight), None
            base = getattr(weight, "_base", None)
            if layer is None and base is not None and weight.dim() == 2 and weight.stride() == base.stride():
                layer = self._find(base)
                if layer is not None:
                    r0 = (weight.storage_offset() - base.storage_offset()) // max(base.stride(0), 1)
                    rows = (r0, r0 + weight.shape[0])
            if layer is not None:
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return self.linear(layer, x, weight, bias, rows, lambda: func(*args, **kwargs))
        elif func is torch.addmm and len(args) == 3 and not kwargs:  # (Conv1D: addmm(bias, x, W), beta = alpha = 1)
            layer = self._find(args[2])
            if layer is not None and layer.transposed:
                return self.linear(layer, args[1], args[2], args[0], None, lambda: func(*args))
        elif func is _MHA:
            with self:
                return _MHA_BODY(*args, **kwargs)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def pause(self):
        was, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was


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


def written_by_design(model):
    """Tensors a forward is known to write: an Embedding's weight under ``max_norm``, and
    the power-iteration vectors of spectral norms (old and new API)."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            out.append(m.weight)
        for n, b in m.named_buffers(recurse=False):
            if n in ("_u", "_v") or n.endswith(("_u", "_v")):
                out.append(b)
    return out


class WriteGuard:
    """Restores what a pass of the tracker's own writes. Each pass saves the tensors a
    forward is known to write (:func:`written_by_design`: an Embedding's weight under
    max_norm, a spectral norm's vectors), those seen written before and, in training mode
    or at the first pass, every buffer (not every parameter: a copy of the model on a GPU
    would not fit), and restores them after the pass; the version counters of all the
    parameters and buffers tell what else a pass wrote: such a tensor is named in a
    warning (training with the tracker then differs from training without it) and saved
    from the next pass on."""

    def __init__(self, model):
        self.model = model
        self.written = {id(t): t for t in written_by_design(model)}
        self.learned = False

    @contextlib.contextmanager
    def __call__(self, training: bool):
        tensors = {id(t): t for t in list(self.model.parameters()) + list(self.model.buffers())}
        keep = dict(self.written)
        if training or not self.learned:
            keep.update({id(b): b for b in self.model.buffers()})
        versions = {i: t._version for i, t in tensors.items()}
        with torch.no_grad():
            saved = [(t, t.detach().clone()) for t in keep.values()]
        try:
            yield
        finally:
            with torch.no_grad():
                for t, value in saved:
                    if t._version != versions.get(id(t), -1):
                        t.copy_(value)
            lost = [i for i, t in tensors.items() if t._version != versions[i] and i not in keep
                    and i not in self.written]
            for i, t in tensors.items():
                if t._version != versions[i]:
                    self.written[i] = t
            self.learned = True
            if lost:
                names = {id(t): n for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())}
                warnings.warn("spkern.Tracker: a pass of the tracker's own wrote "
                              f"{', '.join(repr(names.get(i, '?')) for i in lost)}, which it had not saved (the "
                              "model's "
                              "forward writes it on some inputs only): training may differ from here on; it is saved "
                              "from the next pass on", RuntimeWarning, stacklevel=4)


_AUTOCAST_DEVICES = [d for d in ("cpu", "cuda") if torch.amp.is_autocast_available(d)]


def autocast_on() -> bool:
    return any(torch.is_autocast_enabled(d) for d in _AUTOCAST_DEVICES)


def no_autocast():
    """Autocast off (CPU and CUDA): the tracker's own arithmetic (its products, norms and
    sums) in the precision it documents, whatever context the training step runs in."""
    on = [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
    if not on:  # (the common case, and inside the tracker's own passes: nothing to do)
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for d in on:
        stack.enter_context(torch.autocast(device_type=d, enabled=False))
    return stack


@contextlib.contextmanager
def own_state(module):
    """A call of the tracker's own on ``module`` (a layer's map): every submodule in eval
    mode, the random number generators and the modes restored after it."""
    modes = [(m, m.training) for m in module.modules()]
    devices = sorted({t.device.index or 0 for t in module.parameters() if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            module.eval()
            yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def own_pass(model, training, guard, recorder=None, autocast_off=True):
    """Every module of ``model`` in ``training`` mode, without gradients and (with
    ``autocast_off``) autocast, and without attention's fast path (which applies its
    weights where nothing sees them), with the ``recorder`` active. Afterwards each
    module has its own mode again (restored one by one), the random number generators
    their state and the tensors the pass wrote their values (``guard``, a
    :class:`WriteGuard`), so that training with the tracker is training without it."""
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.is_cuda})
    fast = torch.backends.mha.get_fastpath_enabled()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            stack.enter_context(torch.no_grad())
            if autocast_off:
                stack.enter_context(no_autocast())
            stack.enter_context(guard(training))
            torch.backends.mha.set_fastpath_enabled(False)
            if recorder is not None:
                stack.enter_context(recorder)
            model.train(training)
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for m, mode in modes:
            m.training = mode
