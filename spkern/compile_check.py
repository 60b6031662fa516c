"""``python -m spkern compile-check``: every Triton kernel compiled for real GPUs, no GPU needed.

The Triton interpreter runs a kernel's arithmetic on CPU, not Triton's compiler: a kernel
can interpret fine and fail to compile for a GPU, spill registers to local memory, or ask
for more shared memory than the chip has. This compiles every launch configuration the
launchers in ``kernels/`` can choose (their ``compile_configs()``: dtypes, flags, block
sizes and warps) ahead of time for each architecture with Triton's own compiler and ptxas,
reads registers, spills (local memory) and shared memory of each cubin with the
``cuobjdump`` of the triton wheel, and, where nvcc exists, compiles the CUDA kernels with
``-Xptxas -v``. It prints one table and exits 1 on a compile error, any spill, or shared
memory over the architecture's limit.

    python -m spkern compile-check [--arch sm_80,sm_90] [--quick] [--jobs N]
"""

import argparse
import concurrent.futures
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

# Shared memory a block may use (bytes): A100 164 KB, H100/H200 228 KB, less 1 KB reserved.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MODULES = ("cross_entropy", "features", "norms", "optim")


def _configs(quick):
    import importlib

    for module in MODULES:
        kernels = importlib.import_module(f"spkern.kernels.{module}")
        seen = set()
        for fn, sig, const, warps, label in kernels.compile_configs():
            if quick and fn.__name__ in seen:
                continue
            seen.add(fn.__name__)
            yield module, fn, sig, const, warps, label


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def _usage(cubin, tool):
    """(registers, spill bytes, static shared bytes) of a cubin, from cuobjdump -res-usage."""
    if tool is None:
        return None, None, 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return None, None, 0
    reg, _stack, shared, local = map(int, m.groups())
    return reg, local, shared


def _compile(job):
    """One configuration for one arch, in a worker process: a result row."""
    import triton
    from triton.backends.compiler import GPUTarget

    module, name, sig, const, warps, label, cc = job
    fn = getattr(__import__(f"spkern.kernels.{module}", fromlist=[name]), name)
    start = time.perf_counter()
    row = dict(kernel=f"{module}.{name}", config=label, arch=f"sm_{cc}", warps=warps)
    try:
        k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const),
                           target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
    except Exception as e:  # a compile error is a result, reported in the table
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
        row["seconds"] = time.perf_counter() - start
        return row
    reg, local, static_shared = _usage(k.asm["cubin"], _cuobjdump())
    row.update(registers=reg, spill_bytes=local, shared_bytes=static_shared + int(k.metadata.shared),
               seconds=time.perf_counter() - start)
    return row


def _nvcc(arches):
    """The CUDA kernels with nvcc -Xptxas -v: one row per kernel and arch, or [] without nvcc."""
    from shutil import which

    if which("nvcc") is None:
        return []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for src in sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu"))):
        for cc in arches:
            start = time.perf_counter()
            r = subprocess.run(["nvcc", "-c", src, "-o", os.devnull, "-std=c++17", "-O3", "-Xptxas", "-v",
                                f"-gencode=arch=compute_{cc},code=sm_{cc}"], capture_output=True, text=True)
            secs = time.perf_counter() - start
            base = f"csrc/cuda/{os.path.basename(src)}"
            if r.returncode != 0:
                rows.append(dict(kernel=base, config="nvcc", arch=f"sm_{cc}", error=r.stderr.strip()[-200:],
                                 seconds=secs))
                continue
            # ptxas prints, per kernel: "Compiling entry function '_Z...' for 'sm_90'" then its usage
            for entry, block in re.findall(r"Compiling entry function '([^']+)'.*?\n(.*?)(?=Compiling entry|\Z)",
                                           r.stderr, flags=re.S):
                reg = re.search(r"Used (\d+) registers", block)
                spill = re.search(r"(\d+) bytes spill stores", block)
                smem = re.search(r"(\d+) bytes smem", block)
                rows.append(dict(kernel=base, config=_demangle(entry), arch=f"sm_{cc}", warps=None,
                                 registers=int(reg.group(1)) if reg else None,
                                 spill_bytes=int(spill.group(1)) if spill else 0,
                                 shared_bytes=int(smem.group(1)) if smem else 0, seconds=secs))
    return rows


