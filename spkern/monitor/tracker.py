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

How it measures. At construction (or at the model's first forward, when no probe is
given: the first batch becomes the probe) the tracker runs the model once on the fixed
probe batch, in eval mode and without gradients, and keeps each tracked module's input
x_0 and output h_0 and, for Linear layers, W_0 (a copy of the weight, in
``reference_dtype``; or the weights and activations of a ``reference`` model you pass).
Every ``every`` optimizer steps it runs the probe again and, in forward hooks that are
active only during that probe pass (so gradient accumulation and activation
checkpointing recomputations are never counted), computes the statistics below.

With ``probe="batch"`` it measures the training batch itself, as torch-module-monitor
does: before the first forward with gradients of every ``every``-th step, it runs the
reference (the model with its initial parameters and buffers, through
``torch.func.functional_call``, or the ``reference`` model) on the same inputs, in the
model's mode, keeping x_0, h_0 and W_0 x_0; the training forward that follows is
measured by the same hooks, with one extra product W_0 x_t per Linear layer, so that the
refined coordinate check costs two forward products per layer and no probe pass. The
activations are then those of the step's forward, before its update (W_t of the step
before); the parameter statistics are those of the step. Later micro-batches of the step,
forwards without gradients (evaluation) and checkpoint recomputations are not measured.
Every pass of the tracker's own restores the random number generators (so with dropout
the reference pass draws the masks the training forward then draws), each module's mode
and, in training mode, the buffers; it edits no module (its products on the tracked
Linear weights are taken by capturing ``F.linear`` for the pass): training with the
tracker follows exactly the path it follows without it. The tracker keeps a copy of every
parameter at initialisation (the tracked ones in ``reference_dtype``). For each tracked
module it records:

============================  ==============================================================
``{module}/act_rms``          rms(h_t): the module's output on the probe
``{module}/change_rms``       rms(h_t - h_0): feature change since the reference
``{module}/zero_frac``        fraction of exact zeros in h_t
``{module}/input_rms``        rms(x_t) (Linear)
``{module}/input_change_rms`` rms(x_t - x_0) (Linear)
``{module}/input_zero_frac``  fraction of exact zeros in x_t, e.g. dead ReLU units (Linear)
``{module}/eff_rms``          rms((W_t - W_0) x_t): effective update (Linear, ``rcc=True``;
                              with ``probe="batch"`` h_t - b_t - W_0 x_t, so at W_t = W_0
                              a layer with a bias shows the rounding of its bias add)
``{module}/prop_rms``         rms(W_0 (x_t - x_0)): propagating update (Linear, ``rcc=True``)
``{module}/eff_align``        fro((W_t - W_0) X) / (op(W_t - W_0) fro(X)), in [0, 1]
``{module}/prop_align``       fro(W_0 dX) / (op(W_0) fro(dX)), in [0, 1], dX = X_t - X_0
``{module}/delta_w_op``       op(W_t - W_0), warm-started Lanczos (``rcc=True`` and
                              ``op_norms=True``, as the two alignments)
