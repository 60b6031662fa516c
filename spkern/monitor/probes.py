"""The tracker's probes: on which inputs activations are measured, x_t and x_0.

:class:`FixedProbe`  a fixed batch, given or the first one the model sees; the tracker
                     runs it after every ``every``-th step (and once at the start, for the
                     reference activations)
:class:`TrainingBatch`  ``probe="batch"``: the training batch of every ``every``-th step,
                     measured in its own forward, against a reference pass on the same
                     inputs just before it

A probe talks to the tracker through a few calls: ``t.recording`` runs passes and sees a
training forward (:class:`spkern.monitor.record.Recording`), ``t.begin(step)`` starts a
measurement and ``t.finish(out, ref_out)`` completes it; it reads ``t.steps``,
``t.every``, ``t.model`` and ``t.reference``. The probe chooses x_t and x_0; what is
measured on them is defined once, in :mod:`spkern.monitor.measure`.
"""

import warnings

import torch

from spkern.monitor.capture import as_call, call_rows, describe_call, no_autocast, written_by_design


def _ran_unseen(t):
    """Why a step has no forward the tracker saw although the model ran (its parameters
    have new gradients since the last step), or None."""
    if not t.new_gradients():
        return None
    return ("the model ran (its parameters have new gradients) but the tracker's hooks did not fire: most likely "
            "torch.compile reused a graph compiled before they were attached (dynamo does not guard on hooks added "
            "later: torch._dynamo.config.skip_nnmodule_hook_guards), else a call of model.forward, which skips "
            "hooks; make the tracker before the first compiled call of this architecture, call "
            "torch.compiler.reset() after making it, or give probe= a batch")


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
        self._first_hook = None
        if probe is None:
            # (run eagerly when torch.compile traces the model: the probe pass is not traced; the
            # hook is removed once the probe is set, so that later compiled calls do not see it)
            self._first_hook = tracker.model.register_forward_pre_hook(
                torch.compiler.disable(self._first_batch), with_kwargs=True, prepend=tracker.sharded)
            tracker.hooks.append(self._first_hook)  # (before FSDP2's)

    def set(self, probe):
        t = self.t
        call = as_call(probe)
        if t.reference.model_ref is None and t.steps > 0:
            raise RuntimeError("the probe must be set before the first optimizer step when reference='init' "
                               "(the reference activations are the model's at initialisation)")
        self.probe = call
        try:
            self.ref_out = t.output_of(self.forward("reference"))
        except Exception as e:  # a probe of the wrong shape, dtype or device, say
            self.probe = None
            raise ValueError(f"the model cannot run on the probe ({describe_call(*call)}): "
                             f"{type(e).__name__}: {e}") from e
        if self._first_hook is not None:
            self._first_hook.remove()

    def _first_batch(self, module, args, kwargs):
        if self.probe is None and self.t.recording.role is None:
            try:
                call = as_call((args, kwargs))
            except TypeError:  # a call without a tensor: wait for one
                return None
            self.set(call_rows(*call, self.t.probe_rows))
        return None

    def forward(self, role):
        t = self.t
        model = t.reference.model_ref if (role == "reference" and t.reference.model_ref is not None) else t.model
        args, kwargs = self.probe
        return t.recording.run(model, role, lambda: model(*args, **kwargs), False, replace=True)

    def measure_step(self):
        t = self.t
        if self.probe is None:  # the parameters are measured all the same
            if not self._warned:
                self._warned = True
                why = _ran_unseen(t)
                warnings.warn("spkern.Tracker: no probe yet: " + (why or "no probe= given and the model has not run "
                              "with a tensor argument") + "; only the parameters are measured until it does",
                              RuntimeWarning, stacklevel=3)
            t.begin(t.steps)
            t.finish(None, None)
            return
        self.measure(after_step=True)

    def measure(self, after_step=False):
        t = self.t
        if self.probe is None:
            raise RuntimeError("the tracker has no probe yet: pass probe= or run the model once")
        t.begin(t.steps)
        out = t.output_of(self.forward("current"))
        t.layer_norms()
        t.finish(out, self.ref_out, after_step)

    def state_dict(self):
        """The probe and its reference activations (plain tensors, dicts and lists: a file
        ``torch.load`` reads with ``weights_only=True``)."""
        refs = {n: [{"x": a.x, "h": a.h, "z": a.z} for a in apps] for n, apps in self.t.recording.refs.items()}
        return {"probe": self.probe, "ref_out": self.ref_out, "refs": refs}

    def load_state_dict(self, state):
        from spkern.monitor.measure import RefApp

        self.probe, self.ref_out = state["probe"], state["ref_out"]
        if self.probe is not None:
            self.probe = (tuple(self.probe[0]), dict(self.probe[1]))
        self.t.recording.refs = {n: [RefApp(a["x"], a["h"], a["z"]) for a in apps]
                                 for n, apps in state["refs"].items()}
        if self.probe is not None and self._first_hook is not None:
            self._first_hook.remove()


