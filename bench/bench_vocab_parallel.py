"""Memory per rank of the vocabulary-parallel fused linear cross-entropy: the peak resident
memory one forward and backward adds to a process, measured by the kernel (the process's
high-water mark, VmHWM, reset to its current size just before the call: Linux's
``/proc/self/clear_refs``), and the call's time (median of repeated calls).

    python bench/bench_vocab_parallel.py                 # 4096 rows, width 512, vocabulary 32768
    python bench/bench_vocab_parallel.py --quick         # 1024 rows, vocabulary 8192

Arms, each in a fresh process (the peak of one arm does not hide another's):
``torch``: ``F.cross_entropy(F.linear(h, W), y)`` on one process (the logits, their
softmax and their gradient made whole); ``spkern``: ``spkern.linear_cross_entropy`` on one
process (chunks of logits, never all of them); ``spkern-tp``: the same with W sharded over
the vocabulary on ``--nproc`` gloo processes (each rank's chunks are its slice of the
vocabulary; its W and dW shards). Inputs (h, W, y) are made, and the call made once
(libraries loaded, kernels chosen), before the reset, so the peak is what the call itself
adds: its buffers, its outputs and the gradients. glibc's malloc runs with a fixed mmap
threshold (128 KiB), so that freed large buffers go back to the system.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def _status_bytes(key):
    """A size from /proc/self/status: VmRSS (resident now), VmHWM (its high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # (the high-water mark back to the current resident size)


def arm(name, rows, width, vocab, repeats):
    """One arm in this process (under torchrun for spkern-tp): rank 0's measurements."""
    import gc

    import torch
    import torch.nn.functional as F

    import spkern

    rank, world = 0, 1
    if name == "spkern-tp":
        torch.distributed.init_process_group("gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, width, generator=g).requires_grad_()
    w = torch.randn(vocab, width, generator=g) * width**-0.5
    y = torch.randint(0, vocab, (rows,), generator=g)
    if name == "spkern-tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        w = distribute_tensor(w, init_device_mesh("cpu", (world,)), [Shard(0)])
    w.requires_grad_()

    def call():
        if name == "torch":
            loss = F.cross_entropy(F.linear(h, w), y)
        else:
            loss, _ = spkern.linear_cross_entropy(h, w, y, return_stats=True)
        loss.backward()
        h.grad = w.grad = None

    call()  # (once before: libraries loaded, kernels chosen; not measured)
    gc.collect()
    spkern.empty_cache()
    if world > 1:
        torch.distributed.barrier()
    before = _status_bytes("VmRSS")
    _reset_peak()
    call()
    peak = _status_bytes("VmHWM") - before
    times = []
    for _ in range(repeats):
        if world > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    out = {"arm": name, "processes": world, "rows": rows, "width": width, "vocab": vocab,
           "peak_extra_bytes": peak, "ms": 1e3 * statistics.median(times), "repeats": repeats}
    if world > 1:
        peaks = [None] * world
        torch.distributed.all_gather_object(peaks, peak)
        out["peak_extra_bytes_per_rank"] = peaks
        # every rank done before any tears down, then the group's objects freed now: gloo's
        # threads freed by the interpreter's last collection abort the process at exit
        torch.distributed.barrier()
        del w, h
        torch.distributed.destroy_process_group()
        gc.collect()
    return out if rank == 0 else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--arm":
        spec = json.loads(argv[1])
        got = arm(spec["arm"], spec["rows"], spec["width"], spec["vocab"], spec["repeats"])
        if got is not None:
            with open(spec["out"], "w") as f:
                json.dump(got, f)
        return 0
    parser = harness.parser(__doc__)
    parser.add_argument("--nproc", type=int, default=2)
    args = harness.parse(parser, argv, None)
    rows, width, vocab = (1024, 256, 8192) if args.quick else (4096, 512, 32768)
    repeats = args.repeats or (3 if args.quick else 7)
    info = harness.machine_info("cpu")
    harness.print_header(f"vocabulary-parallel fused linear loss, {rows} x {width} -> {vocab}", info, "cpu")
    # one thread a process (the TP ranks share the cores); glibc's malloc with a fixed mmap
    # threshold, so that a freed large buffer goes back to the system (else it may stay in
    # the heap, counted in the resident size before the call, and reused unseen)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("torch", "spkern", "spkern-tp"):
            out = os.path.join(tmp, f"{name}.json")
            spec = json.dumps(dict(arm=name, rows=rows, width=width, vocab=vocab, repeats=repeats, out=out))
            launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                       "--master_port", str(harness.free_port())] if name == "spkern-tp" else [sys.executable])
            proc = subprocess.run(launch + [os.path.abspath(__file__), "--arm", spec], capture_output=True, text=True,
                                  env=env)
            if proc.returncode != 0:
                print(f"# {name}: failed\n{proc.stderr[-3000:]}")
                return 1
            results.append(json.loads(open(out).read()))
    print("| arm | processes | peak extra MiB per rank | ms |")
    print("|---|---|---|---|")
    for r in results:
        per = r.get("peak_extra_bytes_per_rank", [r["peak_extra_bytes"]])
        print(f"| {r['arm']} | {r['processes']} | {' / '.join(f'{p / 2**20:.0f}' for p in per)} | {r['ms']:.1f} |")
    logits = rows * vocab * 4 / 2**20
    print(f"# the whole logits are {logits:.0f} MiB in float32; W is {vocab * width * 4 / 2**20:.0f} MiB")
    if args.out:
        harness.save(args.out, "vocab_parallel_cpu", args.quick, info, results, nproc=args.nproc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
