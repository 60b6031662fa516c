"""The metric tracker: feature-change, refined-coordinate-check and update statistics of
any model, every few steps, computed by spkern's fused kernels without host syncs.

    tracker = spkern.Tracker(model, optimizer, probe=x_probe, log_dir="runs/demo")
    for x, y in loader:
        loss, stats = spkern.cross_entropy(model(x), y, return_stats=True)
        loss.backward()
        tracker.record_loss(loss, stats)  # device tensors: no sync
        optimizer.step()                  # the tracker measures after the step (a step hook)
        optimizer.zero_grad()
    tracker.metrics()                     # {name: float}, one host transfer

What it measures, on which inputs (the probe), and how precisely: the definitions are
in :mod:`spkern.monitor.measure` (one place for each quantity) and summed up in
docs/tracker.md ("The measurement"). The parts, one responsibility each:

selection.py  which layers and parameters are tracked
reference.py  W_0 and the reference (a model, the initial weights, the initial state)
probes.py     the probes: a fixed batch, the first batch, or the training batch
record.py     how the layers' applications are seen in passes and training forwards
measure.py    one measurement: the products f(x; θ), the sums, the step it belongs to
opnorms.py    op(W_t - W_0) and op(W_0)
params.py     the parameter statistics (the optimizer's, or measured here)
values.py     values as sums, reduced in one transfer (and over the ranks)
log.py        metrics.jsonl, TensorBoard and Weights & Biases
"""

import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from spkern.distributed import is_dtensor
from spkern.monitor.capture import PROBE_FORMS, WriteGuard, model_output, no_autocast
from spkern.monitor.log import MetricsLog
from spkern.monitor.measure import Measurement
from spkern.monitor.opnorms import OpNorms
from spkern.monitor.params import param_values, step_stats_of
from spkern.monitor.probes import FixedProbe, TrainingBatch
from spkern.monitor.record import Recording
from spkern.monitor.reference import Reference, current_weight
from spkern.monitor.selection import Selection
from spkern.monitor.values import _Ratio, reduce

_STATE_VERSION = 1


