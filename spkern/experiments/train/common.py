"""What both trainers share: their option tables, config checks, the torchrun set-up, and
the last fields of a result (the regime, JSON-safe numbers)."""

import contextlib
import gc
import math
import os

import torch

from spkern.regime import Regime

LOSSES = ("ce", "mse")
DTYPES = ("float32", "bfloat16")


def check_number(cfg, name, *, low=None, above=None):
    """Raises ValueError unless ``cfg.name`` is a finite number (>= low, > above): a
    non-finite value would be stored as null in the results and never match on resume."""
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (low is not None and v < low) or (above is not None and v <= above):
        bound = f" >= {low}" if low is not None else f" > {above}" if above is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {v!r}")


def check_choices(cfg):
    """The loss and dtype of a run config, checked."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {cfg.dtype!r}")


@contextlib.contextmanager
def torchrun(device: str):
    """Under torchrun (WORLD_SIZE > 1): this process's device (``cuda:LOCAL_RANK`` for
    cuda) with the process group initialised (NCCL on GPUs, gloo on CPUs) for the body, and
    destroyed after it; else ``device`` as it is."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield device
        return
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()
        # The gloo group's worker threads still hold finished work (tensors with Python
        # references) until the group object is freed, which here happens only in a garbage
        # collection. Left to the interpreter's final collection, freeing it there needs the
        # GIL from a dying thread and aborts the process (SIGABRT, about one exit in three on
        # a loaded 2-core machine); collecting now frees it while the interpreter is alive.
        gc.collect()


def regime_fields(regime: Regime, stopped: bool, steps: int, total: int) -> dict:
    """A result's regime (:meth:`spkern.Regime.summary`), whether the classifier stopped
    the run, and its scheduled steps that were then not run."""
    return {**regime.summary(), "stopped_early": stopped, "steps_not_run": total - steps if stopped else 0}


def json_safe(obj):
    """``obj`` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


__all__ = ["DTYPES", "LOSSES", "check_choices", "check_number", "json_safe", "regime_fields", "torchrun"]