class TrainingBatch:
    """``probe="batch"``: before the first forward with gradients of every ``every``-th
    step, the reference (the model with its initial parameters and buffers, through
    ``torch.func.functional_call``, or the reference model) runs on the same inputs in the
    model's mode and autocast context; the training forward that follows is seen by the
    tracker (its layers' applications measured against the reference's)."""

    on_training_batch = True
    probe = None

    def __init__(self, tracker):
        t = self.t = tracker
        self.measured_step = -1  # the step count when a training forward was measured
        self.ref_out = None
        self._watching = False
        self._depth = 0  # calls of the model inside the watched one
        self._first = None  # the output of the first call of the model to complete
        # (before FSDP2's own pre-forward hook, so that the reference pass is a forward of its own)
        t.hooks.append(t.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=t.sharded))
        t.hooks.append(t.model.register_forward_hook(self._post_hook, always_call=True))
        self._apart = torch.compiler.disable(self._measure_apart)

    # Under torch.compile (dynamo traces the hooks with the forward) the training forward is
    # not seen in place: the hook runs, eagerly, the reference pass and then a pass of the
    # tracker's own on the same inputs with the current weights, which gives the same
    # activations; the compiled forward then sees hooks that do nothing, and no tracker
    # state it would have to guard on (no recompilation at measured steps).

    # The model may be called inside its own call (Lightning under DDP calls the module with
    # its forward redirected to training_step, which calls the module's forward): the
    # outermost call is watched, and the model's output is the first call to complete, in
    # the reference pass as in the training forward.

    def _pre_hook(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            return self._apart(module, args, kwargs)
        if self._watching:
            self._depth += 1
        elif self._due():
            self._first = None
            self._reference(args, kwargs)
            self._watching, self._depth, self._first = True, 1, None
            self.t.recording.watch()
        return None

    def _post_hook(self, module, args, output):
        if torch.compiler.is_compiling():
            return None
        if self.t.recording.role == "reference" and self._first is None:  # (the reference pass's output)
            self._first = output
        if not self._watching:
            return None
        if self._first is None:
            self._first = output
        self._depth -= 1
        if self._depth > 0:
            return None
        t = self.t
        self._watching = False
        try:
            t.recording.unwatch()
            t.layer_norms()  # (of the weights of this forward, before the step's update)
            with torch.no_grad(), no_autocast():
                t.measurement.output(t.output_key, t.output_of(self._first), self.ref_out)
                t.measurement.flush()
        finally:
            t.recording.refs, self.ref_out, self._first = {}, None, None  # free the reference activations
        return None

    def _due(self):
        t = self.t
        return (t.recording.role is None and torch.is_grad_enabled() and self.measured_step != t.steps
                and (t.steps + 1) % t.every == 0)

    def _measure_apart(self, module, args, kwargs):
        t = self.t
        if not self._due():
            return None
        self._reference(args, kwargs)
        try:
            out = t.recording.run(t.model, "current", lambda: t.model(*args, **kwargs), t.model.training,
                                  autocast_off=False)
            t.layer_norms()
            t.measurement.output(t.output_key, t.output_of(out), self.ref_out)
            t.measurement.flush()  # (its activations are not kept through the training step)
        finally:
            t.recording.refs, self.ref_out = {}, None
        return None

    def set(self, probe):
        raise RuntimeError("this tracker measures on the training batch (probe='batch'): it takes no probe")

    def _reference(self, args, kwargs):
        """Starts the step's measurement with the reference pass on the training inputs."""
        t = self.t
        self.measured_step = t.steps
        t.begin(t.steps + 1)
        ref = t.reference
        training = t.model.training
        if ref.model_ref is not None:
            model = ref.model_ref
            self.ref_out = t.output_of(t.recording.run(model, "reference", lambda: model(*args, **kwargs), training,
                                                       autocast_off=False))
        elif t.sharded:
            self._sharded_reference(args, kwargs)
        else:  # the model's own forward with its initial parameters; buffers and the weights the
            # forward writes (an Embedding's under max_norm) copied, so that the pass leaves W_0 and
            # the saved buffers as they are
            written = self._written()
            state = {n: b.clone() if n in written else b if b.dtype == dt else b.to(dt)
                     for n, (b, dt) in ref.init_state.items()}
            versions = [(n, b, b._version) for n, b in state.items() if n not in written]
            out = t.recording.run(t.model, "reference", lambda: torch.func.functional_call(t.model, state, args, kwargs),
                                  training, state=state, autocast_off=False)
            self.ref_out = t.output_of(self._first if self._first is not None else out)
            wrote = [n for n, b, v in versions if b._version != v]
            if wrote:
                self._wrote |= set(wrote)
                warnings.warn(f"spkern.Tracker(probe='batch'): the model's forward wrote {wrote} in the reference "
                              "pass, where they are W_0 (a forward that writes its weights on some inputs only): "
                              "W_0 of them is changed; they are copied for the pass from the next one on",
                              RuntimeWarning, stacklevel=4)

    def _written(self):
        """The names of the initial state a forward writes: the buffers, and the weights
        known to be written (an Embedding's under max_norm) or seen written."""
        if not hasattr(self, "_wrote"):
            model = self.t.model
            known = {id(w) for w in written_by_design(model)}
            self._wrote = ({n for n, _ in model.named_buffers()}
                           | {n for n, p in model.named_parameters() if id(p) in known})
        return self._wrote

    def _sharded_reference(self, args, kwargs):
        """The reference pass of a model with DTensor parameters (FSDP2): functional_call
        cannot reach the parameters FSDP gathers, so W_0 is put in each parameter's local
        shard for the pass (the shard of W_t kept aside: one sharded copy, for the pass
        only), with the initial buffers, then W_t put back; the gathered W_0 is freed
        (the pass reshards) so that the training forward gathers W_t."""
        from spkern.distributed import local

        t = self.t
        named = dict(t.model.named_parameters())
        named.update(dict(t.model.named_buffers()))
        saved = []
        # (a plain parameter beside the DTensors, as in a tensor-parallel model, is written and
        # put back: it still holds W_0 afterwards if it did before)
        initial = [p for p in named.values() if t.reference.is_initial(p)]
        with torch.no_grad():
            for n, (init, _) in t.reference.init_state.items():
                now = local(named[n])
                saved.append((now, now.clone()))
                now.copy_(local(init))
        try:
            self.ref_out = t.output_of(t.recording.run(t.model, "reference", lambda: t.model(*args, **kwargs),
                                                       t.model.training, autocast_off=False))
        finally:
            with torch.no_grad():
                for now, value in saved:
                    now.copy_(value)
            for p in initial:
                t.reference.mark_initial(p)

    def measure_step(self):
        t = self.t
        if self.measured_step != t.steps - 1:
            why = _ran_unseen(t)
            warnings.warn("spkern.Tracker(probe='batch'): " + (why or "the model ran no forward with gradients "
                          "before this step") + ": only the parameters were measured", RuntimeWarning, stacklevel=3)
            t.begin(t.steps)
        t.finish(None, None)

    def measure(self, after_step=False):
        raise RuntimeError("with probe='batch' the tracker measures during the training forward of every "
                           "`every`-th step; measure() needs a probe batch")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
