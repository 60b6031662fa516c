"""torch.optim.SGD and torch.optim.AdamW with per-parameter update norms fused into the step.

:class:`SGD` and :class:`AdamW` are the torch optimizers (they subclass them: same
arguments, defaults, parameter groups, named parameters and ``state_dict``); only
``step`` differs. On CPU, one pass over each parameter applies the update and
accumulates, per parameter, in float32 on the device:

    update_sq  ||W_{t+1} - W_t||^2      the update actually applied (after rounding)
    weight_sq  ||W_{t+1}||^2
    grad_sq    ||grad||^2
    drift_sq   ||W_{t+1} - W_0||^2      with ``track_drift=True``; every ``drift_every`` steps

No copy of the previous weights, no extra pass, no host sync. ``track_drift=True``
keeps a copy of the initial weights, in ``drift_dtype`` (bfloat16 halves its memory);
``initial_weights=`` takes them from the caller instead.

:meth:`norm_stats` turns the sums of the last step into norms (device tensors), keyed by
parameter name when the optimizer was built from ``named_parameters()``, else by the
parameter; a parameter the last step did not step (its gradient was None) is absent:

    *_fro   Frobenius norm, sqrt(sum of squares)
    *_rms   Frobenius norm / sqrt(numel)
    relative_update   update_fro / weight_fro

:meth:`norm_stats_floats` returns the same as Python floats with one host transfer.
:meth:`update_spectral_norm` gives the operator norm of the last update of a matrix
parameter by warm-started power iteration, rebuilding the update from the optimizer
state (no copy of W_t).

Parameters may be float32, bfloat16 or float16, with their gradients and optimizer state
in the same dtype (as torch keeps them). In reduced precision the fused step rounds after
each of torch's operations, as torch does, so that it follows torch's step closely (on
CPU to the bit in our tests). A group whose parameters mix dtypes or devices, or are not
contiguous, takes torch's own step and gets the same statistics from
:func:`spkern.multi_tensor_norms` against a copy of the weights taken before the step:
correct, but with that copy and extra passes.
Sharded parameters (DTensors, FSDP2's ``Shard(0)`` or ``Replicate``; a group may mix them
with plain tensors): the fused step runs on each rank's local shard, with no collective
and no host sync; the sums are the shard's, and :meth:`norm_stats` adds them over the
ranks in one all-reduce for all parameters when it is called (every rank must then call
it), so that every norm is the whole parameter's. W_0 is kept sharded like its parameter.
Backends (``spkern.use_backend``): ``cpu`` (C++, csrc/cpu/optim.cpp), ``triton``
(kernels/optim.py; CUDA tensors, or CPU ones through the interpreter), ``reference``
(torch's own step, as above); there is no CUDA C++ optimizer step (the Triton one runs
on CUDA).
"""

import math
from typing import Optional

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam
from torch.optim.sgd import sgd as _torch_sgd

from spkern import registry
from spkern.constants import Sum
from spkern.distributed import check_like, check_summable, is_dtensor, local, matrix_split, sharded_gram, sum_over_shards
from spkern.norms import SpectralNorm, lanczos, multi_tensor_norms, start_vector

_BLOCK_ELEMENTS = 1 << 22  # rows of an update rebuilt at a time: at most 16 MB of float32

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PRODUCT_BACKENDS = ("cpu",)  # the fused steps that compute request_products() in their pass


def layout_reason(params, grads):
    """Why the fused steps cannot take these parameters and gradients (local shards), or
    None: they take contiguous parameters of one float dtype and device, gradients of that
    dtype."""
    params, grads = [local(p) for p in params], [local(g) for g in grads]
    dtype, device = params[0].dtype, params[0].device
    for p, g in zip(params, grads):
        if p.dtype != dtype or g.dtype != dtype or dtype not in _FUSED_DTYPES:
            return "parameters or gradients of mixed or unsupported dtypes"
        if not p.is_contiguous():
            return "a non-contiguous parameter"
        if p.device != device:
            return "parameters on more than one device"
    return None


def _data(p):
    """What a fused step writes: the local shard of a DTensor, else the tensor's data."""
    return local(p) if is_dtensor(p) else p.data


