"""The tracker's probes: on which inputs activations are measured.

:class:`FixedProbe`  a fixed batch, given or the first one the model sees; the tracker
                     runs it after every ``every``-th step (and once at the start, for the
                     reference activations)
:class:`TrainingBatch`  ``probe="batch"``: the training batch of every ``every``-th step,
                     measured in its own forward, against a reference pass on the same
                     inputs just before it

Each probe is given the tracker and uses its hooks, passes and statistics; the tracker
asks it to measure at a step (:meth:`measure_step`) or now (:meth:`measure`).
"""

import warnings

import torch
import torch.nn.functional as F

from spkern.monitor.capture import as_call, call_rows, describe_call
from spkern.monitor.layers import is_captured


class FixedProbe:
    """A fixed probe batch: ``probe`` (any form :func:`spkern.monitor.capture.as_call`
    takes: a tensor, positional arguments, keyword arguments or both; the tracker then
    calls :meth:`set`), or None for the first ``probe_rows`` rows of the first call the
    model gets, as it was made (keyword arguments and masks included)."""

    on_training_batch = False

    def __init__(self, tracker, probe):
        self.t = tracker
        self.probe = None
        self.ref_out = None
        self._warned = False  # (the warning of a step measured without a probe: once)
        if probe is None:
            # (run eagerly when torch.compile traces the model: the probe pass is not traced; the
            # hook is removed once the probe is set, so that later compiled calls do not see it)
            self._first_hook = tracker.model.register_forward_pre_hook(
                torch.compiler.disable(self._first_batch), with_kwargs=True, prepend=tracker._sharded)
            tracker._hooks.append(self._first_hook)  # (before FSDP2's)

    def set(self, probe):
        t = self.t
        call = as_call(probe)
        if t._ref_model is None and t.steps > 0:
            raise RuntimeError("the probe must be set before the first optimizer step when reference='init' "
                               "(the reference activations are the model's at initialisation)")
        self.probe = call
        t._ref = {}
        try:
            self.ref_out = t._model_output(self.forward("reference"))
        except Exception as e:  # a probe of the wrong shape, dtype or device, say
            self.probe = None
            raise ValueError(f"the model cannot run on the probe ({describe_call(*call)}): "
                             f"{type(e).__name__}: {e}") from e
        t._init_op_w0()

    def _first_batch(self, module, args, kwargs):
        if self.probe is None and self.t._capture is None:
            try:
                call = as_call((args, kwargs))
            except TypeError:  # a call without a tensor: wait for one
                return None
            self.set(call_rows(*call, self.t.probe_rows))
            self._first_hook.remove()
        return None

    def forward(self, which):
        t = self.t
        model = t._ref_model if (which == "reference" and t._ref_model is not None) else t.model
        # on the current model, tracked Linear layers compute W_t x_t and W_0 x_t together
        paired = which == "current" and t.rcc
        with t._pass(model, which, False, t._linear_weights(model) if paired else None,
                     t._paired_linear if paired else None):
            args, kwargs = self.probe
            return model(*args, **kwargs)

    def measure_step(self):
        t = self.t
        if self.probe is None:  # the parameters are measured all the same
            if not self._warned:
                self._warned = True
                warnings.warn("spkern.Tracker: no probe yet (no probe= given and the model has not run with a "
                              "tensor argument): only the parameters are measured until it does",
                              RuntimeWarning, stacklevel=3)
            t._start_measurement()
            t._finish()
            return True
        self.measure()
        return True

    def measure(self):
        t = self.t
        if self.probe is None:
            raise RuntimeError("the tracker has no probe yet: pass probe= or run the model once")
        t._start_measurement()
        t._output_stats(t._model_output(self.forward("current")), self.ref_out)
        t._finish()


