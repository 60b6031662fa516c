"""The paper's three regimes, labelled online from the tracker's measurements.

Haas et al. (2025, arXiv 2505.22491) split training at large learning rates in standard
parameterization into three regimes, defined by how quantities scale with width:

* **stable**: logits, activations, gradients and the loss stay at their initial scale;
* **controlled divergence**: the logits grow (the softmax saturates) while the loss, the
  gradients and the hidden activations stay stable and every hidden layer keeps learning.
  Under cross-entropy it lies between lr ~ width^-1 and lr ~ width^-1/2 for SGD; under
  MSE it does not exist;
* **catastrophic**: activations, gradients or the loss blow up; training fails.

A single run has one width, so :class:`Regime` labels it by finite-width proxies of these
definitions, each a ratio of a measured quantity to its value at initialisation (every
quantity is O(1) there under SP's He initialisation). The thresholds are the fields of
:class:`Criteria`, in this one place:

========================  =====================================================================
label                     reached at the first measurement where
========================  =====================================================================
catastrophic              the loss, the logits, a hidden activation or a gradient is NaN or
                          infinite; or the loss is above ``loss_limit``; or a hidden layer's
                          activation RMS is above ``act_growth`` times the hidden
                          activations' initial scale (their largest initial RMS); or a
                          gradient RMS is above ``grad_growth`` times its initial value
controlled-divergence     not catastrophic, and the logit RMS is above ``logit_growth`` times
                          its initial value (at least ``logit_floor``) at a measurement
                          within the first ``early_steps`` steps (or at the first
                          measurement, if none is)
stable                    neither (the label of a run until one of the above holds)
========================  =====================================================================

Why the logits are read early: in SP one SGD step moves the logits by about lr * width
(the readout's update times its n inputs), so the learning rate's scale shows in the first
steps: on digits, over the first 20 steps, the logit RMS grows 3x at lr ~ 1 at width 64 and
at lr ~ 0.02 at width 2048, the width^-1 of the theory's edge of stability. Later the
logits of every run that fits its data keep growing under cross-entropy, at any learning
rate (the loss's minimum is at infinite margins), which says nothing about the regime.
The tracker must then measure within ``early_steps`` (``every`` <= 20, or
:meth:`Regime.start` before training; the trainers measure every 10 steps).

A label, once reached, stays (a run that went through controlled divergence keeps that
label, a catastrophic one is over); :attr:`Regime.step` is the step it was reached at,
:attr:`Regime.reached` the step of each label reached, and :attr:`Regime.evidence` says
which quantity crossed which threshold there.

The logits are the model's output on the tracker's probe (``logits/rms``) or, where that is
not tracked (spkern's GPT reports its final hidden state), the RMS of the training batch's
logits that the trainer records from the fused loss's statistics (``train/logit_rms``). A
quantity's initial value is its value in the first measurement that has it: the
measurement at step 0 that :meth:`Regime.start` takes (logits on the probe, activations),
else the first one observed (always so for the loss and the gradients, which a measurement
has from the first step on), or one given to :meth:`Regime.initial`.

In a plain loop::

    regime = spkern.Regime().start(tracker)
    for step, (x, y) in enumerate(loader):
        ...
        if tracker.measured_step == tracker.steps and regime(tracker.metrics()):
            break  # catastrophic: regime.evidence says why

``regime(metrics)`` observes a measurement and returns True once the run is catastrophic, so
a :class:`Regime` is also the ``stop=`` of :class:`spkern.hf.SpkernCallback` and
:class:`spkern.lightning.SpkernCallback` (they call :meth:`Regime.start` with their tracker).
"""

import math
import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

STABLE, CONTROLLED, CATASTROPHIC = "stable", "controlled-divergence", "catastrophic"
REGIMES = (STABLE, CONTROLLED, CATASTROPHIC)
_RANK = {r: i for i, r in enumerate(REGIMES)}
LOGIT_KEYS = ("logits/rms", "train/logit_rms")  # where the logits' RMS is read, in this order


@dataclass(frozen=True)
class Criteria:
    """The thresholds of the regimes (see the module's table): ratios to a quantity's
    initial value, but ``loss_limit`` (a loss), ``early_steps`` (steps) and ``logit_floor``
    (a logit RMS)."""

    logit_growth: float = 3.0  # logit RMS over its initial value within early_steps: the logits left O(1)
    early_steps: int = 20  # the steps in which the logits' growth is read (see the module's docstring)
    logit_floor: float = 1.0  # the logits' initial RMS counts as at least this: O(1) is SP's scale (a He-initialised
    # readout gives about 1); a readout initialised smaller (GPT-2's N(0, 0.02)) would count its first learning
    act_growth: float = 100.0  # hidden activation RMS over the initial scale of the hidden activations (the
    # largest initial RMS among the hidden layers: a layer initialised near zero, a residual branch's output
    # projection, is measured against the others' scale, not its own)
    grad_growth: float = 1000.0  # gradient RMS over its first measured value
    loss_limit: float = 100.0  # training loss (the trainers' diverge_loss). A loss that rises and comes back is
    # no catastrophe: the catapult at the edge of stability (Lewkowycz et al. 2020), on digits 4.5x its first
    # measured value in runs that end at 95-100% accuracy; so the loss counts once past this limit only

    def __post_init__(self):
        for name, value in asdict(self).items():
            low = 0.0 if name == "logit_floor" else 1.0
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > low):
                raise ValueError(f"Criteria.{name} must be a finite number > {low:g}, got {value!r}")
        if not isinstance(self.early_steps, int):
            raise ValueError(f"Criteria.early_steps must be an int, got {self.early_steps!r}")


