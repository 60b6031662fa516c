"""Which copy of spkern's C++ CPU kernels runs.

The extension carries every CPU kernel compiled once per instruction set (on x86-64:
``default``, portable; ``avx2``, AVX2 + FMA + F16C; ``avx512``, AVX-512 F/BW/VL/DQ), as PyTorch
carries its own. At load it runs the widest copy the CPU supports (asked of the CPU itself,
CPUID, by ``csrc/cpu_dispatch.cpp``), so one build, a wheel or a virtual environment moved
between machines, runs anywhere. A narrower copy can be forced, at start-up with the
environment variable ``SPKERN_CPU_ISA=default|avx2|avx512`` or at any time with
:func:`use`; a copy that is not built in, or one this CPU cannot run, is a ``ValueError``
naming what is missing, never an illegal instruction.

>>> spkern.cpu_isa.current()
'avx2'
>>> with spkern.cpu_isa.use("default"):   # the portable kernels, e.g. to compare
...     loss = spkern.cross_entropy(logits, target)
"""

import os
from typing import Optional

ENV = "SPKERN_CPU_ISA"

_forced_by: Optional[str] = None  # how the copy in use was chosen when not by the CPU


def _extension():
    from spkern import registry

    C = registry.compiled()
    if C is None:
        raise RuntimeError(registry.compiled_reason())
    return C


def variants() -> list:
    """The copies built in, narrowest first: dicts of ``isa``, ``needs`` (the CPU features its
    code uses) and ``missing`` (those this CPU lacks; empty: it runs here). Empty when the
    extension is not built."""
    from spkern import registry

    C = registry.compiled()
    return [] if C is None else C.cpu_variants()


def compiled() -> list:
    """The instruction sets the CPU kernels are built for, narrowest first."""
    return [v["isa"] for v in variants()]


def supported() -> list:
    """Those of :func:`compiled` this CPU runs, narrowest first."""
    return [v["isa"] for v in variants() if not v["missing"]]


def current() -> Optional[str]:
    """The instruction set of the copy in use (None: the extension is not built)."""
    from spkern import registry

    C = registry.compiled()
    return None if C is None else C.cpu_isa()


def reason() -> str:
    """Why :func:`current` runs: the widest copy this CPU runs, or how a narrower one was asked for."""
    if _forced_by is not None:
        return _forced_by
    wider = [f"{v['isa']} (this CPU lacks {', '.join(v['missing'])})" for v in variants() if v["missing"]]
    return "the widest built in that this CPU runs" + (f"; not {', '.join(wider)}" if wider else "")


class use:
    """Runs the CPU kernels built for ``isa`` from now on; as a context manager, until the block
    ends (then the copy before it again). A ``ValueError`` names what this CPU lacks, or the
    copies built in, when ``isa`` cannot run here."""

    def __init__(self, isa: str):
        global _forced_by
        C = _extension()
        self._previous = (C.cpu_isa(), _forced_by)
        if not isinstance(isa, str):
            raise TypeError(f"isa must be a string, one of {compiled()}; got {isa!r}")
        C.set_cpu_isa(isa.lower())
        _forced_by = f"spkern.cpu_isa.use({isa!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _forced_by
        isa, _forced_by = self._previous
        _extension().set_cpu_isa(isa)
        return False


def apply_environment(C) -> None:
    """``SPKERN_CPU_ISA``, read when the extension ``C`` is loaded (spkern.registry.compiled)."""
    global _forced_by
    asked = os.environ.get(ENV, "").strip().lower()
    if not asked:
        return
    try:
        C.set_cpu_isa(asked)
    except ValueError as e:
        runs = [v["isa"] for v in C.cpu_variants() if not v["missing"]]
        raise ValueError(f"{ENV}={asked!r}: {e}; this CPU runs {', '.join(runs)}") from None
    _forced_by = f"{ENV}={asked}"


__all__ = ["ENV", "compiled", "current", "reason", "supported", "use", "variants"]
