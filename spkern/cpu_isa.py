"""The CPU instruction set spkern's C++ kernels were built for, and whether this CPU runs it,
known without importing the extension: an extension built for instructions the CPU lacks
(AVX-512 code moved to an AVX2-only machine: a Docker image, a wheel, a virtual
environment copied between machines) dies at ``import spkern._C`` with SIGILL, no Python
error. ``setup.py`` writes the choice next to this file (``_build_info.json``) when it
builds the extension; :func:`spkern.registry.compiled` reads it first and leaves the
extension unloaded, with a reason the backends report, where this CPU cannot run it.

No torch import here: ``setup.py`` reads :data:`NEEDS` too.
"""

import json
import os
from typing import Optional

# The CPU features each build's compiler flags (setup.py's ISA_FLAGS) let it use.
NEEDS = {
    "default": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"),
}

BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


def built_isa() -> Optional[str]:
    """The instruction set ``spkern._C`` was built for, as setup.py recorded it (None: not
    recorded, an extension built before the record existed)."""
    try:
        with open(BUILD_INFO) as f:
            return json.load(f).get("cpu_isa")
    except (OSError, ValueError):
        return None


def cpu_flags() -> Optional[frozenset]:
    """This CPU's feature flags (``/proc/cpuinfo``), None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def runs_on(flags: frozenset) -> list:
    """The builds of :data:`NEEDS` a CPU with ``flags`` runs, narrowest first."""
    return [name for name, needs in NEEDS.items() if all(f in flags for f in needs)]


def cannot_run(isa: Optional[str], flags: Optional[frozenset] = None) -> Optional[str]:
    """Why this CPU cannot run kernels built for ``isa`` (missing features), or None when
    it can or when that cannot be told (no record, no readable flags: then the extension
    is loaded as before)."""
    if isa is None or isa not in NEEDS:
        return None
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    missing = [f for f in NEEDS[isa] if f not in flags]
    if not missing:
        return None
    return (f"spkern._C was built for {isa}, which this CPU cannot run (it lacks {', '.join(missing)}); it was "
            f"not loaded (it would die with an illegal instruction). Rebuild it here (pip install "
            f"--no-build-isolation -e ., or ./run.sh), or build for what this CPU runs: "
            f"SPKERN_CPU_ISA={runs_on(flags)[-1]}")


def best_here(flags: Optional[frozenset] = None) -> Optional[str]:
    """The widest of :data:`NEEDS` this CPU runs (None: its flags cannot be read)."""
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else runs_on(flags)[-1]


__all__ = ["BUILD_INFO", "NEEDS", "best_here", "built_isa", "cannot_run", "cpu_flags", "runs_on"]
