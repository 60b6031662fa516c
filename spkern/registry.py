"""Which kernel runs an op: one registry for every spkern op.

Backends:
  reference  plain PyTorch (float64 where it is the ground truth of the tests)
  cpu        the C++ kernels of spkern._C (CPU tensors)
  triton     the Triton kernels of spkern.kernels (CUDA tensors; CPU tensors through the
             Triton interpreter, which is how they are tested on machines without a GPU)
  cuda       the CUDA kernels of spkern._C (CUDA tensors, when built with CUDA)

Each backend lives in one file, ``spkern/backends/<name>.py``, which registers the ops it
implements with :func:`register`, each with a check that says why it cannot run a given
call (device, dtype, not built, interpreter missing, layout). Ops are named in :data:`OPS`.

Choice, first match wins: ``spkern.use_backend(name)``, the environment variable
``SPKERN_BACKEND``, the device's default (the first backend of the device's order, below,
that implements the op). A backend asked for that cannot run a call is replaced by the
next one in the device's order that can, with one warning per (op, backend, reason); an op
no backend implements for the call (the optimizer steps of the reference backend) runs
its plain PyTorch path, which is then the reference.
"""

import contextlib
import contextvars
import functools
import importlib
import os
import sys
import warnings
from typing import Callable, NamedTuple, Optional

import torch

# Without a GPU, Triton kernels can only run in the Triton interpreter, which Triton
# reads when a kernel is defined; torch.compile imports triton early, so it is turned
# on here, when spkern is imported.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Every op that resolves a kernel, with what it computes (the contract of each kernel is
# in the docstring of the function that calls it).
OPS = {
    "cross_entropy": "logit losses: per-row loss, statistics and gradient (spkern.cross_entropy)",
    "logit_grad": "the logit losses' gradient from each row's log-sum-exp over all classes (spkern.vocab_parallel)",
    "multi_tensor_norms": "squared norms of many tensors and their differences (spkern.norms)",
    "pair_stats": "activation-pair sums (spkern.features.pair_stats)",
    "multi_pair_stats": "the sums of many activation pairs in one call (spkern.features.multi_pair_stats)",
    "paired_linear": "x W^T and x W0^T in one pass over x (spkern.features.paired_linear)",
    "spectral_norm": "the products x -> (A - B)^T (A - B) x of its power iteration",
    "sgd_step": "spkern.optim.SGD's fused step with its norms",
    "adamw_step": "spkern.optim.AdamW's fused step with its norms",
}

# The order in which backends are tried, by device type, after the one asked for.
# (Triton on CPU tensors is its interpreter: only when asked for.)
ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Kernel(NamedTuple):
    op: str
    backend: str
    fn: Callable
    check: Optional[Callable]  # (tensor, *call) -> reason it cannot run, or None


_KERNELS: dict = {}  # (op, backend) -> Kernel
_forced = contextvars.ContextVar("spkern_backend", default=None)


def register(op: str, backend: str, check: Optional[Callable] = None):
    """Decorator: ``fn`` implements ``op`` on ``backend``. ``check(tensor, *call)`` returns
    why it cannot run a call (a short phrase), or None; ``tensor`` decides the device and
    dtype, ``call`` is what the op passes to :func:`resolve` beyond it."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {tuple(OPS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends: {BACKENDS}")

    def deco(fn):
        _KERNELS[(op, backend)] = Kernel(op, backend, fn, check)
        _order.cache_clear()
        return fn
    return deco


@functools.cache
def _load_backends():
    for name in BACKENDS:
        importlib.import_module(f"spkern.backends.{name}")


def kernels():
    """Every registered kernel, by (op, backend)."""
    _load_backends()
    return dict(_KERNELS)


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


def _asked():
    """The backend asked for (``use_backend``, then ``SPKERN_BACKEND``), or None."""
    name = _forced.get()
    if name is None:
        name = os.environ.get("SPKERN_BACKEND") or None
        if name is not None and name not in BACKENDS:
            raise ValueError(f"SPKERN_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def requested_backend(device):
    """The backend asked for on ``device``, or the device's first backend (cpu on CPU,
    triton on CUDA) when none is."""
    return _asked() or ORDER.get(torch.device(device).type, ("reference",))[0]


def reason(op: str, backend: str, tensor, *call) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on ``tensor`` (and ``call``), or None if it can."""
    _load_backends()
    kernel = _KERNELS.get((op, backend))
    if kernel is None:
        return f"no {op} kernel" + (" (the plain PyTorch path runs instead)" if backend == "reference" else "")
    return kernel.check(tensor, *call) if kernel.check is not None else None


