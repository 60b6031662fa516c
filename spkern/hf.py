"""Hugging Face transformers: a causal LM's loss through :func:`spkern.linear_cross_entropy`,
and the tracker in the Trainer (:class:`SpkernCallback`).

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[spkern.hf.SpkernCallback()])   # the tracker, measured and logged

    handle = spkern.hf.fused_loss(model, tracker=tracker)   # any *ForCausalLM
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()          # the model's loss and gradients; the logits never existed
    handle.remove()              # the model's own forward again

With labels, in a forward with gradients, the model runs as it is written up to its
output layer (``get_output_embeddings()``), which hands back an empty ``(..., 0)`` tensor
instead of the logits; the loss is then ``spkern.linear_cross_entropy`` of the output
layer's input, weight and bias against the labels shifted as transformers shifts them
(``ignore_index=-100``; ``num_items_in_batch`` as the Trainer passes it; the model's final
logit soft-capping, Gemma's, applied in the fused pass). The per-token logit statistics of
that pass go to ``tracker.record_loss`` when a tracker is given. ``out.logits`` is the empty
tensor. Without labels, or without gradients (evaluation, generation, the tracker's own
passes), the model's own forward runs unchanged. Models that scale their logits otherwise
(``logit_scale``, ``logits_scaling``) are refused rather than given a different loss.
"""

import functools
import inspect
import math
import os
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import spkern
from spkern.monitor.log import Reports

_SCALED = ("logit_scale", "logits_scaling")


