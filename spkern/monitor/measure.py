"""One measurement, and the one definition of each quantity the tracker reports.

The refined coordinate check of a layer is defined on the layer's own map f(x; θ): its
output on x with its parameters θ, the biases at zero (a parameter named ``bias`` is a
bias). With θ_t the parameters now, θ_0 the reference's, x_t the layer's input now and
x_0 its input in the reference pass:

    eff  = f(x_t; θ_t) - f(x_t; θ_0)      the effective update
    prop = f(x_t; θ_0) - f(x_0; θ_0)      the propagating update

so that eff + prop = f(x_t; θ_t) - f(x_0; θ_0), the change of the layer's output (its
bias aside). For ``nn.Linear`` this is (W_t - W_0) x_t and W_0 (x_t - x_0); it covers
adapters (θ holds them), parametrized weights (θ holds the originals), attention's
projections and layers of your own. :func:`products` computes f, the same way for
every θ, in float32: equal θ give bitwise equal products, so that a layer that has not
moved shows exactly 0. The probe modes only choose x_t and x_0.

A layer applied several times in a pass (a shared block, a layer called twice) is
measured over all its applications: the k-th application of the measured pass is
compared with the k-th of the reference pass, and every statistic's sums are added over
the applications. :class:`Measurement` holds those sums for one step, computed together
(:class:`spkern.monitor.values.PairSums`), and turns them into the values of
:meth:`spkern.Tracker.metrics` (:meth:`Measurement.values`).
"""

import collections
import dataclasses
from typing import Optional

import torch
from torch import Tensor
from torch.nn.utils.stateless import _reparametrize_module  # (what torch.func.functional_call uses)

from spkern.constants import Sum
from spkern.features import pair_stats, paired_linear
from spkern.monitor.values import PairSums, _Align, _Max, _Ratio


def _float(x):
    return x.float() if x.is_floating_point() else x


def linear_products(x: Tensor, weights) -> list:
    """[x W^T for W in weights] in float32 (x and W cast to float32), each computed alike
    (:func:`spkern.features.paired_linear`: two at a time, one pass over x on GPU)."""
    out = []
    for i in range(0, len(weights), 2):
        pair = weights[i:i + 2]
        out += list(paired_linear(x, *pair)) if len(pair) == 2 else [paired_linear(x, pair[0])]
    return out


def generic_products(layer, call, thetas) -> list:
    """f(x; θ) of a layer known only by its forward: the forward in eval mode (no dropout,
    no running statistics written), without autocast, with θ (parameters, and buffers
    where given) in place of the layer's own and its biases at zero; floating-point
    inputs cast to the parameters' dtype; the output (its first tensor) in float32."""
    from spkern.monitor.capture import first_tensor, own_state

    args, kwargs = call
    module = layer.module
    dtype = next((p.dtype for p in layer.parameters().values() if p.is_floating_point()), None)
    cast = (lambda v: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() and dtype is not None else v)
    args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    out = []
    with own_state(module):
        for theta in thetas:
            params = {n: torch.zeros_like(w) if n.rsplit(".", 1)[-1] == "bias" else w for n, w in theta.items()}
            with _reparametrize_module(module, params):
                h = first_tensor(_forward(module, args, kwargs))
            out.append(h.detach().float())
    return out


def _forward(module, args, kwargs):
    """The module's forward with its forward pre-hooks (old ``spectral_norm`` computes the
    weight in one), but FSDP2's, which would gather and free parameters θ already holds,
    and without forward hooks (the tracker's own among them)."""
    for i, hook in module._forward_pre_hooks.items():
        fn = getattr(hook, "func", hook)
        if (getattr(fn, "__module__", "") or "").startswith("torch.distributed"):
            continue
        if i in module._forward_pre_hooks_with_kwargs:
            got = hook(module, args, kwargs)
            if got is not None:
                args, kwargs = got
        else:
            got = hook(module, args)
            if got is not None:
                args = got if isinstance(got, tuple) else (got,)
    return module.forward(*args, **kwargs)