@functools.cache
def _order(op, device_type):
    order = ORDER.get(device_type, ("reference",))
    return tuple(b for b in order if (op, b) in _KERNELS) or order[-1:]


@functools.cache
def _warn_once(op, name, why, chosen):
    warnings.warn(f"spkern.{op}: backend {name!r} cannot run here ({why}); using {chosen}",
                  RuntimeWarning, stacklevel=5)


def resolve(op: str, tensor, *call) -> Optional[Kernel]:
    """The kernel that runs ``op`` on ``tensor`` (its device and dtype) and ``call``; None
    when no backend has one for this call (the op then runs its plain PyTorch path)."""
    _load_backends()
    order = _order(op, tensor.device.type)
    first = _asked() or order[0]
    if first == "reference" and (op, first) not in _KERNELS:
        return None  # the op's plain PyTorch path is its reference
    why = reason(op, first, tensor, *call)
    if why is None:  # the common case: the first choice runs
        return _KERNELS[(op, first)]
    for name in order:
        if name == first:
            continue
        if name == "reference" and (op, name) not in _KERNELS:
            break
        r = reason(op, name, tensor, *call)
        if r is None:
            if name != first:
                _warn_once(op, first, why, repr(name))
            return _KERNELS[(op, name)]
        why = why or r
    if first != "reference":
        _warn_once(op, first, why, "plain PyTorch")
    return None


@functools.cache
def compiled():
    """spkern._C, or None when the extension is not built (or built by an older spkern:
    :func:`compiled_reason` says so). Loading it applies ``SPKERN_CPU_ISA`` (spkern.cpu_isa):
    a copy of the CPU kernels this CPU cannot run is a ValueError here, at every call."""
    try:
        from spkern import _C
    except ImportError:
        return None
    if not hasattr(_C, "cpu_variants"):
        return None
    from spkern import cpu_isa

    cpu_isa.apply_environment(_C)
    return _C


def compiled_reason() -> str:
    """Why :func:`compiled` is None (for the backends' checks)."""
    try:
        from spkern import _C
    except ImportError:
        return "spkern._C is not built (pip install --no-build-isolation -e ., or ./run.sh)"
    return (f"spkern._C ({_C.__file__}) was built by an older spkern: rebuild it (pip install "
            f"--no-build-isolation -e ., or ./run.sh)")


@functools.cache
def triton_kernels(module):
    """spkern.kernels.<module>, or None when Triton is not installed."""
    try:
        return importlib.import_module(f"spkern.kernels.{module}")
    except ImportError:
        return None


def empty_cache():
    """Free the gradient buffer the CPU kernels keep for the next step (as
    torch.cuda.empty_cache does for CUDA memory)."""
    if compiled() is not None:
        compiled().release_cached_buffer()


def triton_interpreted():
    """Whether Triton's own functions were defined for the interpreter."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def dtype_reason(tensor) -> Optional[str]:
    """The kernels take float32, bfloat16 and float16."""
    if tensor.dtype not in KERNEL_DTYPES:
        return f"dtype {tensor.dtype} (kernels take float32, bfloat16, float16)"
    return None


def table(devices=("cpu", "cuda"), dtype=torch.float32):
    """For ``python -m spkern info``: {device: {op: (backend used, {other backend: why
    not, or "also runs"})}} for a tensor of ``dtype`` on each device, as if no backend
    were asked for ("reference" for an op without a reference kernel is its plain
    PyTorch path)."""
    _load_backends()

    class _Probe(NamedTuple):  # a stand-in tensor: checks read only its device and dtype
        device: torch.device
        dtype: torch.dtype

    out = {}
    for device in devices:
        probe = _Probe(torch.device(device), dtype)
        rows = {}
        for op in OPS:
            used, why = None, {}
            order = ORDER.get(device, ("reference",))
            for name in order + tuple(b for b in BACKENDS if b not in order):
                r = reason(op, name, probe)
                if r is None and used is None:
                    used = name
                elif r is not None:
                    why[name] = r
                else:
                    why[name] = "also runs"
            rows[op] = (used or "reference", why)
        out[device] = rows
    return out
