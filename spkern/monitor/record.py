"""How the tracker sees the layers: their applications in its own passes and in a measured
training forward, turned into the sums of a :class:`spkern.monitor.measure.Measurement`.

A pass has a role: ``"reference"`` (x_0, h_0 and f(x_0; θ_0) of every application are
kept) or ``"current"`` (each application is measured against the reference application
of the same rank). Layers of kind "linear" are seen in ``F.linear`` (the
:class:`spkern.monitor.capture.Recorder`), the others in forward hooks. In a pass of the
tracker's own on a fixed probe, ``F.linear`` on a tracked weight is replaced by the
products f(x; θ_t) and f(x; θ_0) themselves (one pass over x), the layer's output being
the first plus the bias, in the reference pass as in the measured one, so that a model
that has not moved gives bitwise the same activations. In a training forward (probe
"batch") the model computes as it does, and the products are the tracker's.

The statistics of a pass of the tracker's own are computed when it is over, all
together; a layer whose output or input the model changes in place afterwards (a
``ReLU(inplace=True)``), which the reference pass reveals, has them copied first.
"""

import warnings

import torch
from torch import Tensor

from spkern.distributed import Split, is_dtensor, lead, local_count, local_of, sharded, waited
from spkern.monitor.capture import Recorder, first_tensor, no_autocast, own_pass, reshard
from spkern.monitor.measure import RefApp, products
from spkern.monitor.reference import current_weight, whole


