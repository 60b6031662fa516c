"""Where the tracker writes: ``metrics.jsonl`` (one JSON object a measurement, the flat
names of :meth:`spkern.Tracker.metrics`, non-finite values as null), TensorBoard scalars
(when tensorboard is installed) and a Weights & Biases run (``wandb=``; an optional
dependency). Under ``torch.distributed`` rank 0 alone writes (every rank computes the
same values).

TensorBoard and W&B group their panels by the part of a tag before its first ``/``:
their tags are grouped by metric (:func:`tag`: ``{layer}/eff_rms`` is written as
``eff_rms/{layer}``), so that one section holds every layer's value of one quantity.
:class:`Reports` is what the Trainer and Lightning callbacks share."""

import json
import math
import os
import warnings

from spkern.distributed import rank_and_world
from spkern.regime import REGIMES, Regime


def tag(key: str, keep=("train", "logits")) -> str:
    """The TensorBoard / W&B tag of a metric: ``{metric}/{layer or parameter}``; the
    keys under ``keep`` (the training loss, the model's output) as they are."""
    where, sep, metric = key.rpartition("/")
    if not sep or where in keep:
        return key
    return f"{metric}/{where}"


class Reports:
    """What the Trainer and Lightning callbacks share: their ``every`` and ``stop`` checked;
    each new measurement of the tracker reported once, as its logs (``{prefix}{tag}``, and
    with a :class:`spkern.Regime` as ``stop`` its label as ``{prefix}regime``: 0 stable,
    1 controlled divergence, 2 catastrophic) and whether to stop; a Regime started on the
    tracker and saved with it."""

    def __init__(self, every, prefix, stop):
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be None or a positive int, got {every!r}")
        if stop is not None and not callable(stop):
            raise TypeError(f"stop must be None or a function of the metrics, got {type(stop).__name__}")
        self.every, self.prefix, self.stop = every, prefix, stop
        self.reported = None  # the step of the measurement reported last

    def start(self, tracker):
        """A Regime's initial values, from the tracker just made (or restored)."""
        if hasattr(self.stop, "start"):
            self.stop.start(tracker)

    def new(self, tracker):
        """``(step, logs, stop)`` of the tracker's latest measurement when it is not reported
        yet, else None (a collective under torch.distributed: every rank calls it)."""
        if tracker is None or tracker.measured_step is None or tracker.measured_step == self.reported:
            return None
        self.reported = tracker.measured_step
        m = tracker.metrics()
        stop = self.stop is not None and bool(self.stop(m))
        logs = {self.prefix + tag(k): v for k, v in m.items() if k != "step"}
        if isinstance(self.stop, Regime):
            logs[self.prefix + "regime"] = REGIMES.index(self.stop.regime)
        return m["step"], logs, stop

    def state_dict(self) -> dict:
        """A Regime's state (``{"regime": ...}``), else nothing."""
        return {"regime": self.stop.state_dict()} if hasattr(self.stop, "state_dict") else {}

    def load_state_dict(self, state: dict):
        if "regime" in state and hasattr(self.stop, "load_state_dict"):
            self.stop.load_state_dict(state["regime"])


def wandb_run(wandb):
    """The Weights & Biases run the tracker logs to: ``True`` for the active run
    (``wandb.init()`` first), or a run object; an ImportError or ValueError saying what
    is missing."""
    if wandb is True:
        try:
            import wandb as wb
        except ImportError:
            raise ImportError("wandb=True needs Weights & Biases: pip install wandb") from None
        if wb.run is None:
            raise ValueError("wandb=True logs to the active Weights & Biases run: call wandb.init() first "
                             "(or pass the run: wandb=run)")
        return wb.run
    if not callable(getattr(wandb, "log", None)):
        raise TypeError(f"wandb must be None, True or a wandb run (with a .log method), got {type(wandb).__name__}")
    return wandb


class MetricsLog:
    """Appends measurements to ``log_dir/metrics.jsonl`` and TensorBoard events there,
    and to a Weights & Biases run (each optional); the files are opened at the first
    write, on rank 0."""

    def __init__(self, log_dir=None, wandb=None, keep=("train", "logits")):
        self.log_dir = log_dir
        self.keep = keep  # (the key prefixes written as they are: the loss, the model's output)
        self.run = wandb_run(wandb) if wandb is not None else None
        self._jsonl = self._writer = None
        self._opened = False

    def _open(self):
        self._opened = True
        if self.log_dir is None:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        self._jsonl = open(os.path.join(self.log_dir, "metrics.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(self.log_dir)
        except ImportError:
            warnings.warn("tensorboard is not installed: the tracker writes metrics.jsonl only",
                          RuntimeWarning, stacklevel=4)

    def write(self, m):
        """Appends one measurement, ``{name: float}`` with its ``step`` (on rank 0)."""
        if rank_and_world()[0] != 0:
            return
        if not self._opened:
            self._open()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                          for k, v in m.items()}) + "\n")
            self._jsonl.flush()
        if self._writer is not None:
            for k, v in m.items():
                if k != "step":
                    self._writer.add_scalar(tag(k, self.keep), v, m["step"])
            self._writer.flush()
        if self.run is not None:
            self.run.log({tag(k, self.keep): v for k, v in m.items() if k != "step"}, step=m["step"])

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
