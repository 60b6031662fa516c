"""Cross-entropy benchmark: forward+backward time and peak memory of spkern against
PyTorch eager and torch.compile of F.cross_entropy, all measured in the same run.

    python bench/bench_cross_entropy.py                 # (4096, 32768) and (8192, 50257), float32
    python bench/bench_cross_entropy.py --quick         # one small shape, fewer repeats
    python bench/bench_cross_entropy.py --device cuda   # on a GPU: adds the Triton and CUDA backends

Each (implementation, shape) runs in a fresh subprocess, so that one allocator's cache
does not help or hurt the next and the peak memory is that implementation's own:
on CPU the peak resident size of the process above its size once the inputs exist
(torch keeps allocator statistics only for CUDA; the peak is reset once the inputs exist), on CUDA torch.cuda.max_memory_allocated.
Time: warm-up, then the median (and min, max) of repeated forward+backward steps, each
starting from x.grad = None as in a training step; CUDA events on GPU. Results go to
stdout as a table and to runs/bench/ (or --out) as JSON with the machine, versions and
commit; the figures quoted in README.md are in bench/results/.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (backend for spkern or None, return_stats)
IMPLS = {
    "torch eager": (None, False),
    "torch.compile": (None, False),
    "spkern": ("default", False),
    "spkern +stats": ("default", True),
}
CUDA_IMPLS = {
    "spkern triton +stats": ("triton", True),
    "spkern cuda +stats": ("cuda", True),
}


def _status_bytes(field):
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kb) * 1024


def _reset_peak_rss():
    """Sets the process's peak resident size (VmHWM) to its current size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_one(impl, rows, vocab, dtype_name, device, repeats, warmup):
    """Runs in the subprocess: time and peak memory of one implementation on one shape."""
    import torch
    import torch.nn.functional as F

    import spkern

    dtype = getattr(torch, dtype_name)
    backend, stats = {**IMPLS, **CUDA_IMPLS}[impl]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, vocab, device=device, dtype=dtype, generator=g).requires_grad_()
    target = torch.randint(0, vocab, (rows,), device=device, generator=g)

    if backend is None:
        fn = F.cross_entropy if impl == "torch eager" else torch.compile(F.cross_entropy)

        def step():
            fn(x, target).backward()
    else:
        def step():
            with spkern.use_backend(backend) if backend != "default" else contextlib.nullcontext():
                out = spkern.cross_entropy(x, target, return_stats=stats)
            (out[0] if stats else out).backward()

    cuda = device == "cuda"
    # Warm-up first (lazy imports, compilation, kernel caches), then give back what the
    # warm-up kept, so that the peak below is the memory of steady training steps.
    for _ in range(warmup):
        x.grad = None
        step()
    x.grad = None
    spkern.empty_cache()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_bytes("VmRSS")
    times = []
    for i in range(repeats):
        x.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            step()
            elapsed = time.perf_counter() - t0
        times.append(elapsed)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_bytes("VmHWM") - base
    times.sort()
    return dict(median_ms=times[len(times) // 2] * 1e3, min_ms=times[0] * 1e3,
                max_ms=times[-1] * 1e3, peak_extra_mb=max(peak, 0) / 2**20)


def copy_bandwidth(device):
    """Measured copy bandwidth (read + write bytes per second) of a 512 MB buffer."""
    import torch

    a = torch.empty(2**27, device=device)
    a.uniform_()
    b = torch.empty_like(a)
    times = []
    for _ in range(7):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * a.numel() * a.element_size() / times[len(times) // 2]


def machine_info(device):
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__,
                threads=torch.get_num_threads(), machine=platform.machine())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["cpu_cores"] = os.cpu_count()
    from spkern import _backend

    ext = _backend.compiled()
    info["spkern_cpu_isa"] = ext.compiled_isa() if ext else None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--", "spkern", "csrc", "kernels"],
                                        cwd=ROOT, text=True).strip()
        info["commit"] += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape, 3 repeats")
    parser.add_argument("--shapes", default=None, help="rows x vocab list, e.g. 4096x32768,8192x50257")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--impls", default=None, help="comma-separated subset of: " + ", ".join(
        list(IMPLS) + list(CUDA_IMPLS)))
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench"),
                        help="folder for the JSON results ('' to skip); the committed ones are "
                        "in bench/results")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._one:  # subprocess mode
        impl, rows, vocab, dtype, device, repeats, warmup = json.loads(args._one)
        print(json.dumps(run_one(impl, rows, vocab, dtype, device, repeats, warmup)))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    shapes = args.shapes or ("1024x32768" if args.quick else "4096x32768,8192x50257")
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in shapes.split(",")]
        assert all(len(s) == 2 and s[0] > 0 and s[1] > 0 for s in shapes)
    except (ValueError, AssertionError):
        parser.error(f"--shapes must look like 4096x32768,8192x50257, got {args.shapes!r}")
    repeats = args.repeats or (3 if args.quick else 7)
    impls = list(IMPLS) + (list(CUDA_IMPLS) if args.device == "cuda" else [])
    if args.impls:
        unknown = set(args.impls.split(",")) - set(impls)
        if unknown:
            parser.error(f"--impls: unknown {sorted(unknown)}; choose from {impls}")
        impls = [i for i in impls if i in args.impls.split(",")]

    info = machine_info(args.device)
    bandwidth = copy_bandwidth(args.device)
    print(f"# cross-entropy forward+backward, {args.dtype}, {args.device}: {info.get('gpu') or info['cpu']}, "
          f"{info['threads']} threads, torch {info['torch']}, commit {info['commit']}, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows_out = []
    header = "| rows x vocab | implementation | median ms | min-max ms | vs eager | peak extra MB | GB/s | of copy bw |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for rows, vocab in shapes:
        eager_ms = None
        for impl in impls:
            spec = json.dumps([impl, rows, vocab, args.dtype, args.device, repeats, 2])
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_one", spec],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"| {rows}x{vocab} | {impl} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if impl == "torch eager":
                eager_ms = r["median_ms"]
            # the least traffic a fused step can have: read the logits, write their gradient
            nbytes = 2 * rows * vocab * torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
            gbs = nbytes / (r["median_ms"] / 1e3) / 1e9
            r.update(rows=rows, vocab=vocab, impl=impl, dtype=args.dtype, device=args.device,
                     speedup_vs_eager=(eager_ms / r["median_ms"]) if eager_ms else None,
                     gb_per_s=gbs, fraction_of_copy_bandwidth=gbs * 1e9 / bandwidth)
            rows_out.append(r)
            speed = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-"
            print(f"| {rows}x{vocab} | {impl} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | "
                  f"{speed} | {r['peak_extra_mb']:.0f} | {gbs:.1f} | {r['fraction_of_copy_bandwidth']:.0%} |",
                  flush=True)
    for rows, vocab in shapes:
        plain = [r for r in rows_out if (r["rows"], r["vocab"], r["impl"]) == (rows, vocab, "spkern")]
        stats = [r for r in rows_out if (r["rows"], r["vocab"], r["impl"]) == (rows, vocab, "spkern +stats")]
        if plain and stats:
            print(f"# {rows}x{vocab}: statistics cost {stats[0]['median_ms'] / plain[0]['median_ms'] - 1:+.1%} "
                  f"over the plain loss")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc)
        name = f"cross_entropy_{args.device}_{stamp:%Y-%m-%d}{'_quick' if args.quick else ''}.json"
        path = os.path.join(args.out, name)
        with open(path, "w") as f:
            json.dump(dict(date=stamp.isoformat(timespec="seconds"), copy_bandwidth_gb_s=bandwidth / 1e9,
                           repeats=repeats, command=" ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
                           **info, results=rows_out), f, indent=1)
        print(f"# wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