def products(layer, x: Tensor, weights, call=None) -> list:
    """[f(x; θ) for θ in ``weights``], float32, the one place the refined coordinate
    check's products are made. ``weights``: weight matrices (layers of kind "linear" and
    "map": f = the layer's map applied with that matrix) or θ dicts (kind "generic", which
    also needs the layer's ``call``, ``(args, kwargs)``, x its first argument). θ is the
    layer's state: its parameters and its buffers (W_0 of a parametrized weight is
    computed with the parametrization's state at initialisation)."""
    from spkern.monitor.capture import autocast_on, no_autocast

    if layer.kind == "linear":  # (a weight stored (in, out), Conv1D's: applied as x W)
        weights = [w.t() for w in weights] if layer.transposed else list(weights)
        if not torch.is_grad_enabled() and not autocast_on():  # (a pass of the tracker's own: nothing to switch)
            return linear_products(x.detach(), weights)
    with torch.no_grad(), no_autocast():  # (in a training forward under autocast too: float32)
        if layer.kind == "linear":
            return linear_products(x.detach(), weights)
        if layer.kind == "map":
            xx = _float(x.detach()) if layer.map.float_input else x.detach()
            return [layer.map.apply(layer.module, xx, w.float() if layer.map.float_input else w).float()
                    for w in weights]
        return generic_products(layer, call, weights)


@dataclasses.dataclass
class RefApp:
    """One application of a layer in the reference pass: its input x_0, output h_0 and
    f(x_0; θ_0) (None without the refined coordinate check)."""
    x: Optional[Tensor]
    h: Tensor
    z: Optional[Tensor]


class _Sums:
    """A statistic's sums over a layer's applications: numerators and denominators."""
    __slots__ = ("num", "den")

    def __init__(self):
        self.num, self.den = [], []

    def add(self, num, den, count=True):
        # (a rank whose copy does not count adds zeros: every rank's sums keep one layout)
        self.num.append(num if count else 0.0)
        self.den.append(den if count else 0.0)

    def ratio(self, root=True):
        if len(self.num) == 1:  # (one application: the entries themselves)
            return _Ratio(self.num[0], self.den[0], root)
        return _Ratio(tuple(self.num), tuple(self.den), root)


