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
        grads = [p.grad for p in params]
        gsq = multi_tensor_norms(grads)[:, Sum.A_SQ] if all(g is not None for g in grads) else None
        for i, p in enumerate(params):
            n = max(p.numel(), 1) ** 0.5
            out[p]["update_rms"] = moved[i, Sum.DIFF_SQ].clamp_min(0).sqrt() / n
            out[p]["relative_update"] = (moved[i, Sum.DIFF_SQ] / moved[i, Sum.A_SQ]).clamp_min(0).sqrt()
            if gsq is not None:
                out[p]["grad_rms"] = gsq[i].clamp_min(0).sqrt() / n
        return out


def step_stats_of(optimizer, params, measuring) -> StepStats:
    """The optimizer itself when it implements :class:`StepStats` (spkern.optim), else a
    :class:`TorchStepStats` adapter."""
    if isinstance(optimizer, StepStats):
        return optimizer
    return TorchStepStats(optimizer, params, measuring)
