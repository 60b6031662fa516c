"""What every spkern benchmark shares: timing, peak memory, isolation, the machine record.

Each (implementation, shape) runs in a fresh subprocess (``run_isolated``), so that one
allocator's cache does not help or hurt the next and the peak memory is that
implementation's own. Inside it, ``measure`` warms up (lazy imports, compilation,
kernel caches), gives back what the warm-up kept, then times repeated steps: the median,
min and max, with CUDA events on GPU. Peak memory is the largest amount above what
existed before the timed steps: on CPU the peak resident size of the process (torch
keeps allocator statistics only for CUDA; the peak is reset with /proc/self/clear_refs),
on CUDA torch.cuda.max_memory_allocated.

Inputs rotate: a ``Rotation`` builds enough independent input sets that together they
hold at least twice the last-level cache (the CPU's, read from sysfs; the GPU's L2), and
each timed call takes the next one, so that a call finds its inputs in memory, not in the
cache its predecessor filled, as a training step does. The number of sets is capped by a
memory budget; a row whose sets could not reach twice the cache says so (``cold`` false).
"""

import argparse
import datetime
import glob
import json
import math
import os
import platform
import subprocess
import sys
import time

import peers  # (bench/ is on the path of every script that imports harness)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("runs", "bench")  # under the current directory, as `spkern demo` and `sweep` write


def _status_bytes(field):
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kb) * 1024


def _reset_peak_rss():
    """Sets the process's peak resident size (VmHWM) to its current size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cache_bytes(device):
    """The last-level cache in bytes: the CPU's (sysfs, 0 where it does not say) or the
    current GPU's L2."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
            best = max(best, int(text[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[text[-1]])
        except (OSError, ValueError, KeyError):
            continue
    return best


def _rotation_budget(device):
    """Bytes the rotated copies may take: a quarter of the free memory, at most 8 GiB."""
    if device == "cuda":
        import torch

        free = torch.cuda.mem_get_info()[0]
    else:
        try:
            free = _meminfo_bytes("MemAvailable")
        except (OSError, StopIteration, ValueError):
            free = 4 * 2**30
    return min(free // 4, 8 * 2**30)


def _meminfo_bytes(field):
    with open("/proc/meminfo") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":"))) * 1024