class Measurement:
    """The sums of one measurement (the step it belongs to: ``step``), added as the
    layers' applications are seen (:meth:`add`); the pair statistics of a pass are computed
    together when it is over (:meth:`flush`)."""

    def __init__(self, step: int, row_l2: bool = False):
        self.step = step
        self.row_l2 = row_l2
        self._pairs = None
        self._sums = {}  # layer name -> {statistic: _Sums}
        self.values = {}  # name -> value of spkern.monitor.values: what is not a sum of applications
        self.applied = {}  # layer name -> applications seen

    def _pair(self, a, b=None):
        """The pair statistics of (a, b), computed with the others of the pass in one call."""
        if self._pairs is None:
            self._pairs = PairSums()
        elif self._pairs.device != a.device:  # (a model across devices: the first device's pairs together)
            return pair_stats(a, b)
        return self._pairs.add(a, b)

    def flush(self):
        """Computes the pair statistics asked for so far (and lets their tensors go)."""
        if self._pairs is not None:
            self._pairs.compute()
            self._pairs = None

    def _rows(self, acc, stat, a, b, count=True):
        """Row-mean L2 norm sums of a - b (row_l2=True); rows whose features are split over
        ranks (``count`` a :class:`spkern.distributed.Split`) summed over them first."""
        _, rows = pair_stats(a, b, per_row=True)
        sq = rows[:, Sum.DIFF_SQ if b is not None else Sum.A_SQ].contiguous()
        if not isinstance(count, bool):
            torch.distributed.all_reduce(sq, group=count.group)
            count = count.lead
        acc[stat].add(sq.sqrt().sum(), rows.shape[0], count)

    def add(self, layer, x: Optional[Tensor], h: Tensor, ref: Optional[RefApp], y=None, z=None,
            counts=(True, True, True)):
        """One application of ``layer``: input ``x`` (None: not an activation), output ``h``,
        its reference application ``ref`` (None: none), and with the refined coordinate
        check y = f(x_t; θ_t), z = f(x_t; θ_0). ``counts``: whether the sums of x, of h and
        of y and z count on this rank (tensor parallelism: a tensor every rank of a group
        holds alike counts on one of them, so that sums added over the ranks count each
        entry once; :func:`spkern.distributed.local_count`)."""
        rx, rh, ryz = counts  # (for the row norms; for the sums a Split counts everywhere)
        cx, ch, cyz = (c if isinstance(c, bool) else True for c in counts)
        n = layer.name
        self.applied[n] = self.applied.get(n, 0) + 1
        acc = self._sums.get(n)
        if acc is None:
            acc = self._sums[n] = collections.defaultdict(_Sums)
        numel = h.numel()
        if ref is not None and ref.h.shape == h.shape:
            s = self._pair(h, ref.h.to(h.dtype))
            acc["change_rms"].add(s[Sum.DIFF_SQ], numel, ch)
        else:
            s = self._pair(h)
        acc["act_rms"].add(s[Sum.A_SQ], numel, ch)
        acc["zero_frac"].add(s[Sum.ZEROS], numel, ch)
        if not layer.rcc:
            return
        rows = self.row_l2 and (layer.map is None or layer.map.per_row)
        if x is not None and x.is_floating_point():
            numel = x.numel()
            x0 = ref.x if ref is not None and ref.x is not None and ref.x.shape == x.shape else None
            sx = self._pair(x, x0.to(x.dtype) if x0 is not None else None)
            acc["input_rms"].add(sx[Sum.A_SQ], numel, cx)
            acc["input_zero_frac"].add(sx[Sum.ZEROS], numel, cx)
            if x0 is not None:
                acc["input_change_rms"].add(sx[Sum.DIFF_SQ], numel, cx)
                acc["prop_align_den"].add(sx[Sum.DIFF_SQ], 1, cx)
            acc["eff_align_den"].add(sx[Sum.A_SQ], 1, cx)
            if rows:
                self._rows(acc, "input_row_l2", x, None, rx)
                if x0 is not None:
                    self._rows(acc, "input_change_row_l2", x, x0.to(x.dtype), rx)
        if y is None:
            return
        numel = z.numel()
        eff = self._pair(y, z)[Sum.DIFF_SQ]
        acc["eff_rms"].add(eff, numel, cyz)
        acc["eff_align_num"].add(eff, 1, cyz)
        if rows:
            self._rows(acc, "eff_row_l2", y, z, ryz)
        if ref is not None and ref.z is not None and ref.z.shape == z.shape:
            prop = self._pair(z, ref.z)[Sum.DIFF_SQ]
            acc["prop_rms"].add(prop, numel, cyz)
            acc["prop_align_num"].add(prop, 1, cyz)
            if rows:
                self._rows(acc, "prop_row_l2", z, ref.z, ryz)

    def align(self, layer, op: Optional[Tensor], op_w0: Optional[Tensor]):
        """The alignments of a layer whose map has them: ||ΔW X|| / (op(ΔW) ||X||) and
        ||W_0 dX|| / (op(W_0) ||dX||) over its applications, ``op`` = op(W_t - W_0)."""
        n = layer.name
        acc = self._sums.get(n, {})

        def total(stat):
            num = acc[stat].num
            return num[0] if len(num) == 1 else tuple(num)
        if op is not None and "eff_align_num" in acc:
            self.values[f"{n}/eff_align"] = _Align(total("eff_align_num"), total("eff_align_den"), op)
        if op_w0 is not None and "prop_align_num" in acc and "prop_align_den" in acc:
            self.values[f"{n}/prop_align"] = _Align(total("prop_align_num"), total("prop_align_den"), op_w0)

    def output(self, key: str, out: Optional[Tensor], ref: Optional[Tensor]):
        """The model's output on the probe, reported under ``key``."""
        if out is None or not out.is_floating_point():
            return
        from spkern.distributed import local_count

        out, count = local_count(out.detach())  # (a tensor-parallel head's logits: each rank's classes)
        ref = local_count(ref)[0] if ref is not None else None
        numel = out.numel() if count else 0.0
        if ref is not None and ref.shape == out.shape:
            s = self._pair(out, ref.to(out.dtype))
            self.values[f"{key}/change_rms"] = _Ratio(s[Sum.DIFF_SQ] if count else 0.0, numel, True)
        else:
            s = self._pair(out)
        self.values[f"{key}/rms"] = _Ratio(s[Sum.A_SQ] if count else 0.0, numel, True)
        self.values[f"{key}/max_abs"] = _Max(out.abs().amax().float())

    _ROOTS = {"act_rms", "change_rms", "input_rms", "input_change_rms", "eff_rms", "prop_rms"}
    _MEANS = {"zero_frac", "input_zero_frac", "input_row_l2", "input_change_row_l2", "eff_row_l2", "prop_row_l2"}

    def layer_values(self) -> dict:
        """{name: value} of the layers' statistics, in the order they were seen."""
        out = {}
        for n, acc in self._sums.items():
            for stat, sums in acc.items():
                if stat in self._ROOTS:
                    out[f"{n}/{stat}"] = sums.ratio(root=True)
                elif stat in self._MEANS:
                    out[f"{n}/{stat}"] = sums.ratio(root=False)
        return out