class TrainingBatch:
    """``probe="batch"``: before the first forward with gradients of every ``every``-th
    step, the reference (the model with its initial parameters and buffers, through
    ``torch.func.functional_call``, or the reference model) runs on the same inputs in the
    model's mode; the training forward that follows is measured by the tracker's hooks."""

    on_training_batch = True

    def __init__(self, tracker):
        t = self.t = tracker
        self.measured_step = -1  # the step count when a training forward was measured
        self.ref_out = None
        self.init_state = None
        if t._ref_model is None:  # the reference pass runs the model on these tensors
            self.init_state = self._initial_state()
            self.init_buffers = {n for n, _ in t.model.named_buffers()}
            first_name = {id(p): n for n, p in t.model.named_parameters()}  # tied weights: one name
            # (the layers whose products the pass captures in F.linear: a tied embedding is not one)
            self.lin_keys = {n: first_name[id(w)] for n, w in t._lin_param.items() if is_captured(t._maps[n])}
        t._init_op_w0()
        # (before FSDP2's own pre-forward hook, so that the reference pass is a forward of its own)
        t._hooks.append(t.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=t._sharded))
        t._hooks.append(t.model.register_forward_hook(self._post_hook, always_call=True))
        self._apart = torch.compiler.disable(self._measure_apart)

    # Under torch.compile (dynamo traces the hooks with the forward) the training forward is
    # not measured in place: the hook runs, eagerly, the reference pass and then a pass of
    # the tracker's own on the same inputs with the current weights, which gives the same
    # activations; the compiled forward then sees hooks that do nothing, and no tracker
    # state it would have to guard on (no recompilation at measured steps).

    def _pre_hook(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            return self._apart(module, args, kwargs)
        return self._pre(module, args, kwargs)

    def _post_hook(self, module, args, output):
        if torch.compiler.is_compiling():
            return None
        return self._post(module, args, output)

    def _measure_apart(self, module, args, kwargs):
        t = self.t
        self._pre(module, args, kwargs)  # (the reference pass, when this step is measured)
        if t._capture != "current":
            return None
        try:
            paired = t.rcc
            with t._pass(t.model, "current", t.model.training, t._linear_weights(t.model) if paired else None,
                         t._paired_linear if paired else None, restore_buffers=True):
                out = t.model(*args, **kwargs)
            t._output_stats(t._model_output(out), self.ref_out)
            t._flush_sums()  # (its activations are not kept through the training step)
        finally:
            t._capture = None
            t._ref, self.ref_out = {}, None
        return None

    probe = None

    def set(self, probe):
        raise RuntimeError("this tracker measures on the training batch (probe='batch'): it takes no probe")

    def _initial_state(self):
        """Every parameter and buffer of the model at initialisation, for the reference
        pass (tracked parameters share the tracker's W_0 copies)."""
        t = self.t
        tracked = {id(p): t._w0[n] for n, p in t.params}
        state = {}
        for n, p in t.model.named_parameters():
            w0 = tracked.get(id(p))
            state[n] = (w0 if w0 is not None else p.detach().clone(), p.dtype)
        for n, b in t.model.named_buffers():
            state[n] = (b.detach().clone(), b.dtype)
        return state

    def _pre(self, module, args, kwargs):
        t = self.t
        if (t._capture is not None or not torch.is_grad_enabled() or self.measured_step == t.steps
                or (t.steps + 1) % t.every != 0):
            return None
        self.measured_step = t.steps
        t._start_measurement()
        t._ref = {}
        model = t._ref_model if t._ref_model is not None else t.model
        if t._ref_model is not None:
            state, weights = None, t._linear_weights(model)
        elif t._sharded:
            self._sharded_reference(args, kwargs)
            t._capture = "current"
            return None
        else:  # the model's own forward with its initial parameters; buffers copied, so that a
            # pass in training mode (BatchNorm's running statistics) leaves the saved ones as they are
            state = {n: b.clone() if n in self.init_buffers else b if b.dtype == dt else b.to(dt)
                     for n, (b, dt) in self.init_state.items()}
            weights = {n: state[key] for n, key in self.lin_keys.items()}
        with t._pass(model, "reference", t.model.training, weights, self._reference_linear if t.rcc else None,
                     restore_buffers=state is None):
            out = model(*args, **kwargs) if state is None else torch.func.functional_call(model, state, args, kwargs)
        self.ref_out = t._model_output(out)
        t._capture = "current"
        return None

    def _sharded_reference(self, args, kwargs):
        """The reference pass of a model with DTensor parameters (FSDP2): functional_call
        cannot reach the parameters FSDP gathers, so W_0 is put in each parameter's local
        shard for the pass (the shard of W_t kept aside: one sharded copy, for the pass
        only), with the initial buffers, then W_t put back; the gathered W_0 is freed
        (``reshard``) so that the training forward gathers W_t."""
        from spkern.distributed import local

        t = self.t
        named = dict(t.model.named_parameters())
        named.update(dict(t.model.named_buffers()))
        saved = []
        with torch.no_grad():
            for n, (init, _) in self.init_state.items():
                now = local(named[n])
                saved.append((now, now.clone()))
                now.copy_(local(init))
        try:
            with t._pass(t.model, "reference", t.model.training, t._linear_weights(t.model),
                         self._reference_linear if t.rcc else None):  # (W_0 freed after it: the pass reshards)
                self.ref_out = t._model_output(t.model(*args, **kwargs))
        finally:
            with torch.no_grad():
                for now, value in saved:
                    now.copy_(value)

    def _post(self, module, args, output):
        t = self.t
        if t._capture != "current" or t._pending is not None:  # (not in a pass of the tracker's own)
            return None
        t._capture = None
        t._output_stats(t._model_output(output), self.ref_out)
        t._flush_sums()
        t._ref, self.ref_out = {}, None  # free the reference activations
        return None

    def _reference_linear(self, name, x, weight, bias):
        z = F.linear(x, weight)  # W_0 x_0, kept (in the reference pass the weight is W_0)
        self.t._zref[name] = z
        return z + bias if bias is not None else z

    def measure_step(self):
        t = self.t
        if self.measured_step != t.steps - 1:
            warnings.warn("spkern.Tracker(probe='batch'): the model ran no forward with gradients before "
                          "this step: only the parameters were measured", RuntimeWarning, stacklevel=3)
            t._start_measurement()
        t._finish()
        return True

    def measure(self):
        raise RuntimeError("with probe='batch' the tracker measures during the training forward of every "
                           "`every`-th step; measure() needs a probe batch")