def unwrap_model(model):
    """The model a wrapper holds: torch.compile's, DistributedDataParallel's (accelerate's
    ``prepare`` gives one), DataParallel's."""
    while True:
        if type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def unwrap_optimizer(optimizer):
    """The torch optimizer a wrapper steps (accelerate's ``AcceleratedOptimizer``: its
    ``optimizer``), whose step hooks fire."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _check_model(model):
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ValueError(f"model: {n!r} is on the meta device (not materialised): the tracker copies W_0 and "
                             "runs the model; materialise it first (model.to_empty(device=...) and initialise it)")


def _check_optimizer(optimizer, model):
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    mine = {id(p) for p in model.parameters()}
    theirs = [p for g in optimizer.param_groups for p in g["params"]]
    if theirs and not any(id(p) in mine for p in theirs):
        raise ValueError("optimizer steps none of the model's parameters (was it made for another model, or "
                         "for a copy of this one?)")


class Tracker:
    """Tracks feature-change, RCC and update statistics of ``model``; docs/tracker.md ("The
    measurement") gives the definitions.

    Args:
        model: any ``nn.Module`` (``torch.compile(model)``, DDP or ``accelerator.prepare``'s
            wrapper: the model it wraps).
        optimizer: the model's optimizer (accelerate's wrapper: the optimizer it steps);
            the tracker measures after every ``every``-th ``optimizer.step()`` through a
            step hook. Without one, call :meth:`step`.
        probe: the fixed input batch on which activations are measured, as the model is
            called: a tensor, a tuple of positional arguments (None and other values
            allowed), a dict of keyword arguments, or ``(args, kwargs)``; None: the first
            call the model gets, as it was made (keyword arguments and masks included);
            ``"batch"``: the training batch of each measured step.
        probe_rows: rows kept from a probe taken from the first call (every tensor
            argument whose first dimension is the batch's is cut).
        reference: ``"init"`` (the model as it is now) or a model of the same
            architecture whose weights and activations are the reference.
        every: measure every this many optimizer steps.
        rcc: compute the refined coordinate check.
        modules: which modules to track: None (every layer: see
            :mod:`spkern.monitor.layers`; the parameter statistics then cover every
            parameter of the model), or a sequence of modules, names, or regular
            expressions matched against the full names from ``model.named_modules()``
            (and attention's projections, ``{name}.in_proj``); a block gets output
            statistics.
        log_dir: write ``metrics.jsonl`` and TensorBoard events there.
        log_every: write every this many measurements (default 1).
        reference_dtype: dtype of the copies of W_0 (default: the weight's).
        op_iters: Lanczos steps per measurement for op(W_t - W_0) (warm-started).
        op_tol: None, or a relative tolerance: steps until the estimate settles.
        output_key: the name under which the model's output on the probe is reported
            (``logits/rms`` ...). An output that is a dict, an HF ``ModelOutput`` or a
            dataclass gives its ``logits`` entry, else its first tensor; a tuple its first.
        row_l2: also report the row-mean L2 norms of the RCC terms.
        op_norms: compute op(W_t - W_0) and the alignments.
        output_fn: a function from the model's output to the tensor to report.
        wandb: also log to Weights & Biases: ``True`` for the active run, or a run.
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                 probe=None, probe_rows: int = 256, reference: Union[str, nn.Module] = "init",
                 every: int = 1, rcc: bool = True, modules: Optional[Sequence] = None,
                 log_dir: Optional[str] = None, log_every: int = 1,
                 reference_dtype: Optional[torch.dtype] = None, op_iters: int = 1,
                 op_tol: Optional[float] = None,
                 output_key: str = "logits", row_l2: bool = False, op_norms: bool = True,
                 output_fn=None, wandb=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        # torch.compile(model), DDP, accelerate's prepare: track the model it wraps (its names, and
        # passes of the tracker's own that run eagerly, outside the compiled training step)
        model = unwrap_model(model)
        optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        for name, value in (("every", every), ("log_every", log_every), ("probe_rows", probe_rows),
                            ("op_iters", op_iters)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (reference == "init" or isinstance(reference, nn.Module)):
            raise ValueError(f"reference must be 'init' or an nn.Module, got {reference!r}")
        if reference_dtype is not None and reference_dtype not in (torch.float32, torch.bfloat16, torch.float16,
                                                                  torch.float64):
            raise ValueError(f"reference_dtype must be a floating dtype, got {reference_dtype}")
        if op_tol is not None and (not isinstance(op_tol, (int, float)) or not 0 < op_tol < 1):
            raise ValueError(f"op_tol must be None or a number in (0, 1), got {op_tol!r}")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
        if isinstance(probe, str) and probe != "batch":
            raise ValueError(f"probe must be {PROBE_FORMS}, got {probe!r}")
        _check_model(model)
        _check_optimizer(optimizer, model)
        self.model, self.optimizer = model, optimizer
        self.every, self.rcc, self.log_every = every, rcc, log_every
        self.row_l2, self.op_norms = bool(row_l2), bool(op_norms)
        self.reference_dtype = reference_dtype
        self.output_key, self.output_fn = output_key, output_fn
        self.probe_rows = probe_rows
        # (checked before any hook is attached: a wandb=True without a run fails cleanly)
        self._log = (MetricsLog(log_dir, wandb, keep=("train", output_key)) if (log_dir is not None or wandb is not None)
                     else None)
        model_ref = reference if isinstance(reference, nn.Module) else None

        # which layers and parameters
        self.selection = Selection(model, modules, rcc)
        self.layers = self.selection.layers
        if model_ref is not None:
            ref_names = dict(model_ref.named_modules())
            missing = [n for n, layer in self.layers.items() if layer.hooked and n not in ref_names]
            if missing:
                raise ValueError(f"reference has no module named {missing[0]!r}")
        self.sharded = any(is_dtensor(p) for p in model.parameters())
        self.steps = 0  # optimizer steps seen
        self.measurements = 0
        self.hooks = []
        self._source = None  # the parameter statistics: the optimizer's own (spkern.optim) or an adapter's
        if optimizer is not None:
            self._source = step_stats_of(optimizer, lambda: [p for _, p in self.params],
                                         lambda: (self.steps + 1) % self.every == 0)
            if getattr(self._source, "hook", None) is not None:
                self.hooks.append(self._source.hook)
        self.params = self.selection.parameters()
        stepped = self._stepped()
        if stepped is not None:  # the optimizer's own statistics cover the parameters it steps
            self.params = [(n, p) for n, p in self.params if id(p) in stepped]
        self._stepped_count = len(stepped) if stepped is not None else None

        # W_0: the reference model's, the optimizer's own (a resumed run's true W_0), or now
        given = getattr(optimizer, "initial_weights", None) or None
        self._unsure_w0 = (optimizer is not None and model_ref is None and not given and len(optimizer.state) > 0)
        self.reference = Reference(model, self.layers.values(), self.params, model_ref=model_ref,
                                   dtype=reference_dtype, given=given,
                                   keep_state=probe == "batch" and model_ref is None)
        if self._source is not None and model_ref is None and every == 1:
            # a fused step may measure the drift against the tracker's copies: no second pass
            self._source.offer_initial_weights({p: self.reference.w0[n] for n, p in self.params})

        self.recording = Recording(model, self.layers, self.reference, WriteGuard(model), rcc=rcc,
                                   sharded=self.sharded, model_ref=model_ref)
        self.hooks += self.recording.hooks
        self.opnorms = OpNorms(op_iters, op_tol, self.sharded)
        products = getattr(self._source, "step_products", None)
        if (products is not None and every == 1 and rcc and self.op_norms and not self.sharded
                and hasattr(self._source, "request_products")):
            # the optimizer's products for the operator norms (every step measured, W_0 read by the step)
            self.opnorms.products = products
        self._normed = [layer for layer in self.layers.values() if rcc and self.op_norms and layer.matrix]
        self.opnorms.init_w0([layer for layer in self._normed if layer.map.alignments], self.reference)

        self.measurement = None  # the measurement being taken
        self._latest = None  # (its step, {name: value}) of the last measurement
        self._floats = None
        self._train = (None, {})  # (step, {name: value}) of record_loss
        self._warned_unapplied = False
        if optimizer is not None:
            self.hooks.append(optimizer.register_step_pre_hook(self._pre_step))
            self.hooks.append(optimizer.register_step_post_hook(lambda *_: self.step()))
        self._prober = TrainingBatch(self) if probe == "batch" else FixedProbe(self, probe)
        if probe is not None and probe != "batch":
            self._prober.set(probe)

    @property
    def names(self):
        """The tracked layers' names."""
        return list(self.layers)

    # -- parameters ----------------------------------------------------------------------

    def _stepped(self):
        """The parameters the optimizer steps, as ids (None: not known, or no optimizer)."""
        stepped = self._source.stepped_parameters() if self._source is not None else None
        return None if stepped is None else {id(p) for p in stepped}

    def _sync_params(self):
        """An optimizer whose parameter groups grew (``add_param_group``) after the tracker
        was made: the new parameters of tracked modules are tracked from their first step
        on, against their value then (or the reference model's)."""
        stepped = self._source.stepped_parameters() if self._source is not None else None
        if stepped is None or len(stepped) == self._stepped_count:  # (every step: a length, no set)
            return
        self._stepped_count = len(stepped)
        stepped = {id(p) for p in stepped}
        have = {id(p) for _, p in self.params}
        for n, p in self.selection.parameters():
            if id(p) in stepped and id(p) not in have:
                self.reference.add(n, p)
                self.params.append((n, p))

    def _pre_step(self, optimizer, args, kwargs):
        self._sync_params()
        if self.opnorms.products is not None and self.opnorms.states:
            # every step is measured: the step computes the next Lanczos product of each
            # layer in its own pass (spkern.optim on CPU), from the rows it writes
            weights = {layer.name: self.reference.parameter(layer) for layer in self._normed}
            self._source.request_products({weights[n]: (s, self.reference.of(weights[n]))
                                           for n, s in self.opnorms.states.items() if weights.get(n) is not None})

    # -- probes --------------------------------------------------------------------------

    def set_probe(self, probe):
        """Sets the probe batch and measures the reference activations on it (before any
        training step when ``reference="init"``)."""
        self._prober.set(probe)

    @property
    def probe(self):
        """The fixed probe as the call ``(args, kwargs)`` (None: none yet, or probe="batch")."""
        return self._prober.probe

    def output_of(self, out):
        """The tensor of the model's output reported under ``output_key``."""
        if self.output_fn is not None:
            return self.output_fn(out)
        return model_output(out, "logits")

    # -- a measurement -------------------------------------------------------------------

    def begin(self, step):
        """Starts the measurement of ``step``."""
        self.measurement = self.recording.measurement = Measurement(step, self.row_l2)

    def finish(self, out=None, ref_out=None, after_step=True):
        """Completes the measurement: the model's output, the parameter statistics and the
        losses of its step; it becomes the latest."""
        m = self.measurement
        if out is not None:
            m.output(self.output_key, out, ref_out)
        m.flush()
        values = m.layer_values()
        values.update(m.values)
        values.update(param_values(self.params, self._source, self.reference.w0, after_step))
        step, train = self._train
        if step == m.step:
            values.update(train)
        self.measurement = self.recording.measurement = None
        self._latest = (m.step, values)
        self.measurements += 1
        self._floats = None
        self._check_applied(m)
        if self._log is not None and self.measurements % self.log_every == 0:
            self.write()

    def layer_norms(self):
        """op(W_t - W_0) of the layers whose matrix the tracker knows, W_t the weights of the
        measured pass (called when it is over), and their alignments."""
        with torch.no_grad(), no_autocast():  # (after a training forward under autocast too)
            self._layer_norms()

    def _layer_norms(self):
        m = self.measurement
        first = (self._prober.on_training_batch and m.step == 1 and self.reference.model_ref is None)
        for layer in self._normed:
            n = layer.name
            if not m.applied.get(n):
                continue
            # (the first step's forward with probe="batch" sees W_0, unless the forward wrote it: an
            # Embedding's max_norm, a parametrization's state)
            # (a sharded weight is never gathered for it: each rank iterates on its rows)
            weight = self.reference.parameter(layer) if self.sharded else current_weight(layer)
            unmoved = first and not layer.parametrized and self.reference.is_initial(self.reference.parameter(layer))
            op, iters = self.opnorms.add(n, weight, self.reference.weight0(layer), unmoved=unmoved)
            m.values[f"{n}/delta_w_op"] = _Ratio(op, 1.0)
            m.values[f"{n}/op_iters"] = _Ratio(iters, 1.0)
            if layer.map.alignments:
                m.align(layer, op, self.opnorms.w0.get(n))
        self.opnorms.flush()  # (the warm steps of all the layers, together, of these weights)

    def _check_applied(self, m):
        if self._warned_unapplied or not m.applied:
            return
        self._warned_unapplied = True
        if self._unsure_w0 and self.measurements == 1:
            warnings.warn("spkern.Tracker: the optimizer had state when the tracker was made (a resumed or "
                          "trained run?): W_0 is the weights then, for every metric; to continue a run, load the "
                          "tracker saved with it (tracker.load_state_dict(saved)) before its first step",
                          RuntimeWarning, stacklevel=4)
        unseen = [n for n, layer in self.layers.items() if layer.rcc and not m.applied.get(n)]
        if unseen:
            warnings.warn(f"spkern.Tracker: {len(unseen)} tracked layer(s) were not applied in the measured pass, "
                          f"so only their parameters are measured: {', '.join(unseen[:8])}"
                          f"{' ...' if len(unseen) > 8 else ''} (the model did not call them on this input, or "
                          "applied their weight where the tracker does not see it)", RuntimeWarning, stacklevel=4)

    def step(self):
        """Counts an optimizer step and measures when it is the ``every``-th. Called by the
        optimizer's step hook when the tracker was given the optimizer."""
        self.steps += 1
        if self.steps % self.every == 0:
            self._prober.measure_step()
        self._grads = self._gradient_marks()
        return self.steps % self.every == 0

    def _gradient_marks(self):
        return [(id(p.grad), p.grad._version) if p.grad is not None else None for _, p in self.params]

    def new_gradients(self) -> bool:
        """Whether a parameter has a gradient written since the last step (a backward ran)."""
        before = getattr(self, "_grads", None)
        now = self._gradient_marks()
        return any(g is not None for g in now) if before is None else now != before

    def measure(self):
        """Measures now on the probe (whatever the step count)."""
        self._prober.measure()

    def record_loss(self, loss: Tensor, stats=None, **values):
        """Records the training loss of the step in progress (call it before
        ``optimizer.step()``) and, when given, the means of spkern's per-row logit
        statistics (:class:`spkern.LogitStats`) of that batch (device tensors, no sync);
        other ``name=tensor`` values are recorded as ``train/name``. They are part of the
        measurement of that step (none if the step is not measured)."""
        step = self.steps + 1
        train = self._train[1] if self._train[0] == step else {}
        train["train/loss"] = _Ratio(loss.detach().float().reshape(()), 1.0)
        for key, value in values.items():
            train[f"train/{key}"] = _Ratio(value.detach().float().reshape(()), 1.0)
        if stats is not None:
            for key in ("logit_norm", "logit_max", "max_prob", "entropy", "correct"):
                t = getattr(stats, key, None)
                if t is not None and t.numel():
                    name = "accuracy" if key == "correct" else key
                    train[f"train/{name}"] = _Ratio(t.detach().float().sum(), t.numel())
        self._train = (step, train)

    # -- reading -------------------------------------------------------------------------

    def metrics(self) -> dict:
        """The latest measurement as ``{name: float}``, with ``step``: the optimizer step it
        was measured at (not a later one), read from the device in one transfer. Under
        ``torch.distributed`` the sums behind every value are added over the ranks before
        the ratios and square roots are taken, so the values are those of one process
        measuring all the ranks' rows; every rank must call it at the same steps."""
        if self._latest is None:
            return {"step": self.steps}
        if self._floats is None:
            self._floats = reduce(self._latest[1])
        return {"step": self._latest[0], **self._floats}

    @property
    def measured_step(self) -> Optional[int]:
        """The step of the latest measurement (None: none yet)."""
        return None if self._latest is None else self._latest[0]

    def write(self):
        """Appends the latest measurement to metrics.jsonl and TensorBoard."""
        if self._log is not None:
            self._log.write(self.metrics())

    # -- saving and resuming -------------------------------------------------------------

    def state_dict(self) -> dict:
        """What a resumed run needs to continue this one's steps and metrics: the step and
        measurement counts, W_0 (and the initial buffers with ``probe="batch"``), the probe
        and its reference activations, and the operator norms' Lanczos vectors. Save it
        with the model and the optimizer (``torch.save``)."""
        return {"version": _STATE_VERSION, "steps": self.steps, "measurements": self.measurements,
                "reference": self.reference.state_dict(), "opnorms": self.opnorms.state_dict(),
                "op_w0": dict(self.opnorms.w0), "probe": self._prober.state_dict(),
                "names": self.names}

    def load_state_dict(self, state: dict):
        """Continues a saved run: call it on a tracker made like the saved one, on the
        restored model and optimizer, before the first step."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("Tracker.load_state_dict: not a state dict of this spkern's Tracker.state_dict()")
        if state["names"] != self.names:
            raise ValueError(f"Tracker.load_state_dict: the saved tracker tracked {len(state['names'])} layers "
                             f"({state['names'][:3]}...), this one {len(self.names)}: make it as the saved one")
        self.reference.load_state_dict(state["reference"])
        self.opnorms.load_state_dict(state["opnorms"])
        self.opnorms.w0 = dict(state["op_w0"])
        self._prober.load_state_dict(state["probe"])
        self.steps, self.measurements = state["steps"], state["measurements"]
        self._unsure_w0 = False

    def close(self):
        """Removes the hooks and closes the log files."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["Tracker"]
