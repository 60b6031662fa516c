"""Which implementation runs an op.

Backends:
  reference  plain PyTorch, computes in float64; the ground truth every kernel is tested against
  cpu        the C++ kernels of spkern._C (CPU tensors)
  triton     the Triton kernels of spkern.kernels (CUDA tensors; CPU tensors through the
             Triton interpreter, which is how they are tested on machines without a GPU)
  cuda       the CUDA kernels of spkern._C (CUDA tensors, when built with CUDA)

Choice, first match wins: ``spkern.use_backend(name)``, the environment variable
``SPKERN_BACKEND``, the default for the tensor's device (CPU: cpu, CUDA: triton).
A backend that cannot run a call (not built, wrong device, unsupported dtype) is
replaced by the next one in the fallback order, with one warning per reason.
"""

import contextlib
import contextvars
import functools
import importlib
import os
import sys
import warnings

import torch

# Without a GPU, Triton kernels can only run in the Triton interpreter, which Triton
# reads when a kernel is defined; torch.compile imports triton early, so it is turned
# on here, when spkern is imported.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = ("reference", "cpu", "triton", "cuda")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_forced = contextvars.ContextVar("spkern_backend", default=None)


@contextlib.contextmanager
def use_backend(name):
    """Run the spkern ops inside the block with backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def requested_backend(device):
    """The backend asked for on ``device`` before availability is checked."""
    name = _forced.get()
    if name is None:
        name = os.environ.get("SPKERN_BACKEND") or None
        if name is not None and name not in BACKENDS:
            raise ValueError(f"SPKERN_BACKEND must be one of {BACKENDS}, got {name!r}")
    if name is None:
        name = "triton" if device.type == "cuda" else "cpu"
    return name


@functools.cache
def compiled():
    """spkern._C, or None when the extension is not built."""
    try:
        from spkern import _C
    except ImportError:
        return None
    return _C


@functools.cache
def triton_kernels(module):
    """spkern.kernels.<module>, or None when Triton is not installed.

    On CPU tensors they run in the Triton interpreter (see the top of this file).
    """
    try:
        return importlib.import_module(f"spkern.kernels.{module}")
    except ImportError:
        return None


def empty_cache():
    """Free the gradient buffer the CPU kernels keep for the next step (as
    torch.cuda.empty_cache does for CUDA memory)."""
    if compiled() is not None:
        compiled().release_cached_buffer()


def _triton_interpreted():
    """Whether Triton's own functions were defined for the interpreter."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def unavailable_reason(name, tensor, module):
    """Why backend ``name`` cannot run ``module``'s op on ``tensor``, or None if it can."""
    if name == "reference":
        return None
    if tensor.dtype not in KERNEL_DTYPES:
        return f"dtype {tensor.dtype} (kernels take float32, bfloat16, float16)"
    if name == "cpu":
        if tensor.device.type != "cpu":
            return f"device {tensor.device}"
        if compiled() is None:
            return "spkern._C is not built (pip install --no-build-isolation -e .)"
        return None
    if name == "triton":
        if tensor.device.type not in ("cuda", "cpu"):
            return f"device {tensor.device}"
        if triton_kernels(module) is None:
            return "triton is not installed"
        if tensor.device.type == "cpu" and not _triton_interpreted():
            return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
                    "before triton is imported")
        return None
    if name == "cuda":
        if tensor.device.type != "cuda":
            return f"device {tensor.device}"
        if compiled() is None or not compiled().with_cuda:
            return "spkern._C is built without CUDA"
        return None
    raise ValueError(f"unknown backend {name!r}")


# After the requested backend, in this order, by device type.
_FALLBACK = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


@functools.cache
def _warn_once(op, name, reason, chosen):
    warnings.warn(f"spkern.{op}: backend {name!r} cannot run here ({reason}); using {chosen!r}",
                  RuntimeWarning, stacklevel=4)


def resolve(op, tensor, module):
    """The backend that runs ``op`` (whose kernels live in ``module``) on ``tensor``."""
    name = requested_backend(tensor.device)
    first_reason = None
    for candidate in (name,) + _FALLBACK.get(tensor.device.type, ("reference",)):
        reason = unavailable_reason(candidate, tensor, module)
        if reason is None:
            if candidate != name:
                _warn_once(op, name, first_reason, candidate)
            return candidate
        first_reason = first_reason or reason
    raise AssertionError("the reference backend is always available")
