"""``python -m spkern info``: what this machine runs, as ``python -m xformers.info`` does.

Versions of torch and triton, how spkern._C was built (CPU ISA, CUDA or not), and for
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
    C = registry.compiled()
    if C is None:
        rows.append(("spkern._C", registry.compiled_reason()))
    else:
        rows.append(("spkern._C", f"CPU kernels for {C.compiled_isa()}, "
                                  f"{'with' if C.with_cuda else 'without'} CUDA kernels"))
    from spkern import cpu_isa

    flags = cpu_isa.cpu_flags()
    rows.append(("this CPU runs", "unknown (no /proc/cpuinfo)" if flags is None else
                 ", ".join(cpu_isa.runs_on(flags)) + f" (torch's choice: {torch.backends.cpu.get_cpu_capability()})"))
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
    for device, rows in registry.table().items():
        lines += ["", f"ops on {device} tensors (float32), with no backend asked for:"]
        op_w = max(len(op) for op in rows)
        for op, (used, why) in rows.items():
            lines.append(f"  {op:<{op_w}}  {used:<13}" +
                         "; ".join(f"{name}: {r}" for name, r in why.items()))
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(text())
    return 0