``{module}/op_iters``         the Lanczos steps that estimate took
``{param}/update_rms``        rms(W_{t+1} - W_t) of the last optimizer step
``{param}/drift_rms``         rms(W_t - W_0)
``{param}/weight_rms``        rms(W_t)
``{param}/grad_rms``          rms(grad) at the last step
``{param}/relative_update``   fro(W_{t+1} - W_t) / fro(W_{t+1})
``logits/rms``                rms of the model's output on the probe (when it is a tensor)
``logits/change_rms``         rms of its change since the reference
``logits/max_abs``            largest absolute output on the probe
``train/loss``, ``train/*``   from :meth:`record_loss`: the loss and the means of
                              spkern's per-row logit statistics (``logit_norm``,
                              ``logit_max``, ``max_prob``, ``entropy``, ``accuracy``)
============================  ==============================================================

With ``row_l2=True`` the tracker also reports, for tracked Linear layers, the mean over
the probe's rows of each row's L2 norm, the convention of torch-module-monitor's
``RefinedCoordinateCheck`` (its ``l2norm`` entries; ``.weight`` ones for eff and prop):

============================  ==============================================================
``{module}/eff_row_l2``       mean_r ||((W_t - W_0) x_t)_r||
``{module}/prop_row_l2``      mean_r ||(W_0 (x_t - x_0))_r||
``{module}/input_row_l2``     mean_r ||(x_t)_r||
``{module}/input_change_row_l2``  mean_r ||(x_t - x_0)_r||
============================  ==============================================================

rms(A) = fro(A) / sqrt(numel(A)); fro is the Frobenius norm, op the largest singular
value; a name says ``fro`` or ``op`` where a norm is not an RMS. The effective and
propagating updates split the change of a Linear layer's output (bias aside):
h_t - h_0 = (W_t - W_0) x_t + W_0 (x_t - x_0). During the probe pass each tracked
Linear layer computes W_t x_t and W_0 x_t together (:func:`spkern.features.paired_linear`:
one pass over x_t on GPU, both products rounded alike), so the RCC costs one extra
product with W_0 per layer, plus the fused statistics. Those are taken when the pass is
over, for all the layers together: one :func:`spkern.multi_pair_stats` call for every
activation pair of the pass, one :func:`spkern.spectral_norm_steps` for the layers' warm
Lanczos steps; the values are entries of those results until :meth:`metrics` gathers them
(a few operations and one host transfer per measurement, not a few per layer).

Parameter statistics are read through one protocol, :class:`spkern.monitor.StepStats`:
:mod:`spkern.optim`'s optimizers implement it (fused into the step, no copies); for any
other torch optimizer the adapter :class:`spkern.monitor.TorchStepStats` copies the
tracked parameters before each measured step (a step pre-hook) and uses
:func:`spkern.multi_tensor_norms`; what a step's statistics lack (the drift, say) the
tracker measures itself; without an optimizer :meth:`step` measures weights, drift and
gradients only.

:meth:`metrics` returns the latest measurement as a flat dict of floats with one host
transfer. With ``log_dir`` each measurement (every ``log_every`` measurements) is
appended to ``log_dir/metrics.jsonl`` and written as TensorBoard scalars; with ``wandb``
it is logged to a Weights & Biases run. Under ``torch.distributed`` rank 0 writes.

Under ``torch.distributed`` each rank measures its own rows (its probe, or its share of
the training batch) and :meth:`metrics` adds the sums behind every value over the ranks
(sums of squares, zeros, row norms and their counts) before taking ratios and square
roots, and the largest ``max_abs`` over the ranks: the values equal those of one process
measuring all the ranks' rows (for the loss, with equal shares). Values the same on every
rank (parameter statistics, operator norms) are averaged.

torch.compile: ``Tracker(torch.compile(model))`` tracks the wrapped model (eager names);
the tracker's passes run eagerly, outside the compiled step, whose graph keeps no trace of
the tracker (with ``probe="batch"`` a compiled training forward is measured by a pass of
the tracker's own on its inputs: see :class:`spkern.monitor.probes.TrainingBatch`).

Sharded models (FSDP2's ``fully_shard``; build the optimizer and the tracker after
sharding, as for any optimizer): the copies of W_0 are DTensors sharded like their
parameters (1/N of the model per rank); a pass's product with W_0 gathers that one
module's W_0 (``full_tensor``) when the module runs, as FSDP gathers W_t, and frees it
after; operator norms iterate on each rank's rows of the sharded W_t and W_0 (one
all-reduce of a vector per iteration); the parameter statistics are the whole
parameters' (:func:`spkern.multi_tensor_norms` of DTensors, or the optimizer's, which add
the shards' sums over the ranks). With ``probe="batch"`` the reference pass puts W_0 in
each parameter's local shard for its duration (W_t's shard kept aside). The hooks run
before FSDP2's own post-forward hook, while the module's gathered parameters are in
place, and the parameters FSDP2 gathers for the tracker's own passes are freed after
them. The numbers equal one process measuring all the rows on the unsharded model
(tests/test_fsdp.py).
"""

import contextlib
import re
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from spkern.constants import Sum
from spkern.distributed import is_dtensor
from spkern.features import pair_stats, paired_linear
from spkern.monitor.layers import is_captured, is_norm, linear_map
from spkern.monitor.capture import PROBE_FORMS, first_tensor, model_output, own_pass, reshard
from spkern.monitor.log import MetricsLog
from spkern.monitor.params import STEP_KEYS, step_stats_of
from spkern.monitor.probes import FixedProbe, TrainingBatch
from spkern.monitor.values import PairSums, Table, _Max, _Ratio, reduce, rms
from spkern.norms import _steps as spectral_norm_steps, multi_tensor_norms, spectral_norm


def _default_tracked(m):
    """What the tracker measures by default: every layer with a linear map (Linear, HF
    Conv1D, Embedding, convolutions, registered ones) and every norm layer (duck-typed)."""
    return linear_map(m) is not None or is_norm(m)


class _OpSteps(Table):
    """The warm Lanczos steps of a measurement's layers, one each, taken together
    (:func:`spkern.norms.spectral_norm_steps`) when its pass is over: :meth:`add` gives a
    layer's op(W_t - W_0) and its inverse (the scale of eff_align) as table entries; the
    layers' next states are written into ``states``."""

    def __init__(self, states, device):
        self._states, self._asked, self.device = states, [], device
        super().__init__(self._take)

    def add(self, name, weight, w0, state, product):
        i = len(self._asked)
        self._asked.append((name, weight, w0, state, product))
        return self[2 * i], self[2 * i + 1]

    def _take(self):
        names, weights, w0s, states, products = zip(*self._asked)
        self._asked = []
        op, _, new = spectral_norm_steps(weights, states, w0s, products)
        self._states.update(zip(names, new))
        return torch.stack([op, 1 / op.clamp_min(torch.finfo(op.dtype).tiny)], 1)


class Tracker:
    """Tracks feature-change, RCC and update statistics of ``model``; see the module
    docstring for what is measured and the definitions.

    Args:
        model: any ``nn.Module``.
        optimizer: the model's optimizer; the tracker measures after every ``every``-th
            ``optimizer.step()`` through a step hook. Without one, call :meth:`step`.
        probe: the fixed input batch on which activations are measured, as the model is
            called: a tensor, a tuple of positional arguments (None and other values
            allowed), a dict of keyword arguments, or ``(args, kwargs)``; None: the first
            call the model gets, as it was made (keyword arguments and masks included);
            ``"batch"``: the training batch of each measured step (see above).
        probe_rows: rows kept from a probe taken from the first call (every tensor
            argument whose first dimension is the batch's is cut).
        reference: ``"init"`` (the model as it is now) or a model of the same
            architecture whose weights and activations are the reference.
        every: measure every this many optimizer steps.
        rcc: compute the refined coordinate check for Linear layers.
        modules: which modules to track: None (every layer that applies a weight as a
            linear map: Linear, HF Conv1D, Embedding, convolutions and the layers taught
            with :func:`spkern.monitor.register_layer`; and every norm layer; the
            parameter statistics then cover every parameter of the model, those of no
            such layer, a ``cls_token`` say, included), or a sequence of modules, names,
            or regular expressions matched against the full names from
            ``model.named_modules()`` (whole blocks included). A layer named here that
            has a weight matrix the tracker cannot apply is an error (with ``rcc=True``).
        log_dir: write ``metrics.jsonl`` and TensorBoard events there.
        wandb: also log to Weights & Biases: ``True`` for the active run (``wandb.init()``
            first), or a run; each measurement at the tracker's step (optimizer steps).
        log_every: write every this many measurements (default 1).
        reference_dtype: dtype of the copies of W_0 (default: the weight's). In bfloat16
            the RCC products with W_0 are rounded accordingly.
        output_key: the name under which the model's output on the probe is reported
            (``logits/rms`` ...; a model whose output is not the logits can rename it).
            An output that is a dict, an HF ``ModelOutput`` or a dataclass gives its
            ``logits`` entry, else its first tensor; a tuple its first tensor.
        output_fn: a function from the model's output to the tensor to report, in place
            of that search.
        row_l2: also report the row-mean L2 norms of the RCC terms (see above).
        op_norms: measure op(W_t - W_0) and the alignment ratios (warm Lanczos steps per
            layer and measurement: each a pass over W_t and W_0; measuring every step with
            an :mod:`spkern.optim` optimizer on CPU, the first comes from the optimizer's
            step, which computes it from the rows it writes); False skips them.
        op_iters: Lanczos steps per measurement for op(W_t - W_0) (each one product with
            (W_t - W_0)^T (W_t - W_0)), warm-started from the previous measurement's
            vector, so that the estimate keeps converging as W_t moves (the first
            measurement runs 50 from a cold start). Default 1: one pass over W_t and W_0
            per layer, the cost of the power iteration it replaces; at width 4096 with
            sigma2/sigma1 = 0.957 and a 3% random walk a step, 0.09% low where that was
            1.15% low; at a 10% walk 1.3-1.9% low, where 2 steps are within 0.7%
            (bench/bench_op_norm.py). The estimate is a lower bound, and it lags where the
            top direction of W_t - W_0 turns abruptly (the first steps at a large learning
            rate, a diverging run): ``op_tol`` follows it there.
        op_tol: None (default): ``op_iters`` steps, no host sync. A relative tolerance:
            rounds of ``op_iters`` steps until two agree to it (a host read per round
            and layer, at most 200 steps).
            ``{module}/op_iters`` reports the steps used.

    With ``every=1`` the tracker offers the optimizer its copies of W_0
    (``offer_initial_weights``): an :mod:`spkern.optim` optimizer that keeps none takes
    them and measures the drift inside its fused step; otherwise the tracker measures the
    drift itself when it measures.
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
        # torch.compile(model): track the model it wraps (its names, and passes of the
        # tracker's own that run eagerly, outside the compiled training step)
        model = getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for name, value in (("every", every), ("log_every", log_every), ("probe_rows", probe_rows),
                            ("op_iters", op_iters)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (reference == "init" or isinstance(reference, nn.Module)):
            raise ValueError(f"reference must be 'init' or an nn.Module, got {reference!r}")
        if reference_dtype is not None and reference_dtype not in (torch.float32, torch.bfloat16, torch.float16,
                                                                  torch.float64):
            raise ValueError(f"reference_dtype must be a floating dtype, got {reference_dtype}")
        self.model, self.optimizer = model, optimizer
        self.every, self.rcc, self.log_every = every, rcc, log_every
        self.row_l2 = bool(row_l2)
        self.op_norms = bool(op_norms)
        self.reference_dtype = reference_dtype
        self.op_iters = op_iters
        if op_tol is not None and (not isinstance(op_tol, (int, float)) or not 0 < op_tol < 1):
            raise ValueError(f"op_tol must be None or a number in (0, 1), got {op_tol!r}")
        self.op_tol = op_tol
        self.output_key = output_key
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
        self.output_fn = output_fn
        # (checked before any hook is attached: a wandb=True without a run fails cleanly)
        self._log = MetricsLog(log_dir, wandb) if (log_dir is not None or wandb is not None) else None
        self.probe_rows = probe_rows
        self.names = self._select(modules)
        self._all_params = modules is None
        self.modules = dict(model.named_modules())
        self._maps = {n: mp for n in self.names if (mp := linear_map(self.modules[n])) is not None}
        self._ref_model = reference if isinstance(reference, nn.Module) else None
        if self._ref_model is not None:
            ref_names = dict(self._ref_model.named_modules())
            missing = [n for n in self.names if n not in ref_names]
            if missing:
                raise ValueError(f"reference has no module named {missing[0]!r}")
        if isinstance(probe, str) and probe != "batch":
            raise ValueError(f"probe must be {PROBE_FORMS}, got {probe!r}")
        self.steps = 0  # optimizer steps seen
        self.measurements = 0
        self._values = {}  # name -> _Ratio or _Max of the latest measurement (device tensors)
        self._cur = {}  # the measurement being taken
        self._sums = None  # its pair statistics, computed together (PairSums)
        self._steps = None  # its operator-norm steps, taken together (_OpSteps)
        self._zref = {}  # probe="batch": Linear name -> W_0 x_0 of the reference pass
        self._floats = None
        self._capture = None  # during a probe pass: "reference" or "current"
        self._ref = {}  # module name -> dict of reference tensors
        self._w0 = {}
        self._op_state = {}
        self._paired = {}  # Linear name -> (W_t x_t, W_0 x_t) of the current probe pass
        self._pending = None  # during a "current" pass of the tracker's own: what its hooks saw
        # FSDP2 (DTensor parameters): the hooks run before FSDP's own post-forward hook
        # reshards a module, while its gathered parameters are still in place
        self._sharded = any(is_dtensor(p) for p in model.parameters())
        self._hooks = [self.modules[n].register_forward_hook(self._hook(n), prepend=self._sharded)
                       for n in self.names]
        if self._ref_model is not None:
            self._hooks += [dict(self._ref_model.named_modules())[n].register_forward_hook(self._hook(n))
                            for n in self.names]
        # parameter statistics: the optimizer's own (spkern.optim) or an adapter's
        self._source = None
        if optimizer is not None:
            self._source = step_stats_of(optimizer, lambda: [p for _, p in self.params],
                                         lambda: (self.steps + 1) % self.every == 0)
            if getattr(self._source, "hook", None) is not None:
                self._hooks.append(self._source.hook)
        self._init_params()
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(self._pre_step))
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.step()))
        on_batch = isinstance(probe, str)  # "batch" (checked above)
        self._prober = TrainingBatch(self) if on_batch else FixedProbe(self, probe)
        if probe is not None and not on_batch:
            self._prober.set(probe)

    # -- setup ---------------------------------------------------------------------------

    def _select(self, modules):
        named = dict(self.model.named_modules())
        if modules is None:
            names = [n for n, m in named.items() if _default_tracked(m)]
        else:
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
                    found = [n for n in named if n == spec] or [n for n in named if re.fullmatch(spec, n)]
                    if not found:
                        raise ValueError(f"modules: no module of the model is named or matches {spec!r}")
                else:
                    raise TypeError(f"modules: expected modules, names or regexes, got {type(spec).__name__}")
                names += [n for n in found if n not in names]
        if not names:
            raise ValueError("the tracker found no module to track (pass modules=...)")
        if modules is not None and self.rcc:
            for n in names:
                m = named[n]
                leaf = next(m.children(), None) is None
                w = getattr(m, "weight", None)
                if leaf and isinstance(w, Tensor) and w.dim() >= 2 and linear_map(m) is None:
                    raise ValueError(
                        f"modules: the tracker cannot measure {n!r} ({type(m).__name__}): it does not know how the "
                        f"layer applies its weight; teach it with spkern.monitor.register_layer({type(m).__name__}, "
                        f"map), or pass rcc=False for output statistics only")
        return names

    def _params(self):
        """(name, parameter) of every parameter of the tracked modules, once each; with the
        default modules, then every other parameter of the model (a cls_token, say)."""
        seen, out = set(), []
        for n in self.names:
            for pn, p in self.modules[n].named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{n}.{pn}" if n else pn, p))
        if self._all_params:
            for n, p in self.model.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((n, p))
        return out

    def _stepped(self):
        """The parameters the optimizer steps, as ids (None: not known, or no optimizer)."""
        stepped = self._source.stepped_parameters() if self._source is not None else None
        return None if stepped is None else {id(p) for p in stepped}

    def _init_params(self):
        self.params = self._params()
        stepped = self._stepped()
        if stepped is not None:  # the optimizer's own statistics cover the parameters it steps
            self.params = [(n, p) for n, p in self.params if id(p) in stepped]
        ref_params = (dict(self._ref_model.named_parameters(remove_duplicate=False)) if self._ref_model is not None
                      else None)
        for n, p in self.params:
            self._w0[n] = self._initial_weight(n, p, ref_params)
        self._stepped_count = len(stepped) if stepped is not None else None
        if self._source is not None and self._ref_model is None and self.every == 1:
            # a fused step may measure the drift against the tracker's copies: no second pass
            self._source.offer_initial_weights({p: self._w0[n] for n, p in self.params})
        # the optimizer's products for the operator norms (every step measured, W_0 read by
        # the step): {parameter: (v, A^T A v, version)} of the last step
        products = getattr(self._source, "step_products", None)
        self._products = (products if products is not None and self.every == 1 and self.rcc and self.op_norms
                          and not self._sharded and hasattr(self._source, "request_products") else None)
        # the initial weight of each tracked layer with a linear map, for the RCC
        # (one copy per parameter: a weight tied to another, lm_head to the embedding say,
        # shares the copy kept under the parameter's first name)
        self._lin_w0 = {}
        by_param = {id(p): self._w0[n] for n, p in self.params}
        for n in self._maps:
            w = self.modules[n].weight
            if id(w) in by_param:
                self._lin_w0[n] = by_param[id(w)]
            elif ref_params is not None:
                self._lin_w0[n] = ref_params[f"{n}.weight" if n else "weight"].detach()
            else:  # a weight the optimizer does not step
                self._lin_w0[n] = by_param[id(w)] = w.detach().clone()
        # the weights as the optimizer holds them (under FSDP2 the sharded parameters, which a
        # module's forward replaces by gathered copies): the operator norms are of these
        self._lin_param = {n: self.modules[n].weight for n in self._lin_w0}

    def _initial_weight(self, n, p, ref_params):
        """W_0 of parameter ``n``: the reference model's, or the parameter's value now."""
        if ref_params is not None:
            w0 = ref_params.get(n)
            if w0 is None or w0.shape != p.shape:
                raise ValueError(f"reference has no parameter {n!r} of shape {tuple(p.shape)}")
            w0 = w0.detach()
        else:
            w0 = p.detach().clone()
        return w0.to(self.reference_dtype or p.dtype)

    def _sync_params(self):
        """An optimizer whose parameter groups grew (``add_param_group``) after the tracker
        was made: the new parameters of tracked modules are tracked from their first step
        on, against their value then (or the reference model's). Where the optimizer's
        parameters are not known (a torch optimizer) every parameter of the tracked modules
        is tracked already."""
        stepped = self._source.stepped_parameters() if self._source is not None else None
        if stepped is None or len(stepped) == self._stepped_count:  # (every step: a length, no set)
            return
        self._stepped_count = len(stepped)
        stepped = {id(p) for p in stepped}
        have = {id(p) for _, p in self.params}
        ref_params = (dict(self._ref_model.named_parameters(remove_duplicate=False)) if self._ref_model is not None
                      else None)
        for n, p in self._params():
            if id(p) in stepped and id(p) not in have:
                self._w0[n] = self._initial_weight(n, p, ref_params)
                self.params.append((n, p))

    def set_probe(self, probe):
        """Sets the probe batch and measures the reference activations on it (before any
        training step when ``reference="init"``)."""
        self._prober.set(probe)

    @property
    def _batch(self):  # probe="batch"
        return self._prober.on_training_batch

    @property
    def _probe(self):  # the fixed probe's inputs (None: none yet)
        return self._prober.probe

    @property
    def _init_state(self):  # probe="batch": the model's parameters and buffers at initialisation
        return self._prober.init_state

    def _init_op_w0(self):
        self._op_w0 = {}
        if self.rcc and self.op_norms:
            for n, w0 in self._lin_w0.items():
                if self._maps[n].alignments:
                    self._op_w0[n] = spectral_norm(w0).op

    def _linear_weights(self, model):
        """{name: weight} of the tracked Linear layers of ``model`` (tracked or reference);
        of a sharded model, a function that gives them as they are when called (FSDP2's
        gathered weights inside a module's forward)."""
        named = dict(model.named_modules())
        captured = [n for n in self._lin_w0 if is_captured(self._maps[n])]  # (layers that call F.linear)
        if self._sharded and model is self.model:
            return lambda: {n: named[n].weight for n in captured}
        return {n: named[n].weight for n in captured}

    @staticmethod
    def _whole(w):
        """A sharded W_0 gathered for one product (as FSDP2 gathers W_t), else W_0 itself."""
        return w.full_tensor() if is_dtensor(w) else w

    @contextlib.contextmanager
    def _pass(self, model, which, training, weights=None, linear=None, restore_buffers=False):
        """A pass of the tracker's own (:func:`spkern.monitor.capture.own_pass`) whose
        activations the hooks capture as ``which``."""
        self._capture = which
        # the statistics of a measured pass are taken after it, once the capture of F.linear
        # is off: inside it every tensor operation of theirs would go through that Python mode
        self._pending = [] if which == "current" else None
        try:
            with own_pass(model, training, weights, linear, restore_buffers):
                yield
            if self._sharded:  # FSDP2 keeps the root's gathered parameters after a forward: free them
                reshard(model)
            pending, self._pending = self._pending, None
            with torch.no_grad():
                for args in pending or ():
                    self._measure(*args)
                # (the pair statistics wait for the model's output's, taken after the pass)
                self._flush_sums(pairs=False)
        finally:
            self._capture = None
            self._pending = None
            self._paired.clear()
            self._zref.clear()

    def _paired_linear(self, name, x, weight, bias):
        y, z = paired_linear(x, weight, self._whole(self._lin_w0[name]))  # W_t x_t, W_0 x_t: one pass over x_t
        self._paired[name] = (x, y, z)
        out = y.to(x.dtype)
        return out + bias if bias is not None else out

    # -- measuring -----------------------------------------------------------------------

    def _hook(self, name):
        def hook(module, args, output):
            if self._capture is None:
                return
            h = first_tensor(output)
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if h is None or not h.is_floating_point():
                return
            if self._capture == "reference":
                if module is not self.modules[name] and self._ref_model is None:
                    return
                ref = {"h": h.detach().clone()}
                mp = self._maps.get(name)
                if mp is not None and x is not None:
                    ref["x"] = x.detach().clone()
                    if self.rcc:
                        z = self._zref.pop(name, None)
                        if z is not None:  # probe="batch": kept by the reference pass
                            ref["z"] = z.float()
                        elif self._batch:  # not paired in F.linear: W_0 x_0 = h_0 - b_0
                            ref["z"] = mp.without_bias(module, h).detach().float()
                        else:  # once per probe: rounded as the products of the measurements
                            w0 = self._whole(self._lin_w0[name])
                            ref["z"] = (paired_linear(x.detach(), w0, w0)[1] if is_captured(mp)
                                        else mp.apply(module, x.detach(), w0).float())
                self._ref[name] = ref
            elif module is self.modules[name]:
                if self._pending is not None:
                    # (the output less the bias now, while FSDP2's gathered bias is in place; a
                    # product paired in F.linear needs none)
                    mp = self._maps.get(name)
                    y = (mp.without_bias(module, h.detach()) if mp is not None and self.rcc and name not in self._paired
                         else None)
                    self._pending.append((name, module, x, h.detach(), y))
                else:  # the training forward (probe="batch"): its tensors are not kept past the module
                    self._measure(name, module, x, h.detach())
                    self._flush_sums()
        return hook

    def _measure(self, name, module, x, h, h_less_bias=None):
        x_in = x  # the module's own input: the one the paired product of this call was of
        ref = self._ref.get(name)
        v = self._cur
        n = h.numel()
        if ref is not None and ref["h"].shape == h.shape:
            s = self._pair(h, ref["h"].to(h.dtype))
            v[f"{name}/change_rms"] = rms(s[Sum.DIFF_SQ], n)
        else:
            s = self._pair(h)
        v[f"{name}/act_rms"] = rms(s[Sum.A_SQ], n)
        v[f"{name}/zero_frac"] = _Ratio(s[Sum.ZEROS], n)
        mp = self._maps.get(name)
        if mp is None or x is None or ref is None or "x" not in ref:
            return
        x = x.detach()
        row_l2 = self.row_l2 and mp.per_row
        sx = None
        if mp.float_input:
            sx, rows = pair_stats(x, ref["x"].to(x.dtype), per_row=True) if row_l2 else (
                self._pair(x, ref["x"].to(x.dtype)), None)
            nx = x.numel()
            v[f"{name}/input_rms"] = rms(sx[Sum.A_SQ], nx)
            v[f"{name}/input_change_rms"] = rms(sx[Sum.DIFF_SQ], nx)
            v[f"{name}/input_zero_frac"] = _Ratio(sx[Sum.ZEROS], nx)
            if row_l2:
                v[f"{name}/input_row_l2"] = _Ratio(rows[:, Sum.A_SQ].sqrt().sum(), rows.shape[0])
                v[f"{name}/input_change_row_l2"] = _Ratio(rows[:, Sum.DIFF_SQ].sqrt().sum(), rows.shape[0])
        if not self.rcc or ref["z"].shape != h.shape:
            return
        w0 = self._lin_w0[name]
        paired = self._paired.pop(name, None)
        if paired is not None and paired[0] is x_in:
            y, z = paired[1:]  # W_t x_t, W_0 x_t from one pass over x_t
        else:  # the training forward (probe="batch"), or a layer that does not call F.linear
            with torch.no_grad():
                z = mp.apply(module, x, self._whole(w0)).float()
            y = (mp.without_bias(module, h) if h_less_bias is None else h_less_bias).float()
        if row_l2:
            (eff, eff_rows), (prop, prop_rows) = pair_stats(y, z, per_row=True), pair_stats(z, ref["z"], per_row=True)
        else:
            eff, prop = self._pair(y, z), self._pair(z, ref["z"])
        eff, prop = eff[Sum.DIFF_SQ], prop[Sum.DIFF_SQ]  # ||(W_t - W_0) x_t||^2, ||W_0 (x_t - x_0)||^2
        if row_l2:
            v[f"{name}/eff_row_l2"] = _Ratio(eff_rows[:, Sum.DIFF_SQ].sqrt().sum(), eff_rows.shape[0])
            v[f"{name}/prop_row_l2"] = _Ratio(prop_rows[:, Sum.DIFF_SQ].sqrt().sum(), prop_rows.shape[0])
        nz = z.numel()
        v[f"{name}/eff_rms"] = rms(eff, nz)
        v[f"{name}/prop_rms"] = rms(prop, nz)
        if not self.op_norms:
            return
        aligned = mp.alignments and sx is not None
        tiny = torch.finfo(torch.float32).tiny
        if self._batch and self.steps == 0 and self._ref_model is None:
            # the first step's forward: W_t = W_0, so no power iteration (nor its warm state)
            v[f"{name}/delta_w_op"] = _Ratio(torch.zeros((), device=h.device), 1.0)
            if aligned:
                v[f"{name}/eff_align"] = _Ratio(torch.zeros((), device=h.device), 1.0)
        else:
            state = self._op_state.get(name)
            # (a sharded weight is never gathered for it: each rank iterates on its rows)
            weight = self._lin_param[name] if self._sharded else module.weight
            product = self._product(weight, state)
            if (state is not None and self.op_iters == 1 and self.op_tol is None and not self._sharded
                    and (self._steps is None or self._steps.device == weight.device)):
                # the default: one warm step, taken with the other layers' (on the same device)
                # when the pass is over
                if self._steps is None:
                    self._steps = _OpSteps(self._op_state, weight.device)
                op, inv = self._steps.add(name, weight, w0, state, product)
                iters = 1.0
            else:
                r = spectral_norm(weight, state, self.op_iters if state is not None else None, minus=w0,
                                  tol=self.op_tol, product=product)
                self._op_state[name] = r.state
                op, inv, iters = r.op, 1 / r.op.clamp_min(tiny), float(r.iters)
            v[f"{name}/delta_w_op"] = _Ratio(op, 1.0)
            v[f"{name}/op_iters"] = _Ratio(iters, 1.0)
            if aligned:
                v[f"{name}/eff_align"] = _Ratio(eff, sx[Sum.A_SQ], True, inv)
        if aligned:
            v[f"{name}/prop_align"] = _Ratio(prop, sx[Sum.DIFF_SQ], True, 1 / self._op_w0[name].clamp_min(tiny))

    def _start_measurement(self):
        """A new measurement: no values, pairs or Lanczos steps asked for yet."""
        self._cur, self._sums, self._steps = {}, None, None

    def _pair(self, a, b=None):
        """The pair statistics of (a, b) in this measurement: computed with the others of its
        pass in one call (:meth:`_flush_sums`), read by column."""
        if self._sums is None:
            self._sums = PairSums()
        elif self._sums.device != a.device:  # (a model across devices: the first device's pairs together)
            return pair_stats(a, b)
        return self._sums.add(a, b)

    def _flush_sums(self, pairs=True):
        """Takes the operator-norm steps asked for so far (of the weights as they are now)
        and, with ``pairs``, computes the pair statistics (and lets their tensors go)."""
        if self._steps is not None:
            self._steps.compute()
            self._steps = None
        if pairs and self._sums is not None:
            self._sums.compute()
            self._sums = None

    def _pre_step(self, optimizer, args, kwargs):
        self._sync_params()
        if self._products is not None and self._op_state:
            # every step is measured: the step computes the next Lanczos product of each
            # layer in its own pass (spkern.optim on CPU), from the rows it writes
            self._source.request_products({self._lin_param[n]: (s, self._lin_w0[n]) for n, s in self._op_state.items()})

    def _product(self, weight, state):
        """A^T A state for op(W_t - W_0), when the last optimizer step computed it for this
        state and the weight has not changed since, else None."""
        got = self._products().get(weight) if self._products is not None and state is not None else None
        return got[1] if got is not None and got[0] is state and got[2] == weight._version else None

    def _param_stats(self):
        """The parameter statistics: the step's from the optimizer (its own or an adapter's),
        then what they lack (drift, weights, gradients) measured here, in one call each."""
        v = self._cur
        sums = getattr(self._source, "last_step_sums", None)
        sums = sums() if sums is not None else None
        if sums is not None:  # the step's sums, as a table: the roots taken at metrics()
            params, table, drift = sums
            t, at = Table(lambda: table), {id(p): 4 * i for i, p in enumerate(params)}
            for n, p in self.params:
                i = at.get(id(p))
                if i is None:
                    continue
                count = max(p.numel(), 1)
                v[f"{n}/update_rms"] = _Ratio(t[i], count, True)
                v[f"{n}/weight_rms"] = _Ratio(t[i + 1], count, True)
                v[f"{n}/grad_rms"] = _Ratio(t[i + 2], count, True)
                v[f"{n}/relative_update"] = _Ratio(t[i], t[i + 1], True)
                if drift:
                    v[f"{n}/drift_rms"] = _Ratio(t[i + 3], count, True)
        else:
            stats = self._source.last_step_stats() if self._source is not None else {}
            for n, p in self.params:
                for k, value in stats.get(p, {}).items():
                    if k in STEP_KEYS or k == "drift_rms":
                        v[f"{n}/{k}"] = _Ratio(value, 1.0)
        lacking = [(n, p) for n, p in self.params if f"{n}/drift_rms" not in v or f"{n}/weight_rms" not in v]
        if lacking:
            drift = multi_tensor_norms([p for _, p in lacking], [self._w0[n] for n, _ in lacking])
            for i, (n, p) in enumerate(lacking):
                v.setdefault(f"{n}/drift_rms", rms(drift[i, Sum.DIFF_SQ], max(p.numel(), 1)))
                v.setdefault(f"{n}/weight_rms", rms(drift[i, Sum.A_SQ], max(p.numel(), 1)))
        lacking = [(n, p) for n, p in self.params if f"{n}/grad_rms" not in v]
        if lacking and all(p.grad is not None for _, p in lacking):
            gsq = multi_tensor_norms([p.grad for _, p in lacking])[:, Sum.A_SQ]
            for i, (n, p) in enumerate(lacking):
                v[f"{n}/grad_rms"] = rms(gsq[i], max(p.numel(), 1))

    def step(self):
        """Counts an optimizer step and measures when it is the ``every``-th. Called by the
        optimizer's step hook when the tracker was given the optimizer."""
        self.steps += 1
        if self.steps % self.every != 0:
            return False
        return self._prober.measure_step()

    def measure(self):
        """Measures now on the probe (whatever the step count)."""
        self._prober.measure()

    def _model_output(self, out):
        """The tensor of the model's output reported under ``output_key``."""
        if self.output_fn is not None:
            return self.output_fn(out)
        return model_output(out)

    def _output_stats(self, out, ref):
        if out is None or not out.is_floating_point():
            return
        out = out.detach()
        if ref is not None and ref.shape == out.shape:
            s = self._pair(out, ref.to(out.dtype))
            self._cur[f"{self.output_key}/change_rms"] = rms(s[Sum.DIFF_SQ], out.numel())
        else:
            s = self._pair(out)
        self._cur[f"{self.output_key}/rms"] = rms(s[Sum.A_SQ], out.numel())
        self._cur[f"{self.output_key}/max_abs"] = _Max(out.abs().amax().float())

    def _finish(self):
        """Completes a measurement: the parameter statistics, then it becomes the latest."""
        self._flush_sums()
        self._param_stats()
        keep = {k: t for k, t in self._values.items() if k.startswith("train/")}
        self._values, self._cur = {**self._cur, **keep}, {}
        self.measurements += 1
        self._floats = None
        if self._log is not None and self.measurements % self.log_every == 0:
            self.write()

    def record_loss(self, loss: Tensor, stats=None, **values):
        """Records the training loss and, when given, the means of spkern's per-row logit
        statistics (:class:`spkern.LogitStats`) of that batch (device tensors, no sync);
        other ``name=tensor`` values are recorded as ``train/name``."""
        self._values["train/loss"] = _Ratio(loss.detach().float().reshape(()), 1.0)
        for key, value in values.items():
            self._values[f"train/{key}"] = _Ratio(value.detach().float().reshape(()), 1.0)
        if stats is not None:
            for key in ("logit_norm", "logit_max", "max_prob", "entropy", "correct"):
                t = getattr(stats, key, None)
                if t is not None and t.numel():
                    name = "accuracy" if key == "correct" else key
                    self._values[f"train/{name}"] = _Ratio(t.detach().float().sum(), t.numel())
        self._floats = None

    # -- reading -------------------------------------------------------------------------

    def metrics(self) -> dict:
        """The latest measurement as ``{name: float}`` (plus ``step``), read from the
        device in one transfer. Under ``torch.distributed`` the sums behind every value
        (of squares, of zeros, of row norms, and the counts) are added over the ranks
        before the ratios and square roots are taken, so the values are those of one
        process measuring all the ranks' rows; every rank must call it at the same steps."""
        if self._floats is None:
            self._floats = reduce(self._values)
        return {"step": self.steps, **self._floats}

    def write(self):
        """Appends the latest measurement to metrics.jsonl and TensorBoard."""
        if self._log is not None:
            self._log.write(self.metrics())

    def close(self):
        """Removes the hooks and closes the log files."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["Tracker"]