class Rotation:
    """Independent input sets for ``measure`` to cycle through.

    ``make(i)`` builds set ``i`` ready to use (an optimizer's state already created, say);
    ``set_bytes`` is what one call reads and writes of it. The count is the smallest that
    holds twice ``cache`` (default: this device's last-level cache), within ``budget``
    bytes (default: a quarter of the free memory, at most 8 GiB) and ``max_sets``.
    """

    def __init__(self, make, set_bytes, device, *, cache=None, budget=None, max_sets=1024):
        if set_bytes <= 0:
            raise ValueError(f"set_bytes must be positive, got {set_bytes}")
        self.cache = cache_bytes(device) if cache is None else cache
        budget = _rotation_budget(device) if budget is None else budget
        wanted = max(1, math.ceil(2 * self.cache / set_bytes))
        count = max(1, min(wanted, budget // set_bytes, max_sets))
        self.set_bytes = set_bytes
        self.cold = count * set_bytes >= 2 * self.cache
        self.sets = [make(i) for i in range(count)]

    def __len__(self):
        return len(self.sets)

    def info(self):
        return dict(rotated_sets=len(self.sets), rotated_mb=len(self.sets) * self.set_bytes / 2**20,
                    cache_mb=self.cache / 2**20, cold=self.cold)


LOSS_TOLERANCE = 2e-2  # above this the benchmarks flag an implementation's loss (bfloat16 logits: ~1e-2)


def loss_error(loss, reference, inputs):
    """|loss - reference| / max(|reference|, 1) on one input set, each on its own copy of the
    tensors (some peers write the gradient into their input), without gradients: the check
    that every implementation timed computes the same loss."""
    import torch

    def copies():
        return [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in inputs]

    with torch.no_grad():
        ref = float(reference(*copies()))
        got = float(loss(*copies()))
    return abs(got - ref) / max(abs(ref), 1.0)


def measure(step, device, repeats, warmup=2, before_each=None, rotation=None):
    """Times ``step()`` and records the peak memory it needs above the current usage.

    With a ``Rotation``, call ``i`` runs ``step(s)`` on its set ``s = sets[i % len]``, and
    ``before_each(s)`` (which gives back what a call leaves, x.grad say) runs before and
    after it, outside the timing, so that the sets not in use hold nothing extra.
    """
    import torch

    import spkern

    sets = rotation.sets if rotation is not None else [None]
    calls = 0

    def call(timed):
        nonlocal calls
        s = sets[calls % len(sets)]
        calls += 1
        args = () if rotation is None else (s,)
        if before_each:
            before_each(*args)
        if not timed:
            step(*args)
            if before_each and rotation is not None:
                before_each(*args)
            return None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(*args)
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            step(*args)
            elapsed = time.perf_counter() - t0
        if before_each and rotation is not None:
            before_each(*args)
        return elapsed

    cuda = device == "cuda"
    for _ in range(warmup):
        call(timed=False)
    if before_each and rotation is None:
        before_each()
    spkern.empty_cache()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_bytes("VmRSS")
    times = sorted(call(timed=True) for _ in range(repeats))
    peak = (torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")) - base
    out = dict(median_ms=times[len(times) // 2] * 1e3, min_ms=times[0] * 1e3,
               max_ms=times[-1] * 1e3, peak_extra_mb=max(peak, 0) / 2**20)
    if rotation is not None:
        out.update(rotation.info())
    return out


def interleave(steps, rounds, cycle, device, before_cycle=None):
    """{name: step()} timed in alternation: ``rounds`` rounds (after one of warm-up), each
    running ``cycle`` steps of every one in turn; {name: [ms per step of each round]}.
    Slow drifts of a shared machine then hit all of them alike. ``before_cycle()`` runs
    before each timed cycle, outside the timing (a barrier of a distributed job, say)."""
    import torch

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    times = {name: [] for name in steps}
    for r in range(rounds + 1):  # the first round warms up
        for name, step in steps.items():
            if before_cycle is not None:
                before_cycle()
            sync()
            t0 = time.perf_counter()
            for _ in range(cycle):
                step()
            sync()
            if r:
                times[name].append((time.perf_counter() - t0) * 1e3 / cycle)
    return times


def measure_cycles(one, device, repeats, cycle):
    """Times cycles of ``cycle`` calls of ``one`` (for work done every ``cycle`` steps)
    and reports the time per call."""
    def step():
        for _ in range(cycle):
            one()

    r = measure(step, device, max(3, repeats // max(cycle // 5, 1)), warmup=1)
    for k in ("median_ms", "min_ms", "max_ms"):
        r[k] /= cycle
    return r


def run_isolated(script, spec):
    """Runs ``script --_one <spec as JSON>`` in a fresh interpreter; returns its last
    stdout line parsed as JSON, or a dict with "error"."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--_one", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def copy_bandwidth(device):
    """Measured copy bandwidth (bytes read + written per second) of a 512 MB buffer."""
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


def matmul_flops(device, n=4096):
    """Measured float32 matrix-multiply throughput (FLOP/s) of an n x n x n product."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = []
    for i in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def machine_info(device):
    import torch

    from spkern import registry

    info = dict(python=platform.python_version(), torch=torch.__version__,
                threads=torch.get_num_threads(), machine=platform.machine(), cpu_cores=os.cpu_count())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    ext = registry.compiled()
    info["spkern_cpu_isa"] = ext.cpu_isa() if ext else None  # (the copy of the CPU kernels that ran)
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["peers"] = peers.versions()
    try:
        info["commit"] = subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--", "spkern", "csrc", "kernels"],
                                        cwd=ROOT, text=True).strip()
        info["commit"] += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def print_header(title, info, device, bandwidth=None):
    where = info.get("gpu") or info["cpu"]
    bw = f", copy bandwidth {bandwidth / 1e9:.1f} GB/s" if bandwidth else ""
    print(f"# {title}, {device}: {where}, {info['threads']} threads, torch {info['torch']}, "
          f"commit {info['commit']}{bw}", flush=True)


def save(out_dir, name, quick, info, results, **extra):
    """Writes the results with the machine record as JSON; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    path = os.path.join(out_dir, f"{name}_{stamp:%Y-%m-%d}{'_quick' if quick else ''}.json")
    with open(path, "w") as f:
        json.dump(dict(date=stamp.isoformat(timespec="seconds"),
                       command=" ".join(["python", os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
                       **extra, **info, results=results), f, indent=1)
    print(f"# wrote {os.path.relpath(path)}")
    return path


def parse_shapes(text, arity, parser):
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
        assert all(len(s) == arity and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        parser.error(f"--shapes must be {arity} positive integers joined by x, comma-separated; "
                     f"got {text!r}")
    return shapes


def free_port():
    """A free TCP port on this machine (for a torch.distributed job's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parser(doc):
    """The options every benchmark takes; add its own, then call ``parse``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes, 3 repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="folder for the JSON results, default runs/bench of the current directory ('' to skip); "
                        "committed ones are in bench/results")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    return p


def parse(p, argv, run_one):
    """Parses the options. Inside the subprocess of ``run_isolated`` (--_one), runs
    ``run_one`` on the JSON arguments, prints its JSON result and returns None."""
    args = p.parse_args(argv)
    if args._one:
        print(json.dumps(run_one(*json.loads(args._one))))
        return None
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    return args


def parse_ints(p, text, name):
    """Comma-separated positive integers, or a clear error naming the option."""
    try:
        values = [int(v) for v in text.split(",")]
        assert values and all(v > 0 for v in values)
    except (ValueError, AssertionError):
        p.error(f"{name} must be positive integers joined by commas, got {text!r}")
    return values
