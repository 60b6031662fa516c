"""The tracker in Lightning (an optional extra: ``pip install lightning``).

    trainer = lightning.Trainer(max_steps=1000, callbacks=[spkern.lightning.SpkernCallback()])
    trainer.fit(module, data)

:class:`SpkernCallback` makes a :class:`spkern.Tracker` when fitting starts (once Lightning
has made the module's optimizer; ``tracker_kwargs`` go to the tracker), which then measures
after every ``every``-th optimizer step (default: the Trainer's ``log_every_n_steps``;
with ``accumulate_grad_batches``, after the step), and writes each measurement to the
module's loggers (``trainer.loggers``), at the optimizer step, under
``spkern/{metric}/{layer}`` (grouped by metric). Its state (the tracker's
:meth:`~spkern.Tracker.state_dict`) is saved in Lightning's checkpoints and restored with
``trainer.fit(..., ckpt_path=...)``: the tracker continues its steps and metrics.
``stop``: a function of a measurement's metrics that returns True to stop training
(``trainer.should_stop``); a :class:`spkern.Regime` stops a catastrophic run, and its label
is logged as ``spkern/regime`` (0 stable, 1 controlled divergence, 2 catastrophic).
"""

import spkern
from spkern.monitor.log import Reports

try:
    import lightning
    _Callback = lightning.Callback
except ImportError:
    lightning = None
    _Callback = object


class SpkernCallback(_Callback):
    """A :class:`spkern.Tracker` in a ``lightning.Trainer`` (see the module docstring)."""

    def __init__(self, *, every=None, prefix="spkern/", stop=None, **tracker_kwargs):
        if lightning is None:
            raise ImportError("spkern.lightning.SpkernCallback needs Lightning: pip install lightning")
        self.reports = Reports(every, prefix, stop)
        self.tracker_kwargs = tracker_kwargs
        self.tracker = None
        self._saved = None  # a checkpoint's state, until the tracker is made

    @property
    def stop(self):
        return self.reports.stop

    def on_fit_start(self, trainer, pl_module):
        if self.tracker is not None:
            return
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"spkern.lightning.SpkernCallback tracks a module with one optimizer, got "
                             f"{len(optimizers)}")
        every = self.reports.every or max(1, int(trainer.log_every_n_steps))
        self.tracker = spkern.Tracker(pl_module, optimizers[0], every=every, **self.tracker_kwargs)
        if self._saved is not None:
            self.tracker.load_state_dict(self._saved)
            self._saved = None
        self.reports.start(self.tracker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        new = self.reports.new(self.tracker)  # (a collective under torch.distributed: every rank is here)
        if new is None:
            return
        step, logs, stop = new
        for logger in trainer.loggers:
            logger.log_metrics(logs, step=step)
        if stop:
            trainer.should_stop = True

    def state_dict(self):
        return {"tracker": self.tracker.state_dict(), **self.reports.state_dict()} if self.tracker is not None else {}

    def load_state_dict(self, state_dict):
        self.reports.load_state_dict(state_dict)
        saved = state_dict.get("tracker")
        if saved is None:
            return
        if self.tracker is not None:
            self.tracker.load_state_dict(saved)
        else:
            self._saved = saved

    def on_fit_end(self, trainer, pl_module):
        if self.tracker is not None:
            self.tracker.close()


__all__ = ["SpkernCallback"]