def _demangle(name):
    """``kernel<template args>`` of a mangled CUDA entry (c++filt where it exists)."""
    try:
        full = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    except OSError:
        return name[:60]
    m = re.search(r"(\w+)(<[^()]*>)?\(", full)
    return (m.group(1) + (m.group(2) or "")) if m else full[:60]


def problems(row):
    """Why a row fails the check ('' when it passes)."""
    if row.get("error"):
        return "compile error"
    if row.get("spill_bytes"):
        return "spills"
    cc = int(row["arch"][3:])
    if row.get("shared_bytes", 0) > SHARED_LIMIT.get(cc, SHARED_LIMIT[80]):
        return "shared memory over the limit"
    return ""


def run(arches, quick=False, jobs=None, progress=True):
    """Compiles everything; returns the rows (see :func:`problems`)."""
    jobs_list = [(module, fn.__name__, sig, const, warps, label, cc)
                 for module, fn, sig, const, warps, label in _configs(quick) for cc in arches]
    rows = []
    workers = jobs or max(1, os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for i, row in enumerate(pool.map(_compile, jobs_list), 1):
            rows.append(row)
            if progress and (sys.stderr.isatty() or i % 50 == 0 or i == len(jobs_list)):
                end = "" if sys.stderr.isatty() else "\n"
                print(f"\r  compiled {i}/{len(jobs_list)}", end=end, file=sys.stderr, flush=True)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    return rows + _nvcc(arches)


def table(rows):
    lines = ["| kernel | configuration | arch | warps | registers | spill bytes | shared bytes | s | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['config']} | {r['arch']} | {r.get('warps') or ''} | "
                     f"{r.get('registers', '')} | {r.get('spill_bytes', '')} | {r.get('shared_bytes', '')} | "
                     f"{r['seconds']:.1f} | {problems(r) or 'ok'}" + (f": {r['error']}" if r.get("error") else "") + " |")
    return "\n".join(lines)


def _child(argv):
    p = argparse.ArgumentParser(prog="spkern compile-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_80,sm_90", help="comma list of sm_XY (default: sm_80,sm_90)")
    p.add_argument("--quick", action="store_true", help="one configuration per kernel")
    p.add_argument("--jobs", type=int, default=None, help="compiles at once (default: the CPU count)")
    args = p.parse_args(argv)
    try:
        arches = [int(a.strip().removeprefix("sm_")) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        p.error(f"--arch: expected sm_80,sm_90 style, got {args.arch!r}")
    start = time.perf_counter()
    rows = run(arches, args.quick, args.jobs)
    print(table(rows))
    bad = [r for r in rows if problems(r)]
    import triton

    print(f"\n{len(rows)} compiled (triton {triton.__version__}) in {time.perf_counter() - start:.0f} s; "
          f"{len(bad)} failing" + ("" if _cuobjdump() else "; no cuobjdump in this triton: registers not read"))
    return 1 if bad else 0


def main(argv=None):
    """Runs the check in a fresh process where Triton compiles for real GPUs (importing
    spkern on a machine without one turns on the interpreter for the CPU tests)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    code = ("import sys, triton; from spkern.compile_check import _child; sys.exit(_child(sys.argv[1:]))")
    with tempfile.TemporaryDirectory(prefix="spkern-compile-check-") as cache:
        env["TRITON_CACHE_DIR"] = cache  # a fresh cache: every kernel compiled, its time measured
        return subprocess.run([sys.executable, "-c", code, *(sys.argv[1:] if argv is None else argv)],
                              env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