class FusedLoss:
    """The handle :func:`fused_loss` returns: ``remove()`` gives the model its own forward."""

    def __init__(self, model, tracker):
        self.model, self.tracker = model, tracker
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if self.head is None or not isinstance(getattr(self.head, "weight", None), torch.Tensor):
            raise ValueError(f"fused_loss needs a causal LM with an output layer (get_output_embeddings()); "
                             f"{type(model).__name__} has none")
        config = getattr(model, "config", None)
        for key in _SCALED:
            value = getattr(config, key, None)
            if value not in (None, 1, 1.0):
                raise ValueError(f"fused_loss: {type(model).__name__} scales its logits ({key}={value}); "
                                 f"spkern.linear_cross_entropy would give another loss")
        self.softcap = getattr(config, "final_logit_softcapping", None) or None
        self.vocab = self.head.weight.shape[0]
        self._own = own = model.forward
        self._signature = inspect.signature(own)

        # the model's own signature (functools.wraps: inspect.signature follows __wrapped__), so
        # that the Trainer's column filter and anything else that reads it sees input_ids, ...
        @functools.wraps(own)
        def forward(*args, **kwargs):
            return self._forward(*args, **kwargs)
        forward.spkern_fused_loss = self
        self._wrapper = forward
        model.forward = forward

    def remove(self):
        if self.model.__dict__.get("forward") is self._wrapper:
            del self.model.forward

    def _keywords(self, args, kwargs):
        """labels, shift_labels and num_items_in_batch, wherever the call put them."""
        if args:  # (positional: bound to the model's signature)
            bound = self._signature.bind_partial(*args, **kwargs)
            if any(k in bound.arguments for k in ("labels", "shift_labels", "num_items_in_batch")):
                kwargs = {**{k: v for k, v in bound.arguments.items() if k not in kwargs}, **kwargs}
                var = next((p.name for p in self._signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
                kwargs.update(kwargs.pop(var, {}) if var else {})
                args = ()
        return args, kwargs

    def _forward(self, *args, **kwargs):
        args, kwargs = self._keywords(args, kwargs)
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if (labels is None and shift_labels is None) or not torch.is_grad_enabled():
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return self._own(*args, **kwargs, **extra)
        got = {}
        hook = self.head.register_forward_pre_hook(lambda m, a: got.__setitem__("h", a[0]))
        self.head.forward = lambda x: x.new_empty(x.shape[:-1] + (0,))  # no logits
        try:
            out = self._own(*args, **kwargs)  # (no labels: the model computes no loss of its own)
        finally:
            hook.remove()
            del self.head.forward
        h = got["h"]
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        shift_labels = shift_labels.to(h.device)
        if shift_labels.shape != h.shape[:-1]:
            raise ValueError(f"fused_loss: labels of shape {tuple(shift_labels.shape)} for hidden states "
                             f"{tuple(h.shape)} (logits_to_keep with labels is not supported)")
        w = self.head.weight
        bias = getattr(self.head, "bias", None)
        if h.dtype != w.dtype:
            h = h.to(w.dtype)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss, stats = spkern.linear_cross_entropy(h, w, shift_labels, bias, reduction=reduction, ignore_index=-100,
                                                  softcap=self.softcap, return_stats=True)
        if num_items_in_batch is not None:
            loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                           else num_items_in_batch)
        if self.tracker is not None:
            valid = shift_labels.reshape(-1) != -100
            self.tracker.record_loss(loss, _rows(stats, valid))
        if isinstance(out, tuple):
            return (loss,) + out
        out.loss = loss
        return out


def _rows(stats, valid):
    """The statistics of the tokens that have a label (the padded last position and the
    ignored ones left out)."""
    keys = ("logit_norm", "logit_max", "max_prob", "entropy", "correct")
    return SimpleNamespace(**{k: getattr(stats, k).reshape(-1)[valid] for k in keys if getattr(stats, k, None) is not None})


def fused_loss(model, tracker=None) -> FusedLoss:
    """Makes a transformers causal LM compute its training loss with
    :func:`spkern.linear_cross_entropy` (see the module docstring); the statistics of each
    batch go to ``tracker`` (a :class:`spkern.Tracker`) when given. Returns a handle whose
    ``remove()`` undoes it."""
    if getattr(model.__dict__.get("forward"), "spkern_fused_loss", None) is not None:
        raise ValueError("fused_loss: this model already computes its loss with spkern")
    return FusedLoss(model, tracker)


try:
    from transformers import TrainerCallback as _Callback
except ImportError:  # (transformers is optional: the callback then refuses to be made)
    _Callback = object

STATE_FILE = "spkern_tracker.pt"
_PRINTERS = ("ProgressCallback", "PrinterCallback", "NotebookProgressCallback")


def _find_trainer():
    """The Trainer whose callback is running (the caller's ``self``, a few frames up)."""
    import inspect as _inspect

    from transformers import Trainer

    frame = _inspect.currentframe()
    for _ in range(12):
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            return owner
    return None


class SpkernCallback(_Callback):
    """A :class:`spkern.Tracker` in a transformers ``Trainer``.

    It makes the tracker when training begins (once the Trainer has made its optimizer;
    ``tracker_kwargs`` go to :class:`spkern.Tracker`: ``probe=``, ``modules=``, ...), which
    then measures after every ``every``-th optimizer step (default: the Trainer's
    ``logging_steps``; with gradient accumulation, after the step, the first micro-batch's
    forward with ``probe="batch"``), and reports each measurement through the Trainer's own
    logging (``Trainer.log``): ``trainer.state.log_history`` and every ``report_to``
    integration get it, under ``spkern/{metric}/{layer}`` (grouped by metric; no key of
    the Trainer's). With ``fused_loss=True`` the model's loss is
    :func:`fused_loss`'s, its logit statistics recorded (``spkern/train/...``).

    It saves the tracker's state in every checkpoint (``spkern_tracker.pt``, one per rank
    under ``torch.distributed``) and, when the Trainer resumes from one
    (``train(resume_from_checkpoint=...)``), loads it: the tracker continues its steps and
    metrics. Under torch.distributed every rank measures its share and the values are
    one process's (:meth:`spkern.Tracker.metrics` adds the sums over the ranks).
    ``stop``: a function of a measurement's metrics that returns True to stop training
    (``control.should_training_stop``), for a run gone unstable: a :class:`spkern.Regime`
    stops a catastrophic run and its label is logged as ``spkern/regime`` (0 stable,
    1 controlled divergence, 2 catastrophic; saved in the checkpoints with the tracker). ``quiet`` (default): the
    measurements are not printed on the console (a few hundred values each).

    The Trainer is found when training begins (the callback is called from it); pass
    ``trainer=`` where it is not (a Trainer subclass that calls its callbacks elsewhere)."""

    def __init__(self, trainer=None, *, every=None, prefix="spkern/", fused_loss=False, stop=None, quiet=True,
                 **tracker_kwargs):
        if _Callback is object:
            raise ImportError("spkern.hf.SpkernCallback needs transformers: pip install transformers")
        self.reports = Reports(every, prefix, stop)
        self.trainer, self.fused, self.quiet = trainer, fused_loss, quiet
        self.tracker_kwargs = tracker_kwargs
        self.tracker = None
        self._loss = None

    @property
    def stop(self):
        return self.reports.stop

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.tracker is not None:
            return
        self.trainer = self.trainer or _find_trainer()
        if self.trainer is None:
            raise RuntimeError("spkern.hf.SpkernCallback could not find its Trainer: pass it, "
                               "SpkernCallback(trainer=trainer)")
        if self.reports.every is not None:
            every = self.reports.every
        elif args.logging_steps >= 1:
            every = int(args.logging_steps)
        else:  # (a fraction of the run, as the Trainer reads it)
            every = max(1, math.ceil(args.logging_steps * state.max_steps))
        self.tracker = spkern.Tracker(model, optimizer, every=every, **self.tracker_kwargs)
        if self.fused:
            self._loss = fused_loss(self.tracker.model, tracker=self.tracker)
        if state.global_step > 0:
            self._resume(args, state)
        self.reports.start(self.tracker)

    def _state_file(self, folder):
        from spkern.distributed import rank_and_world

        rank, world = rank_and_world()
        name = STATE_FILE if world == 1 else STATE_FILE.replace(".pt", f"_rank{rank}.pt")
        return os.path.join(folder, name)

    def _resume(self, args, state):
        """Loads the tracker saved in the checkpoint training resumes from."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        candidates = [getattr(args, "resume_from_checkpoint", None),
                      os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
        for folder in candidates:
            if isinstance(folder, str) and os.path.isfile(self._state_file(folder)):
                saved = torch.load(self._state_file(folder), weights_only=True)
                self.tracker.load_state_dict(saved)
                self.reports.load_state_dict(saved)
                return
        warnings.warn(f"spkern.hf.SpkernCallback: training resumes at step {state.global_step} but no checkpoint "
                      f"holds the tracker's state ({STATE_FILE}): it starts anew, W_0 the weights now",
                      RuntimeWarning, stacklevel=2)

    def on_step_end(self, args, state, control, **kwargs):
        new = self.reports.new(self.tracker)  # (a collective under torch.distributed: every rank is here)
        if new is None:
            return control
        _, logs, stop = new
        self._log(logs, control)
        if stop:
            control.should_training_stop = True
        return control

    def _log(self, logs, control):
        """``Trainer.log`` of a measurement: into the log history and every integration, not
        printed (the console's progress callbacks left out: a few hundred values), and the
        Trainer's own logging of this step left as it was (its on_log clears should_log)."""
        handler = self.trainer.callback_handler
        kept, should_log = handler.callbacks, control.should_log
        handler.callbacks = [cb for cb in kept if not (self.quiet and type(cb).__name__ in _PRINTERS)]
        try:
            self.trainer.log(logs)
        finally:
            handler.callbacks = kept
            control.should_log = self.trainer.control.should_log = should_log

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if self.tracker is None:
            return control
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            torch.save({**self.tracker.state_dict(), **self.reports.state_dict()}, self._state_file(folder))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._loss is not None:
            self._loss.remove()
            self._loss = None
        if self.tracker is not None:
            self.tracker.close()
        return control


__all__ = ["FusedLoss", "SpkernCallback", "fused_loss"]