class Recording:
    """The hooks and the recorder of a tracker's passes (see the module docstring).
    ``measurement`` is the :class:`Measurement` being taken (set by the tracker);
    ``refs`` the reference applications {layer name: [RefApp]}."""

    def __init__(self, model, layers, reference, guard, *, rcc=True, sharded=False, model_ref=None):
        self.model, self.layers, self.reference, self.guard = model, layers, reference, guard
        self.rcc, self.sharded, self.model_ref = rcc, sharded, model_ref
        self.role = None  # "reference" or "current" while a pass or a measured forward is seen
        self.own = False  # a pass of the tracker's own (not a training forward): statistics after it
        self.replace = False  # F.linear on a tracked weight replaced by the products (a fixed probe's passes)
        self.quiet = False  # the tracker's own calls of a layer (its products): not recorded
        self.measurement = None
        self.refs = {}
        self._count = {}  # layer name -> applications seen in this pass
        self._seen = {}  # layer name -> applications recorded in F.linear (or addmm) its hook has not seen
        self._pending = []  # a pass of the tracker's own: applications measured after it
        self._originals = []  # a reference pass's recorded tensors and their versions
        self._clone = set()  # layers whose output or input is changed in place after them
        self.recorder = None
        self._owners = {}
        self.hooks = []
        for m in (model, model_ref):
            if m is None:
                continue
            modules = dict(m.named_modules())
            for layer in layers.values():
                if layer.hooked:
                    self.hooks.append(modules[layer.name].register_forward_hook(
                        self._hook(layer, m is model), with_kwargs=True, prepend=sharded))

    # -- the weights F.linear applies --------------------------------------------------

    def linear_weights(self, model, state=None):
        """{id(weight): layer} of the layers of kind "linear" as ``model`` applies them (its
        own parameters; ``state``: the tensors functional_call puts in their place); of a
        sharded model, a function giving {layer: weight} as they are when called."""
        linear = [layer for layer in self.layers.values() if layer.kind == "linear"]
        if state is not None:
            first = {}
            for n, p in self.model.named_parameters():
                first.setdefault(id(p), n)
            return {id(state[first[id(getattr(layer.module, layer.weight))]]): layer for layer in linear
                    if id(getattr(layer.module, layer.weight)) in first}
        owner = self._owners.get(id(model))
        if owner is None:  # (the module holding each weight: found once per model)
            modules = dict(model.named_modules())
            owner = self._owners[id(model)] = {
                layer.name: modules[layer.name] if layer.hooked else modules[layer.name.rsplit(".", 1)[0]]
                if "." in layer.name else model for layer in linear}
        if self.sharded and model is self.model:
            return lambda: {layer: getattr(owner[layer.name], layer.weight) for layer in linear}
        return {id(getattr(owner[layer.name], layer.weight)): layer for layer in linear}

    def _w0(self, layer, rows=None):
        w0 = whole(self.reference.weight0(layer))
        return w0 if rows is None else w0[rows[0]:rows[1]]

    # -- passes --------------------------------------------------------------------------

    def run(self, model, role, fn, training, state=None, autocast_off=True, replace=False):
        """``fn()`` (a call of ``model``) as a pass of the tracker's own in ``role``;
        ``state``: the tensors functional_call puts in place of the parameters;
        ``replace``: F.linear on a tracked weight replaced by the products."""
        self.begin(role, own=True, weights=self.linear_weights(model, state))
        self.replace = replace
        try:
            with own_pass(model, training, self.guard, self.recorder, autocast_off):
                out = fn()
            if self.sharded:  # FSDP2 keeps the root's gathered parameters after a forward: free them
                reshard(model)
            self._after_pass()
            return out
        finally:
            self.end()

    def begin(self, role, own=False, weights=None):
        """Starts seeing applications in ``role`` (a training forward: ``own=False``)."""
        self.role, self.own = role, own
        self._count, self._seen, self._pending, self._originals = {}, {}, [], []
        if role == "reference":
            self.refs = {}
        self.recorder = Recorder(self.linear_weights(self.model) if weights is None else weights, self._linear)

    def watch(self):
        """Sees a training forward (its layers' applications measured against the
        reference's) until :meth:`unwatch`."""
        self.begin("current")
        self.recorder.__enter__()  # (the forward's F.linear calls seen)

    def unwatch(self):
        self.recorder.__exit__(None, None, None)
        self.end()

    def end(self):
        self.role, self.own, self.replace, self.recorder = None, False, False, None
        self._seen, self._pending, self._originals = {}, [], []

    def _after_pass(self):
        changed = {name for name, t, version in self._originals if t._version != version}
        if self.role == "reference":
            self._clone |= changed
            return
        pending, self._pending = self._pending, []
        late = {layer.name for layer, *_, versions in pending
                if any(t is not None and t._version != v for t, v in versions)}
        if late:
            self._clone |= late
            warnings.warn(f"spkern.Tracker: the model changed the output or input of {sorted(late)} in place after "
                          "the layer, which the reference pass had not shown: this measurement of them is not "
                          "reliable; they are copied from the next one on", RuntimeWarning, stacklevel=4)
        with torch.no_grad():
            for layer, x, h, ref, y, z, counts, _ in pending:
                self.measurement.add(layer, x, h, ref, y, z, counts)

    # -- applications -------------------------------------------------------------------

    def _record(self, layer, x, h, y=None, z=None, counts=(True, True, True)):
        name = layer.name
        k = self._count.get(name, 0)
        self._count[name] = k + 1
        x = waited(x.detach()) if isinstance(x, Tensor) else None
        h = waited(h.detach())
        if self.role == "reference":
            self._originals += [(name, t, t._version) for t in (x, h) if t is not None]
            self.refs.setdefault(name, []).append(
                RefApp(x.clone() if x is not None and x.is_floating_point() else None, h.clone(), z))
            return
        apps = self.refs.get(name, ())
        ref = apps[k] if k < len(apps) else None
        if self.own:
            if name in self._clone:
                x, h = (x.clone() if x is not None else None), h.clone()
            versions = [(t, t._version) for t in (x, h) if t is not None]
            self._pending.append((layer, x, h, ref, y, z, counts, versions))
        else:  # a training forward: measured now, its tensors not kept past the layer
            with torch.no_grad(), no_autocast():
                self.measurement.add(layer, x, h, ref, y, z, counts)
                self.measurement.flush()

    def _products(self, layer, x, call, which):
        """f(x; θ_t) and/or f(x; θ_0) of ``layer`` (``which``: "current" both, "reference"
        θ_0), computed quietly (no hook or recorder sees the layer's own calls)."""
        if layer.kind == "generic":
            thetas = [{n: whole(t) for n, t in self.reference.theta0(layer).items()}]  # (FSDP2: gathered)
            if which == "current":
                thetas.insert(0, dict(layer.parameters()))
        else:
            thetas = [self._w0(layer)]
            if which == "current":
                thetas.insert(0, current_weight(layer))
        was = self.quiet
        self.quiet = True
        try:
            if self.recorder is not None:
                with self.recorder.pause():
                    return products(layer, x, thetas, call)
            return products(layer, x, thetas, call)
        finally:
            self.quiet = was

    def _hook(self, layer, mine):
        """The forward hook of ``layer``'s module in the tracked model (``mine``) or in the
        reference model (seen in reference passes only)."""
        def hook(module, args, kwargs, output):
            if self.role is None or self.quiet or (not mine and self.role != "reference"):
                return
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if layer.kind == "linear" and self._seen.get(layer.name):
                self._seen[layer.name] -= 1
                return  # (recorded in F.linear)
            h = first_tensor(output)
            if h is None or not h.is_floating_point():
                return
            if is_dtensor(h) or is_dtensor(x):  # (tensor parallelism: each rank's part, counted once)
                if self.rcc and layer.rcc and is_dtensor(getattr(layer.module, layer.weight or "", None)):
                    raise NotImplementedError(
                        f"spkern.Tracker: layer {layer.name!r} ({type(layer.module).__name__}) has a tensor-parallel "
                        f"weight; the refined coordinate check of tensor-parallel layers covers nn.Linear "
                        f"(ColwiseParallel, RowwiseParallel): leave this layer out (modules=...) or pass rcc=False")
                h, ch = local_count(h)
                x, cx = local_count(x) if x is not None else (None, True)
                self._record(layer, x, h, counts=(cx, ch, True))
                return
            y = z = None
            if self.rcc and layer.rcc and x is not None:
                got = self._products(layer, x, (args, kwargs), self.role)
                y, z = got if self.role == "current" else (None, got[0])
            self._record(layer, x, h, y, z)
        return hook

    def _linear(self, layer, x, weight, bias, rows, call):
        """F.linear(x, weight, bias) of a layer of kind "linear" (or Conv1D's addmm: the
        weight stored (in, out)), seen by the recorder; ``call()`` makes it as it was."""
        if self.quiet:
            return call()
        self._seen[layer.name] = self._seen.get(layer.name, 0) + 1
        if is_dtensor(weight):
            return self._linear_parallel(layer, x, weight, call)
        if not self.rcc:
            out = call()
            self._record(layer, x, out)
            return out
        w0 = self._w0(layer, rows)
        # f(x; θ_t) and f(x; θ_0) in a measured pass; in a reference pass f(x_0; θ_0) and, where
        # the weight applied is not W_0 (the model wrote it during the pass, as an Embedding with
        # max_norm does to a weight tied to it, or FSDP2 gathered it), the weight's own product
        base = weight if rows is None else weight._base
        same = self.role == "reference" and self.reference.is_initial(base)
        weights = [weight] if same else [weight, w0]
        if self.replace:  # the products are the pass's own output: W x (+ b), rounded alike in both passes
            with torch.no_grad():
                ys = products(layer, x, weights)
            out = ys[0].to(x.dtype, copy=layer.name in self._clone)
            if bias is not None:
                out = out + bias
        else:  # the model's own product (as in training), then the tracker's
            out = call()
            with torch.no_grad():
                ys = products(layer, x, [w0] if self.role == "reference" else weights)
        if self.role == "reference":
            self._record(layer, x, out, None, ys[-1])
        else:
            self._record(layer, x, out, ys[0], ys[1])
        return out

    def _linear_parallel(self, layer, x, weight, call):
        """F.linear of a tensor-parallel layer: ``weight`` a DTensor on the tensor-parallel
        mesh (FSDP2 has gathered its other dimensions for the forward), its rows split
        (``ColwiseParallel``: x whole, the output's features split) or its columns
        (``RowwiseParallel``: x's features split, the products' partial sums added over the
        ranks). The model computes its own output; the products are the rank's block's,
        with W_0's block of the same rows and columns (never a whole matrix); each tensor's
        sums count once over the ranks that hold it alike."""
        out = call()
        x_local, cx = local_count(x) if is_dtensor(x) else (x, lead(weight))
        h, ch = local_count(out)
        if not self.rcc:
            self._record(layer, x_local, h, counts=(cx, ch, True))
            return out
        mesh, placements = weight.device_mesh, weight.placements
        summed = [i for i, p in enumerate(placements) if sharded(p) and p.dim % weight.dim() == 1]
        cyz = lead(weight, also=summed)
        rows_split = [i for i, p in enumerate(placements) if sharded(p) and p.dim % weight.dim() == 0]
        if rows_split and cyz:  # (the products' features split: a row's norm summed over the ranks first)
            cyz = Split(mesh.get_group(rows_split[0]), mesh.get_local_rank(rows_split[0]) == 0)
        w0 = self._w0_block(layer, weight)
        with torch.no_grad():
            ys = products(layer, x_local, [w0] if self.role == "reference" else [weight.to_local(), w0])
            for i in summed:  # (the rank's columns: partial sums of the row's products)
                for y in ys:
                    torch.distributed.all_reduce(y, group=mesh.get_group(i))
        if self.role == "reference":
            self._record(layer, x_local, h, None, ys[-1], counts=(cx, ch, cyz))
        else:
            self._record(layer, x_local, h, ys[0], ys[1], counts=(cx, ch, cyz))
        return out

    def _w0_block(self, layer, weight):
        """The block of W_0 that matches the block of ``weight`` (a DTensor on the
        tensor-parallel mesh) this rank applies: W_0 kept on a larger mesh (FSDP2 x TP)
        gathered over the other mesh dimensions only."""
        from torch.distributed.tensor import Replicate, distribute_tensor

        w0 = self.reference.weight0(layer)
        if not is_dtensor(w0):  # (a reference model's plain W_0: placed as the weight)
            return distribute_tensor(w0, weight.device_mesh, weight.placements).to_local()
        if w0.device_mesh == weight.device_mesh:
            return w0.to_local()
        names = weight.device_mesh.mesh_dim_names or ()
        w0_names = w0.device_mesh.mesh_dim_names or ()
        if not names or any(n not in w0_names for n in names):
            raise ValueError(f"spkern.Tracker: layer {layer.name!r}: its weight is applied on mesh "
                             f"{weight.device_mesh} and its W_0 kept on {w0.device_mesh}: name the mesh dimensions "
                             f"(init_device_mesh(..., mesh_dim_names=...)) so that W_0's block can be found")
        target = [weight.placements[names.index(n)] if n in names else Replicate() for n in w0_names]
        return local_of(w0.redistribute(w0.device_mesh, target))
