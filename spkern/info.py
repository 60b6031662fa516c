"""``python -m spkern info``: what this machine runs, as ``python -m xformers.info`` does.

Versions of torch and triton, how spkern._C was built (the CPU kernels' instruction sets,
CUDA or not), which CPU kernels run and why, and for
every op and device (cpu, cuda) the backend that runs it here when none is asked for, and
why each other backend cannot.
"""

import platform
import sys

import torch

from spkern import registry


def _versions():
    rows = [("python", platform.python_version()), ("torch", torch.__version__)]
    try:
        import triton
        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    try:
        C = registry.compiled()
    except ValueError as e:  # SPKERN_CPU_ISA asks for kernels this CPU cannot run
        C, why = None, str(e)
    else:
        why = None if C is not None else registry.compiled_reason()
    if C is None:
        rows.append(("spkern._C", why))
    else:
        from spkern import cpu_isa

        rows.append(("spkern._C", f"CPU kernels for {', '.join(cpu_isa.compiled())}, "
                                  f"{'with' if C.with_cuda else 'without'} CUDA kernels"))
        rows.append(("CPU kernels in use", f"{cpu_isa.current()}: {cpu_isa.reason()}"))
    rows.append(("torch's CPU kernels", torch.backends.cpu.get_cpu_capability().lower()))
    rows.append(("CUDA device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"))
    interp = "TRITON_INTERPRET=1" if registry.triton_kernels("cross_entropy") is not None and \
        registry.triton_interpreted() else "off"
    rows.append(("Triton interpreter", interp))
    asked = registry._asked()
    rows.append(("backend asked for", asked or "none (use_backend / SPKERN_BACKEND)"))
    return rows


def text() -> str:
    """The report as text."""
    lines = ["spkern " + __import__("spkern").__version__, ""]
    versions = _versions()
    width = max(len(k) for k, _ in versions)
    lines += [f"{k:<{width}}  {v}" for k, v in versions]
    try:
        table = registry.table()
    except ValueError as e:  # (SPKERN_CPU_ISA, above)
        return "\n".join(lines + ["", f"ops: not listed: {e}"]) + "\n"
    for device, rows in table.items():
        lines += ["", f"ops on {device} tensors (float32), with no backend asked for:"]
        op_w = max(len(op) for op in rows)
        for op, (used, why) in rows.items():
            lines.append(f"  {op:<{op_w}}  {used:<13}" +
                         "; ".join(f"{name}: {r}" for name, r in why.items()))
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(text())
    return 0
