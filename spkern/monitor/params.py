"""Parameter statistics: the one protocol the tracker reads them through, and the
adapter that gives any other torch optimizer that protocol.

:class:`StepStats` is what an optimizer offers the tracker: the parameters it steps,
the statistics of its last step, and a way to take the tracker's copies of W_0 so that
it measures the drift inside its step. :mod:`spkern.optim` implements it (the statistics
come fused into the step); :class:`TorchStepStats` provides it for any other optimizer
by copying the parameters before a step that will be measured and comparing after it.
The tracker never looks at the optimizer's type nor writes its attributes.
"""

from typing import Callable, Optional, Protocol, runtime_checkable

from spkern.constants import Sum
from spkern.monitor.values import Table, _Ratio, rms
from spkern.norms import multi_tensor_norms

# what a step's statistics hold per parameter (device scalars); drift_rms only when the
# optimizer measures it at every step
STEP_KEYS = ("update_rms", "weight_rms", "grad_rms", "relative_update")


@runtime_checkable
class StepStats(Protocol):
    def stepped_parameters(self) -> Optional[list]:
        """The parameters the optimizer steps (None: not known; the tracker then measures
        every parameter of the tracked modules)."""

    def last_step_stats(self) -> dict:
        """{parameter: {key of STEP_KEYS (and drift_rms): device scalar}} of the last step."""

    def offer_initial_weights(self, weights: dict) -> None:
        """The tracker's W_0 copies ({parameter: tensor}), to measure the drift against
        inside the step; the optimizer may take them or not (its last_step_stats say)."""


class TorchStepStats:
    """:class:`StepStats` of any torch optimizer: before a step that will be measured (a
    step pre-hook; ``measuring()`` says) it copies ``params()``, and after the step it
    compares them with :func:`spkern.multi_tensor_norms`, with the gradient norms."""

    def __init__(self, optimizer, params: Callable[[], list], measuring: Callable[[], bool]):
        self._params, self._measuring = params, measuring
        self._before = None
        self.hook = optimizer.register_step_pre_hook(self._pre_step)

    def _pre_step(self, optimizer, args, kwargs):
        if self._measuring():
            params = list(self._params())
            self._before = (params, [p.detach().clone() for p in params])

    def stepped_parameters(self):
        return None

    def offer_initial_weights(self, weights):
        return None

    def last_step_stats(self):
        if self._before is None:
            return {}
        params, before = self._before
        self._before = None
        out = {p: {} for p in params}
        moved = multi_tensor_norms(params, before)  # ||W_{t+1} - W_t||^2, ||W_{t+1}||^2
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]  # (a frozen one has none)
        gsq = multi_tensor_norms([params[i].grad for i in with_grad])[:, Sum.A_SQ] if with_grad else None
        for i, p in enumerate(params):
            n = max(p.numel(), 1) ** 0.5
            out[p]["update_rms"] = moved[i, Sum.DIFF_SQ].clamp_min(0).sqrt() / n
            out[p]["relative_update"] = (moved[i, Sum.DIFF_SQ] / moved[i, Sum.A_SQ]).clamp_min(0).sqrt()
        for j, i in enumerate(with_grad):
            out[params[i]]["grad_rms"] = gsq[j].clamp_min(0).sqrt() / max(params[i].numel(), 1) ** 0.5
        return out


def step_stats_of(optimizer, params, measuring) -> StepStats:
    """The optimizer itself when it implements :class:`StepStats` (spkern.optim), else a
    :class:`TorchStepStats` adapter."""
    if isinstance(optimizer, StepStats):
        return optimizer
    return TorchStepStats(optimizer, params, measuring)


def param_values(params, source, w0, after_step: bool) -> dict:
    """{name: value} of the parameter statistics of a measurement: the step's, from the
    optimizer (its own sums, or an adapter's), then what they lack (drift and weight
    against ``w0`` {name: W_0}, gradients) measured here, in one call each.
    ``after_step``: the measurement follows an optimizer step, so that a parameter the
    optimizer has but did not step (no gradient: frozen) moved by exactly 0 (its
    ``grad_rms`` is absent)."""
    v = {}
    sums = getattr(source, "last_step_sums", None)
    sums = sums() if sums is not None else None
    if sums is not None:  # the step's sums, as a table: the roots taken at metrics()
        stepped, table, drift = sums
        t, at = Table(lambda: table), {id(p): 4 * i for i, p in enumerate(stepped)}
        for n, p in params:
            i = at.get(id(p))
            if i is None:
                continue
            count = max(p.numel(), 1)
            v[f"{n}/update_rms"] = _Ratio(t[i], count, True)
            v[f"{n}/weight_rms"] = _Ratio(t[i + 1], count, True)
            v[f"{n}/grad_rms"] = _Ratio(t[i + 2], count, True)
            v[f"{n}/relative_update"] = _Ratio(t[i], t[i + 1], True, strict=True)
            if drift:
                v[f"{n}/drift_rms"] = _Ratio(t[i + 3], count, True)
    else:
        stats = source.last_step_stats() if source is not None else {}
        for n, p in params:
            for k, value in stats.get(p, {}).items():
                if k in STEP_KEYS or k == "drift_rms":
                    v[f"{n}/{k}"] = _Ratio(value, 1.0)
    if after_step and source is not None:
        for n, p in params:
            if f"{n}/update_rms" not in v:  # not stepped: it did not move
                v[f"{n}/update_rms"] = _Ratio(0.0, 1.0)
                v[f"{n}/relative_update"] = _Ratio(0.0, 1.0)
    lacking = [(n, p) for n, p in params if f"{n}/drift_rms" not in v or f"{n}/weight_rms" not in v]
    if lacking:
        drift = multi_tensor_norms([p for _, p in lacking], [w0[n] for n, _ in lacking])
        for i, (n, p) in enumerate(lacking):
            v.setdefault(f"{n}/drift_rms", rms(drift[i, Sum.DIFF_SQ], max(p.numel(), 1)))
            v.setdefault(f"{n}/weight_rms", rms(drift[i, Sum.A_SQ], max(p.numel(), 1)))
    lacking = [(n, p) for n, p in params if f"{n}/grad_rms" not in v and p.grad is not None]
    if lacking:
        gsq = multi_tensor_norms([p.grad for _, p in lacking])[:, Sum.A_SQ]
        for i, (n, p) in enumerate(lacking):
            v[f"{n}/grad_rms"] = rms(gsq[i], max(p.numel(), 1))
    return v
