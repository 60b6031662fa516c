"""Hugging Face transformers: a causal LM's loss through :func:`spkern.linear_cross_entropy`.

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
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import spkern

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


__all__ = ["FusedLoss", "fused_loss"]