def _locals(tensors):
    return [local(t) for t in tensors]


class _NormStats:
    """What SGD and AdamW share: the initial weights, the statistics and their readers."""

    def _init_norms(self, track_drift, drift_dtype, drift_every, initial_weights):
        if not isinstance(drift_every, int) or drift_every < 1:
            raise ValueError(f"drift_every must be a positive int, got {drift_every!r}")
        if drift_dtype is not None and drift_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"drift_dtype must be None, float32, bfloat16 or float16, got {drift_dtype}")
        self.drift_every = drift_every
        self.drift_dtype = drift_dtype
        self.steps_taken = 0
        params = self.stepped_parameters()
        self.initial_weights = {}
        if initial_weights is not None:
            self.initial_weights = self._given_initial_weights(params, initial_weights, drift_dtype)
        elif track_drift:
            self.initial_weights = {p: p.detach().clone().to(drift_dtype or p.dtype) for p in params}
        self._stats = {}  # parameter -> (4,) float32 device tensor of the sums above
        self._fresh = set()  # the parameters the last step stepped (a frozen one, without a gradient, is not)
        self._placements_checked = set()  # ids of the sharded parameters whose placement was checked
        self._product_requests = {}  # parameter -> (v, W_0), for the next step (request_products)
        self._products = {}  # parameter -> (v, (W_{t+1} - W_0)^T (W_{t+1} - W_0) v, version) of the last step

    def add_param_group(self, param_group):
        """torch's add_param_group; with drift tracked, the new parameters' initial
        weights are their values now."""
        super().add_param_group(param_group)
        if getattr(self, "initial_weights", None):  # (torch's __init__ adds the first groups before ours runs)
            for p in self.param_groups[-1]["params"]:
                if p not in self.initial_weights:
                    self.initial_weights[p] = p.detach().clone().to(self.drift_dtype or p.dtype)

    def state_dict(self):
        """torch's state dict, plus the initial weights (by parameter index, as torch
        indexes the state) and the step count, so that drift continues after a resume."""
        sd = super().state_dict()
        if self.initial_weights:
            params = self.stepped_parameters()
            sd["initial_weights"] = {i: self.initial_weights[p] for i, p in enumerate(params)
                                     if p in self.initial_weights}
        sd["steps_taken"] = self.steps_taken
        return sd

    def load_state_dict(self, state_dict):
        """torch's load_state_dict; the initial weights of a state dict from spkern.optim
        replace those taken at construction (a plain torch state dict keeps them)."""
        state_dict = dict(state_dict)
        initial = state_dict.pop("initial_weights", None)
        steps = state_dict.pop("steps_taken", None)
        super().load_state_dict(state_dict)
        if steps is not None:
            self.steps_taken = int(steps)
        if initial is not None:
            params = self.stepped_parameters()
            for i, w0 in initial.items():
                i = int(i)
                if not 0 <= i < len(params) or w0.shape != params[i].shape:
                    raise ValueError(f"state_dict: initial_weights[{i}] does not match parameter {i} of this "
                                     f"optimizer")
                self.initial_weights[params[i]] = w0.detach().to(params[i].device).clone()

    def _given_initial_weights(self, params, given, drift_dtype):
        """W_0 from the caller: a sequence in the order of the parameters, or a dict keyed
        by parameter or by name; stored contiguous, in drift_dtype when given."""
        if isinstance(given, dict):
            names = {p: n for group in self.param_groups
                     for p, n in zip(group["params"], group.get("param_names") or [None] * len(group["params"]))}
            values = []
            for p in params:
                key = p if p in given else names.get(p)
                if key not in given:
                    raise ValueError(f"initial_weights has no entry for parameter {names.get(p) or tuple(p.shape)}")
                values.append(given[key])
        else:
            values = list(given)
            if len(values) != len(params):
                raise ValueError(f"initial_weights has {len(values)} tensors but the optimizer has "
                                 f"{len(params)} parameters")
        out = {}
        for i, (p, w0) in enumerate(zip(params, values)):
            if not isinstance(w0, Tensor) or not w0.is_floating_point():
                raise TypeError(f"initial_weights[{i}] must be a floating-point Tensor")
            if w0.shape != p.shape:
                raise ValueError(f"initial_weights[{i}] has shape {tuple(w0.shape)} but its parameter "
                                 f"has shape {tuple(p.shape)}")
            if w0.device != p.device:
                raise ValueError(f"initial_weights[{i}] is on device {w0.device} but its parameter is on "
                                 f"device {p.device}")
            check_like(w0, p, f"initial_weights[{i}]", "its parameter")
            out[p] = w0.detach().to(drift_dtype or w0.dtype).contiguous()
        return out

    def _begin_step(self, closure):
        """Runs the closure (as torch.optim does) and checks the learning rates."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_lr()
        self._products = {}
        self._fresh = set()
        return loss

    def _end_step(self):
        self.steps_taken += 1
        self._product_requests = {}  # (a request is for one step)

    def _groups_with_grads(self):
        """(group, parameters with a gradient, their gradients) for each group that has any;
        sharded parameters checked once (a placement spkern cannot use is an error naming
        the parameter)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                grads = [p.grad for p in params]
                self._check_placements(group, params, grads)
                yield group, params, grads

    def _check_placements(self, group, params, grads):
        for p, g in zip(params, grads):
            if id(p) in self._placements_checked or not (is_dtensor(p) or is_dtensor(g)):
                continue
            what = self._name_of(group, p)
            check_summable(p, f"parameter {what}")
            check_like(g, p, f"the gradient of {what}", "the parameter")
            self._placements_checked.add(id(p))

    @staticmethod
    def _name_of(group, p):
        names = group.get("param_names")
        for j, q in enumerate(group["params"]):
            if q is p:
                return repr(names[j]) if names else f"{j} of its group (shape {tuple(p.shape)})"
        return f"of shape {tuple(p.shape)}"

    def _check_lr(self):
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, Tensor):
                raise ValueError("a tensor learning rate is not supported by spkern.optim; pass a float")
            if not math.isfinite(lr):
                raise ValueError(f"learning rate must be finite, got {lr}")

    def _fused_kernel(self, op, params, grads):
        """The registered fused step ``op`` that takes these parameters (a
        :class:`spkern.registry.Kernel`), or None for torch's own step."""
        if any(g.is_sparse for g in grads):
            raise ValueError("spkern.optim does not take sparse gradients")
        params, grads = _locals(params), _locals(grads)
        return registry.resolve(op, params[0], params, grads)

    def _product_args(self, kernel, params, inits):
        """The keyword arguments that ask the fused step ``kernel`` for the products
        requested of these parameters (:meth:`request_products`): matrices, not sharded,
        whose W_0 is read by this step, on a backend that computes them in its pass."""
        if not self._product_requests or not inits or kernel.backend not in _PRODUCT_BACKENDS:
            return {}
        index, vs, outs = [], [], []
        for i, p in enumerate(params):
            v, w0 = self._product_requests.get(p, (None, None))
            if v is None or w0 is not self.initial_weights.get(p) or is_dtensor(p) or p.dim() < 2 or p.shape[0] == 0:
                continue
            n = p.numel() // p.shape[0]
            if v.shape != (n,) or v.dtype != torch.float32 or v.device != p.device or not v.is_contiguous():
                continue
            index.append(i)
            vs.append(v)
            outs.append(torch.empty(n, dtype=torch.float32, device=p.device))
        return dict(gram_index=index, gram_v=vs, gram_out=outs) if index else {}

    def _record_products(self, params, args):
        for i, v, w in zip(args.get("gram_index", ()), args.get("gram_v", ()), args.get("gram_out", ())):
            self._products[params[i]] = (v, w, params[i]._version)

    def _inits(self, params):
        """The initial weights to measure drift against at this step (or [])."""
        if not self.initial_weights or self.steps_taken % self.drift_every != 0:
            return []
        return [local(self.initial_weights[p]) for p in params]

    def _record(self, params, sums, measured_drift):
        for i, p in enumerate(params):
            if not measured_drift and p in self._stats:
                sums[i, 3] = self._stats[p][3]  # keep the last drift
            self._stats[p] = sums[i]
            self._fresh.add(p)

    def _fallback(self, params, grads, torch_step):
        """torch's own step; the statistics (of the local shards) from a copy taken before it."""
        before = [local(p).detach().clone() for p in params]
        torch_step()
        inits = self._inits(params)
        params, grads = _locals(params), _locals(grads)
        moved = multi_tensor_norms(params, before)  # ||W_{t+1} - W_t||^2, ||W_{t+1}||^2, ...
        sums = torch.stack([moved[:, Sum.DIFF_SQ], moved[:, Sum.A_SQ],
                            multi_tensor_norms(grads)[:, Sum.A_SQ],
                            multi_tensor_norms(params, inits)[:, Sum.DIFF_SQ] if inits
                            else torch.zeros(len(params), device=params[0].device)], 1)
        return sums, bool(inits)

    def _last_sums(self):
        """((group, index, parameter) of every parameter the last step stepped, their (P, 4)
        sums as one tensor, of the local shards), or ([], None). A parameter without a
        gradient at that step is not stepped: its statistics are absent, not the step's
        before."""
        keyed = [(group, j, p) for group in self.param_groups for j, p in enumerate(group["params"])
                 if p in self._fresh]
        return keyed, torch.stack([self._stats[p] for _, _, p in keyed]) if keyed else None

    def norm_stats(self):
        """{name or parameter: {statistic: device tensor}}; see the module docstring. With
        sharded parameters the shards' sums are added over the ranks here, in one
        all-reduce: every rank must call it."""
        keyed, sums = self._last_sums()
        if not keyed:
            return {}
        params = [p for _, _, p in keyed]
        if any(is_dtensor(p) for p in params):
            sums = sum_over_shards(sums, params)
        # every statistic of every parameter in a few operations, then views of them
        roots = sums.clamp_min(0).sqrt()
        count = torch.tensor([max(p.numel(), 1) for p in params], dtype=roots.dtype, device=roots.device)
        rms = (roots / count.sqrt()[:, None]).unbind(0)
        relative = (roots[:, 0] / roots[:, 1]).unbind(0)
        fro = roots.unbind(0)
        keys = ["update", "weight", "grad"] + (["drift"] if self.initial_weights else [])
        out = {}
        for i, (group, j, p) in enumerate(keyed):
            names = group.get("param_names")
            f, r = fro[i].unbind(0), rms[i].unbind(0)
            st = {}
            for k, key in enumerate(keys):
                st[f"{key}_fro"], st[f"{key}_rms"] = f[k], r[k]
            st["relative_update"] = relative[i]
            out[names[j] if names else p] = st
        return out

    def _find(self, param):
        """(parameter, its group) for a parameter or its name."""
        for group in self.param_groups:
            names = group.get("param_names") or []
            for j, p in enumerate(group["params"]):
                if p is param or (isinstance(param, str) and j < len(names) and names[j] == param):
                    return p, group
        raise KeyError(f"{param if isinstance(param, str) else 'the tensor'} is not a parameter of this optimizer")

    def update_spectral_norm(self, param, state: Optional[Tensor] = None,
                             iters: Optional[int] = None) -> SpectralNorm:
        """Operator norm of the last step's update ``W_{t+1} - W_t`` of one matrix parameter
        (given as the tensor or its name), by power iteration as :func:`spkern.spectral_norm`
        (``state`` and ``iters`` as there), with the update applied as a linear operator
        rebuilt from the optimizer state: no copy of ``W_t`` is kept. Call it after
        :meth:`step` and before the gradients are cleared (SGD without momentum, or with
        Nesterov momentum, reads them). The rebuilt update equals the applied one up to
        float32 rounding. Parameters with more than two dimensions are flattened to
        ``(shape[0], -1)``."""
        p, group = self._find(param)
        if p.dim() < 2:
            raise ValueError(f"update_spectral_norm needs a matrix parameter, got shape {tuple(p.shape)}")
        if p not in self._stats:
            raise RuntimeError("update_spectral_norm: this parameter has not been updated by a step yet")
        split = matrix_split(p, f"parameter {self._name_of(group, p)}")
        fan_out = p.shape[0]
        fan_in = p.numel() // max(fan_out, 1)
        local_rows = local(p).shape[0]  # the rank's block of the (fan_out, fan_in) view
        terms, blocks = self._update_operator(p, group)
        terms = [(c, local(t).detach().reshape(local_rows, split.cols)) for c, t in terms]
        rows = max(1, _BLOCK_ELEMENTS // max(split.cols, 1))
        spans = [(r, min(r + rows, local_rows)) for r in range(0, local_rows, rows)]

        def local_gram(x):  # A^T A x with A = terms + blocks, each block of rows rebuilt once
            y = sum(c * (t.float() @ x) for c, t in terms) if terms else None
            if blocks is None:
                return sum(c * (t.float().t() @ y) for c, t in terms)
            out = torch.zeros_like(x)
            for r0, r1 in spans:
                u = blocks(r0, r1)
                yb = u @ x if y is None else u @ x + y[r0:r1]
                out += u.t() @ yb
                for c, t in terms:
                    out += c * (t[r0:r1].float().t() @ yb)
            return out

        def forward(x):  # A x of the rank's block (columns split: summed over the ranks between the two)
            y = sum(c * (t.float() @ x) for c, t in terms) if terms else x.new_zeros(local_rows)
            for r0, r1 in spans if blocks is not None else ():
                y[r0:r1] += blocks(r0, r1) @ x
            return y

        def backward(y):
            z = sum(c * (t.float().t() @ y) for c, t in terms) if terms else y.new_zeros(split.cols)
            for r0, r1 in spans if blocks is not None else ():
                z += blocks(r0, r1).t() @ y[r0:r1]
            return z

        gram = sharded_gram(split, fan_in, forward, backward, local_gram)
        v, n_iter = start_vector(fan_in, p.device, state, iters)
        return lanczos(gram, v, n_iter, fan_in / fan_out)

    # -- the tracker's protocol (spkern.monitor.params.StepStats) ------------------------

    def stepped_parameters(self):
        """Every parameter this optimizer steps."""
        return [p for group in self.param_groups for p in group["params"]]

    def last_step_stats(self):
        """{parameter: {update_rms, weight_rms, grad_rms, relative_update, and drift_rms
        when it is measured at every step}} of the last step (device scalars)."""
        stats, out = self.norm_stats(), {}
        for group in self.param_groups:
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                st = stats.get(names[j] if names else p)
                if st is None:
                    continue
                out[p] = {k: st[k] for k in ("update_rms", "weight_rms", "grad_rms", "relative_update")}
                if "drift_rms" in st and self.drift_every == 1:
                    out[p]["drift_rms"] = st["drift_rms"]
        return out

    def last_step_sums(self):
        """``(parameters, sums, drift)`` of the last step, for a reader that takes its own
        square roots (the tracker, at its one host transfer): ``sums`` is the (P, 4)
        float32 device tensor of each parameter's ||W_{t+1} - W_t||^2, ||W_{t+1}||^2,
        ||grad||^2 and ||W_{t+1} - W_0||^2, ``drift`` whether that last column is measured
        at every step; None when a parameter is sharded (its sums are a shard's, which
        :meth:`norm_stats` adds over the ranks) or none was stepped."""
        keyed, sums = self._last_sums()
        params = [p for _, _, p in keyed]
        if not params or any(is_dtensor(p) for p in params):
            return None
        return params, sums, bool(self.initial_weights) and self.drift_every == 1

    def request_products(self, vectors):
        """Asks the next step for ``(W_{t+1} - W_0)^T (W_{t+1} - W_0) v`` of the matrices
        in ``vectors`` ({parameter: (float32 (fan_in,) vector v, W_0)}): a tracker's next
        Lanczos product for the operator norm of W_{t+1} - W_0. The CPU step computes it
        from the rows it has just written, while they are in cache, so that the product
        costs no pass over W_{t+1} and W_0 of its own; it does so where W_0 is the tensor
        this optimizer measures the drift against (the tracker's copy, taken with
        :meth:`offer_initial_weights`), read at that step, and the parameter is not
        sharded. Other backends compute none (the tracker then makes its own pass).
        :meth:`step_products` gives what was computed."""
        self._product_requests = dict(vectors)

    def step_products(self):
        """{parameter: (v, product, the parameter's version counter after the step)}
        computed by the last step (see :meth:`request_products`); a product whose
        parameter has been changed in place since (its ``_version`` differs) is stale."""
        return self._products

    def offer_initial_weights(self, weights):
        """Takes ``weights`` ({parameter: W_0}, a tracker's copies) as the initial weights
        to measure the drift against inside the step, when this optimizer keeps none and
        they cover every parameter it steps (no second copy of W_0 is then kept)."""
        params = self.stepped_parameters()
        if not self.initial_weights and params and all(p in weights for p in params):
            self.initial_weights = {p: weights[p] for p in params}

    def norm_stats_floats(self):
        """:meth:`norm_stats` as Python floats, read from the device in one transfer."""
        stats = self.norm_stats()
        flat = [v for st in stats.values() for v in st.values()]
        if not flat:
            return {}
        values = iter(torch.stack(flat).tolist())
        return {key: {name: next(values) for name in st} for key, st in stats.items()}


class SGD(_NormStats, torch.optim.SGD):
    """``torch.optim.SGD`` whose step also records update norms; see the module docstring.

    Extra keyword arguments: ``track_drift`` (keep a copy of the weights as W_0 and record
    ||W - W_0||), ``initial_weights`` (W_0 given instead: tensors in the order of the
    parameters, or a dict by parameter or name), ``drift_dtype`` (dtype W_0 is kept in),
    ``drift_every`` (steps between drift updates).
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None,
                 track_drift: bool = False, drift_dtype: Optional[torch.dtype] = None,
                 drift_every: int = 1, initial_weights=None):
        if differentiable:
            raise ValueError("differentiable=True is not supported by spkern.optim.SGD")
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         foreach=foreach, differentiable=False, fused=None)
        self._init_norms(track_drift, drift_dtype, drift_every, initial_weights)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._begin_step(closure)
        for group, params, grads in self._groups_with_grads():
            momentum = group["momentum"]
            kernel = self._fused_kernel("sgd_step", params, grads)
            if kernel is not None:
                bufs, fresh = [], []
                if momentum != 0:
                    for p in params:
                        state = self.state[p]
                        fresh.append(state.get("momentum_buffer") is None)
                        if fresh[-1]:
                            state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.contiguous_format)
                        bufs.append(local(state["momentum_buffer"]))
                inits = self._inits(params)
                sums = torch.empty(len(params), 4, dtype=torch.float32, device=local(params[0]).device)
                products = self._product_args(kernel, params, inits)
                kernel.fn(
                    [_data(p) for p in params], [local(g).contiguous() for g in grads], bufs, fresh, inits, sums,
                    group["lr"], momentum, group["dampening"], group["weight_decay"],
                    group["nesterov"], group["maximize"], **products)
                self._record_products(params, products)
                measured = bool(inits)
            else:
                def torch_step(group=group):
                    # (self.state is a defaultdict: touch it only where torch does)
                    bufs = ([self.state[p].get("momentum_buffer") for p in params] if momentum != 0
                            else [None] * len(params))
                    _torch_sgd(
                        params, grads, bufs, weight_decay=group["weight_decay"], momentum=momentum,
                        lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                        maximize=group["maximize"], foreach=group["foreach"])
                    if momentum != 0:  # sgd() creates the buffers of a first step in the list
                        for p, buf in zip(params, bufs):
                            self.state[p]["momentum_buffer"] = buf
                sums, measured = self._fallback(params, grads, torch_step)
            self._record(params, sums, measured)
        self._end_step()
        return loss


    def _update_operator(self, p, group):
        """The last update as sum(c * tensor): -lr buf with plain momentum; otherwise, from
        d = g + wd W_t (and + momentum buf with Nesterov) and W_t = W_{t+1} - update,
        update = -lr (g + wd W_{t+1} [+ momentum buf]) / (1 - lr wd)."""
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        buf = self.state[p].get("momentum_buffer")
        if momentum != 0 and not group["nesterov"]:
            return [(-lr, buf)], None
        if p.grad is None:
            raise RuntimeError("update_spectral_norm: SGD without momentum or with Nesterov momentum reads "
                               "the gradient of the step; call it before zero_grad()")
        c = -lr / (1 - lr * wd)
        terms = [(-c if group["maximize"] else c, p.grad)]
        if wd != 0:
            terms.append((c * wd, p.detach()))
        if momentum != 0:
            terms.append((c * momentum, buf))
        return terms, None


class AdamW(_NormStats, torch.optim.AdamW):
    """``torch.optim.AdamW`` whose step also records update norms; see the module docstring.

    Extra keyword arguments as for :class:`SGD`.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, track_drift: bool = False,
                 drift_dtype: Optional[torch.dtype] = None, drift_every: int = 1,
                 initial_weights=None):
        if differentiable or capturable:
            raise ValueError("differentiable=True and capturable=True are not supported by spkern.optim.AdamW")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=False,
                         differentiable=False, fused=None)
        self._init_norms(track_drift, drift_dtype, drift_every, initial_weights)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._begin_step(closure)
        for group, params, grads in self._groups_with_grads():
            beta1, beta2 = group["betas"]
            amsgrad = group["amsgrad"]
            for p in params:  # state as torch.optim.AdamW creates it
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if amsgrad:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states = [self.state[p] for p in params]
            kernel = self._fused_kernel("adamw_step", params, grads)
            if kernel is not None:
                steps = []
                for s in states:
                    s["step"] += 1
                    steps.append(float(s["step"]))  # a CPU scalar: no device sync
                inits = self._inits(params)
                sums = torch.empty(len(params), 4, dtype=torch.float32, device=local(params[0]).device)
                products = self._product_args(kernel, params, inits)
                kernel.fn(
                    [_data(p) for p in params], [local(g).contiguous() for g in grads],
                    [local(s["exp_avg"]) for s in states], [local(s["exp_avg_sq"]) for s in states],
                    [local(s["max_exp_avg_sq"]) for s in states] if amsgrad else [], steps, inits, sums,
                    group["lr"], beta1, beta2, group["eps"], group["weight_decay"], amsgrad,
                    group["maximize"], **products)
                self._record_products(params, products)
                measured = bool(inits)
            else:
                def torch_step(group=group):
                    _torch_adam(
                        params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                        [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                        [s["step"] for s in states], foreach=group["foreach"], amsgrad=amsgrad,
                        beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                        eps=group["eps"], maximize=group["maximize"], decoupled_weight_decay=True)
                sums, measured = self._fallback(params, grads, torch_step)
            self._record(params, sums, measured)
        self._end_step()
        return loss

    def _update_operator(self, p, group):
        """The last update: with U = exp_avg / (sqrt(exp_avg_sq) / sqrt(bc2) + eps) and
        W_t = (W_{t+1} + lr / bc1 U) / (1 - lr wd),
        update = (-lr wd W_{t+1} - lr / bc1 U) / (1 - lr wd); U is rebuilt a block of rows
        at a time."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        st = self.state[p]
        step = float(st["step"])
        step_size = lr / (1 - beta1**step)
        bc2_sqrt = (1 - beta2**step) ** 0.5
        scale = 1 / (1 - lr * wd)
        rows = local(p).shape[0]  # (the rank's block of the (shape[0], -1) view)
        cols = local(p).numel() // rows if rows else 0
        m = local(st["exp_avg"]).reshape(rows, cols)
        v = local(st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]).reshape(rows, cols)

        def blocks(r0, r1):
            u = v[r0:r1].float().sqrt().div_(bc2_sqrt).add_(eps)  # one temporary per block
            return torch.div(m[r0:r1], u, out=u).mul_(-step_size * scale)

        terms = [(-lr * wd * scale, p.detach())] if wd != 0 else []
        return terms, blocks


__all__ = ["AdamW", "SGD"]