@dataclass(frozen=True)
class Evidence:
    """One threshold crossed: at ``step``, ``quantity`` was ``value`` (a ratio to its initial
    value where ``ratio``) against ``threshold``; it decided ``regime``."""

    step: int
    regime: str
    quantity: str
    value: float
    threshold: float
    ratio: bool = True

    def __str__(self):
        if math.isnan(self.threshold):  # (a reason found outside the measurements)
            return f"step {self.step}: {self.quantity} -> {self.regime}"
        if not math.isfinite(self.value):
            return f"step {self.step}: {self.quantity} is {self.value} -> {self.regime}"
        what = f"{self.quantity} at {self.value:.3g}x its initial scale" if self.ratio else \
            f"{self.quantity} = {self.value:.3g}"
        return f"step {self.step}: {what} > {self.threshold:g} -> {self.regime}"


class Regime:
    """The online regime label of one run (see the module's docstring).

    Args:
        criteria: the thresholds (:class:`Criteria`).
        hidden: the hidden layers whose activations count: None (every layer with an
            ``act_rms`` but the last tracked one, the readout), a regular expression, or
            a sequence of layer names.
    """

    def __init__(self, criteria: Criteria = Criteria(), *, hidden=None):
        if not isinstance(criteria, Criteria):
            raise TypeError(f"criteria must be a spkern.regime.Criteria, got {type(criteria).__name__}")
        if hidden is not None and not isinstance(hidden, (str, list, tuple)):
            raise TypeError(f"hidden must be None, a regular expression or a list of layer names, got "
                            f"{type(hidden).__name__}")
        self.criteria, self._hidden_spec = criteria, hidden
        self._readout: Optional[str] = None
        self.regime, self.step = STABLE, None
        self.evidence: List[Evidence] = []  # the thresholds crossed where each label was reached
        self.reached: Dict[str, int] = {}  # label -> the step it was reached at
        self.history: List[tuple] = []  # (step, label) of every measurement observed
        self._base: Dict[str, float] = {}  # each watched quantity's initial value

    # -- feeding it ----------------------------------------------------------------------

    def start(self, tracker) -> "Regime":
        """Takes the initial values from ``tracker``: a measurement at step 0 when the
        tracker has not stepped yet and has a fixed probe (else the first measurement
        observed is the reference). Returns self."""
        names = list(getattr(tracker, "names", []))
        self._readout = names[-1] if names else None
        if tracker.steps == 0 and tracker.measured_step is None and tracker.probe is not None:
            tracker.measure()
            self._set_baseline(self._watch(tracker.metrics()))
            self.history.append((0, self.regime))
        return self

    def initial(self, values: dict) -> "Regime":
        """Sets the initial values of quantities that a measurement at step 0 does not have
        (``{"train/logit_rms": ...}``: from the fused loss's statistics of a batch at
        initialisation). Returns self."""
        for k, v in values.items():
            v = float(v)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"Regime.initial: {k} must be a positive finite number, got {v!r}")
            self._base[k] = v
        return self

    def __call__(self, metrics: dict) -> bool:
        """Observes a measurement; True once the run is catastrophic (a stop signal)."""
        self.observe(metrics)
        return self.catastrophic

    def observe(self, metrics: dict) -> str:
        """Observes one measurement (``tracker.metrics()``: its ``step`` and values); returns
        the label. A measurement already observed (the same step) is not counted twice."""
        if not isinstance(metrics, dict) or "step" not in metrics:
            raise TypeError("Regime.observe takes a measurement: the dict of tracker.metrics() (with 'step')")
        step = int(metrics["step"])
        if self.history and self.history[-1][0] >= step:
            return self.regime
        values = self._watch(metrics)
        self._set_baseline(values)
        if self.regime != CATASTROPHIC:
            crossed = self._crossed(step, values)
            for label in (CONTROLLED, CATASTROPHIC):  # (both may be reached at one measurement)
                found = [e for e in crossed if e.regime == label]
                if found and label not in self.reached:
                    self.reached[label] = step
                    self.evidence += found
                    self.regime, self.step = label, step
        self.history.append((step, self.regime))
        return self.regime

    @property
    def catastrophic(self) -> bool:
        return self.regime == CATASTROPHIC

    # -- the criteria --------------------------------------------------------------------

    def _watched(self, key):
        return key in LOGIT_KEYS or key == "train/loss" or key.endswith("/grad_rms") or self._is_hidden(key)

    def _watch(self, metrics) -> Dict[str, float]:
        """The watched quantities of a measurement (and, without a tracker's layer names, the
        readout found on the first: the last layer with an activation)."""
        if self._readout is None:
            self._readout = max((k[:-len("/act_rms")] for k in metrics if k.endswith("/act_rms")), key=_natural,
                                default=None)
        return {k: float(v) for k, v in metrics.items() if k != "step" and v is not None and self._watched(k)}

    def _set_baseline(self, values):
        """Each watched quantity's first finite, positive value is its initial value."""
        for k, v in values.items():
            if k not in self._base and math.isfinite(v) and v > 0:
                self._base[k] = v

    def _is_hidden(self, key):
        if not key.endswith("/act_rms"):
            return False
        layer = key[:-len("/act_rms")]
        spec = self._hidden_spec
        if spec is None:
            return layer != self._readout
        if isinstance(spec, str):
            return re.fullmatch(spec, layer) is not None
        return layer in spec

    def _crossed(self, step, values) -> List[Evidence]:
        c, found = self.criteria, []
        # (the hidden activations' scale: their largest initial RMS, see Criteria)
        hidden_scale = max((b for k, b in self._base.items() if k.endswith("/act_rms")), default=None)
        for k, v in values.items():
            if not math.isfinite(v):
                found.append(Evidence(step, CATASTROPHIC, k, v, math.inf))
                continue
            if k == "train/loss":  # (a loss that rises and comes back is no catastrophe: see Criteria)
                if v > c.loss_limit:
                    found.append(Evidence(step, CATASTROPHIC, k, v, c.loss_limit, ratio=False))
                continue
            if k in LOGIT_KEYS and not self._early(step):
                continue
            limit, regime = ((c.grad_growth, CATASTROPHIC) if k.endswith("/grad_rms") else
                             (c.logit_growth, CONTROLLED) if k in LOGIT_KEYS else (c.act_growth, CATASTROPHIC))
            base = self._base.get(k)
            if k in LOGIT_KEYS and base is not None:
                base = max(base, c.logit_floor)
            if k.endswith("/act_rms") and base is not None:
                base = hidden_scale
            if base is not None and v / base > limit:
                found.append(Evidence(step, regime, k, v / base, limit))
        return found

    def _early(self, step):
        """Whether the logits' growth counts at ``step``: within ``early_steps``, or the first
        measurement after step 0 where none falls within them."""
        return step <= self.criteria.early_steps or not any(0 < s for s, _ in self.history)

    def diverged(self, step: int, why: str = "the training loss diverged"):
        """Marks the run catastrophic at ``step`` for a reason found outside the
        measurements (a trainer's check of every step's loss)."""
        if self.regime != CATASTROPHIC:
            self.regime, self.step = CATASTROPHIC, int(step)
            self.reached[CATASTROPHIC] = int(step)
            self.evidence.append(Evidence(int(step), CATASTROPHIC, why, math.nan, math.nan, ratio=False))

    # -- reading and saving ----------------------------------------------------------------

    def summary(self) -> dict:
        """``{"regime", "regime_step", "regime_reached", "regime_evidence"}``, JSON-ready: the
        label, the step it was reached at (None while the run is stable), the step of every
        label reached, and the thresholds crossed there."""
        return {"regime": self.regime, "regime_step": self.step, "regime_reached": dict(self.reached),
                "regime_evidence": [str(e) for e in self.evidence]}

    def state_dict(self) -> dict:
        return {"regime": self.regime, "step": self.step, "evidence": [asdict(e) for e in self.evidence],
                "reached": dict(self.reached),
                "history": list(self.history), "base": dict(self._base), "readout": self._readout}

    def load_state_dict(self, state: dict):
        self.regime, self.step = state["regime"], state["step"]
        self.evidence = [Evidence(**e) for e in state["evidence"]]
        self.reached = dict(state["reached"])
        self.history = [tuple(h) for h in state["history"]]
        self._base = dict(state["base"])
        self._readout = state["readout"]

    def __repr__(self):
        at = "" if self.step is None else f" since step {self.step}"
        return f"Regime({self.regime}{at})"


def _natural(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def worst(labels: Sequence[str]) -> str:
    """The worst of several runs' labels (catastrophic > controlled-divergence > stable)."""
    return max(labels, key=_RANK.__getitem__)


__all__ = ["CATASTROPHIC", "CONTROLLED", "Criteria", "Evidence", "LOGIT_KEYS", "REGIMES", "Regime", "STABLE", "worst"]
