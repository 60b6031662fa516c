"""The sweeps' options: their defaults (the demo's among them) and the options generated
from the run configs' fields, for the ``spkern`` command and a trainer's own command line."""

import argparse
import math
from dataclasses import fields

# The main job (spkern demo, ./run.sh demo): the MLP sweep's options that differ from their defaults
DEMO = dict(widths="64,128,256,512,1024,2048", lrs="1e-4:10:31", loss="ce,mse", optim="sgd", param="sp", seeds="1",
            epochs=10, depth=2, data="digits", grid="adaptive", grid_below=2)


# the GPT sweep's grid; its run options are GPTRunConfig's defaults
GPT_DEFAULTS = dict(widths="64,128,256", lrs="3e-4:3e-2:5", loss="ce,mse", optim="adam", param="sp", seeds="1")


def number(low=None, *, above=None):
    """An argparse type: a finite float, >= low / > above when given."""
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if low is not None and v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
        if above is not None and v <= above:
            raise argparse.ArgumentTypeError(f"must be > {above}, got {text!r}")
        return v
    return parse


# Run options, generated from the run-config dataclasses (their defaults are the
# options' defaults; the swept fields are given as lists: --widths, --lrs, ...).
SWEPT_AS_LISTS = ("width", "lr", "loss", "optim", "param", "seed")
_BOUNDS = {"momentum": dict(low=0), "weight_decay": dict(low=0), "clip": dict(low=0), "min_lr_frac": dict(low=0),
           "diverge_loss": dict(above=0)}
_TRAINING_HELP = dict(  # the options both trainers have
    momentum="SGD momentum", dtype="bfloat16: autocast", track_every="steps between tracker measurements",
    track_first="also measure after each of the first N steps (the logits' first jump: spkern.regime)",
    diverge_loss="a loss above this counts as diverged",
    stop_catastrophic="run a run the regime classifier finds catastrophic to its end (spkern.regime)")
MLP_HELP = dict(_TRAINING_HELP, depth="hidden layers", base_width="width at which every layer trains at lr",
                bias="Linear layers with biases")
GPT_HELP = dict(_TRAINING_HELP, depth="transformer blocks", batch_size="sequences per step (global)",
                grad_accum="micro-batches per step", weight_decay="AdamW, on matrices",
                clip="gradient clipping norm (0: off)", qk_norm="no LayerNorm on queries and keys",
                min_lr_frac="the cosine decay ends at this fraction of lr",
                eval_batches="validation batches of the final score",
                fsdp="shard the model with FSDP2 over the processes of torchrun (in place of DDP)",
                tp="tensor parallelism: split every layer over this many processes of torchrun (heads, MLP, "
                   "vocabulary); with more processes, --fsdp over the rest")


def config_options(p, cls, helps, overrides=None, choices=None, skip=(), swept=SWEPT_AS_LISTS):
    """An option for each field of the run config ``cls`` but ``swept`` (what a sweep varies):
    ``--name`` (``--no-name`` for a flag that is on by default), typed and defaulted by
    the field (or ``overrides``), numbers checked as the config checks them."""
    overrides, choices = overrides or {}, choices or {}
    for f in fields(cls):
        if f.name in swept or f.name in skip:
            continue
        flag, default, h = "--" + f.name.replace("_", "-"), overrides.get(f.name, f.default), helps.get(f.name)
        h = h or f.name.replace("_", " ")  # (the help formatter adds the default)
        if isinstance(f.default, bool):
            if default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=h)
            else:
                p.add_argument(flag, action="store_true", help=h)
        elif isinstance(f.default, int):
            p.add_argument(flag, type=int, default=default, help=h)
        elif isinstance(f.default, float):
            p.add_argument(flag, type=number(**_BOUNDS.get(f.name, {})), default=default, help=h)
        else:
            p.add_argument(flag, default=default, choices=choices.get(f.name), help=h)


def config_from(args, cls, **given):
    """The run config ``cls`` of a sweep's options (its swept fields at their defaults)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in SWEPT_AS_LISTS}
    return cls(**{**values, **given})


def positive_ints(cls):
    """The int fields of ``cls`` that must be >= 1 (all but warmup and the swept ones)."""
    return tuple(f.name for f in fields(cls) if isinstance(f.default, int) and not isinstance(f.default, bool)
                 and f.name not in SWEPT_AS_LISTS + ("warmup", "track_first"))


__all__ = ["DEMO", "GPT_DEFAULTS", "GPT_HELP", "MLP_HELP", "SWEPT_AS_LISTS", "config_from", "config_options", "number",
           "positive_ints"]
