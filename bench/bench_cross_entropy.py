"""Cross-entropy benchmark: forward+backward time and peak memory of spkern against
PyTorch eager and torch.compile of F.cross_entropy, and on a GPU Liger Kernel and quack
where installed (bench/peers.py), all measured in the same run.

    python bench/bench_cross_entropy.py                 # (4096, 32768) and (8192, 50257), float32
    python bench/bench_cross_entropy.py --quick         # one small shape, 3 repeats
    python bench/bench_cross_entropy.py --device cuda   # on a GPU: adds the Triton and CUDA backends and
                                                        # the peers; (8192, 50257) and (16384, 131072)
    python bench/bench_cross_entropy.py --loss mse      # squared error on one-hot targets instead
    python bench/bench_cross_entropy.py --stats-cost    # the statistics' cost, interleaved in one process

Every step starts from x.grad = None, as a training step does; inputs rotate through
copies that hold twice the last-level cache. Method: bench/harness.py.
Results: a table on stdout and JSON under runs/bench/ (or --out); the figures quoted in
docs/benchmarks.md are in bench/results/.
"""

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import peers  # noqa: E402

# name -> (spkern backend, or None for PyTorch; return_stats)
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
PEERS = peers.CROSS_ENTROPY  # cross-entropy only (--loss ce)


def logit_sets(rows, vocab, dtype_name, device):
    """The rotated input sets, (logits requiring grad, class targets): one call reads the
    logits and writes their gradient."""
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=device).manual_seed(0)

    def make(i):
        x = torch.randn(rows, vocab, device=device, dtype=dtype, generator=g).requires_grad_()
        return x, torch.randint(0, vocab, (rows,), device=device, generator=g)
    return harness.Rotation(make, 2 * rows * vocab * dtype.itemsize, device)


def run_one(impl, rows, vocab, dtype_name, device, repeats, loss="ce"):
    """Runs in the subprocess: one implementation on one shape."""
    import torch
    import torch.nn.functional as F

    import spkern

    if impl in PEERS:
        try:
            peer_loss = peers.cross_entropy(impl, device)
        except peers.Skip as e:
            return {"skipped": str(e)}
        backend, stats = "peer", False
    else:
        backend, stats = {**IMPLS, **CUDA_IMPLS}[impl]
    rotation = logit_sets(rows, vocab, dtype_name, device)
    if loss == "mse":  # squared error of the logits against one-hot targets, mean over rows x classes
        def torch_loss(x, target):
            return F.mse_loss(x, F.one_hot(target, x.shape[1]).to(x.dtype))

        def spkern_loss(x, target, return_stats):
            return spkern.mse_onehot_loss(x, target, return_stats=return_stats)
    else:
        torch_loss = F.cross_entropy

        def spkern_loss(x, target, return_stats):
            return spkern.cross_entropy(x, target, return_stats=return_stats)
    if backend == "peer":
        loss_of = peer_loss
    elif backend is None:
        loss_of = torch_loss if impl == "torch eager" else torch.compile(torch_loss)
    else:
        def loss_of(x, target):
            with spkern.use_backend(backend) if backend != "default" else contextlib.nullcontext():
                out = spkern_loss(x, target, stats)
            return out[0] if stats else out

    def step(s):
        loss_of(*s).backward()

    def clear(s):
        s[0].grad = None

    error = harness.loss_error(loss_of, lambda x, t: torch_loss(x.double(), t), rotation.sets[0])
    return {**harness.measure(step, device, repeats, before_each=clear, rotation=rotation), "loss_error": error}


def stats_cost(rows, vocab, dtype_name, device, rounds, cycle=2, with_eager=True):
    """The statistics' cost, interleaved: spkern's loss without and with return_stats (and
    torch eager, one call a round) in this process, in alternation on the same rotated
    inputs; {impl: [ms per call of each round]} and the median over the rounds of the
    ratio with stats / without."""
    import statistics

    import torch.nn.functional as F

    import spkern

    rotation = logit_sets(rows, vocab, dtype_name, device)

    def stepper(loss_of):
        at = [0]

        def step():
            x, t = rotation.sets[at[0] % len(rotation.sets)]
            at[0] += 1
            x.grad = None
            loss_of(x, t).backward()
        return step
    steps = {"spkern": stepper(lambda x, t: spkern.cross_entropy(x, t)),
             "spkern +stats": stepper(lambda x, t: spkern.cross_entropy(x, t, return_stats=True)[0])}
    times = harness.interleave(steps, rounds, cycle, device)
    if with_eager:  # (slow: one call a round, after the two)
        times.update(harness.interleave({"torch eager": stepper(F.cross_entropy)}, rounds, 1, device))
    ratios = [b / a for a, b in zip(times["spkern"], times["spkern +stats"])]
    out = {"rows": rows, "vocab": vocab, "dtype": dtype_name, "rounds": rounds, "cycle": cycle,
           "cost": statistics.median(ratios) - 1, **rotation.info(),
           **{f"{k}_median_ms": statistics.median(v) for k, v in times.items()}}
    if with_eager:
        out["stats_vs_eager"] = out["torch eager_median_ms"] / out["spkern +stats_median_ms"]
    return out


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--stats-cost", action="store_true",
                        help="only the statistics' cost: spkern without and with return_stats (and torch eager) "
                             "timed in alternation in one process (--repeats rounds, default 15)")
    parser.add_argument("--shapes", default=None, help="rows x vocab list, e.g. 4096x32768,8192x50257")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--loss", default="ce", choices=["ce", "mse"],
                        help="ce: cross-entropy; mse: squared error against one-hot targets (F.mse_loss of "
                             "F.one_hot for PyTorch, spkern.mse_onehot_loss)")
    parser.add_argument("--impls", default=None,
                        help="comma-separated subset of: " + ", ".join(list(IMPLS) + list(CUDA_IMPLS) + PEERS))
    args = harness.parse(parser, argv, run_one)
    if args is None:
        return 0
    import torch

    default_shapes = "8192x50257,16384x131072" if args.device == "cuda" else "4096x32768,8192x50257"
    shapes = harness.parse_shapes(args.shapes or ("1024x32768" if args.quick else default_shapes), 2, parser)
    repeats = args.repeats or (3 if args.quick else 7)
    impls = list(IMPLS) + (list(CUDA_IMPLS) if args.device == "cuda" else [])
    if args.loss == "ce":
        impls += PEERS
    if args.impls:
        unknown = set(args.impls.split(",")) - set(impls)
        if unknown:
            parser.error(f"--impls: unknown {sorted(unknown)}; choose from {impls}")
        impls = [i for i in impls if i in args.impls.split(",")]

    info = harness.machine_info(args.device)
    if args.stats_cost:
        if args.loss != "ce":
            parser.error("--stats-cost measures the cross-entropy's statistics (--loss ce)")
        harness.print_header(f"cost of cross-entropy's per-row statistics, interleaved, {args.dtype}", info,
                             args.device)
        rounds = args.repeats or (3 if args.quick else 15)
        results = []
        for rows, vocab in shapes:
            r = stats_cost(rows, vocab, args.dtype, args.device, rounds)
            results.append(r)
            print(f"# {rows}x{vocab}: spkern {r['spkern_median_ms']:.1f} ms, +stats {r['spkern +stats_median_ms']:.1f} "
                  f"ms, torch eager {r['torch eager_median_ms']:.1f} ms: statistics cost {r['cost']:+.1%} (median "
                  f"of {rounds} rounds' ratios); spkern +stats {r['stats_vs_eager']:.2f}x eager", flush=True)
        if args.out:
            harness.save(args.out, f"cross_entropy_stats_cost_{args.device}_{args.dtype}", args.quick, info, results,
                         rounds=rounds)
        return 0
    bandwidth = harness.copy_bandwidth(args.device)
    title = "cross-entropy" if args.loss == "ce" else "squared error on one-hot targets"
    harness.print_header(f"{title} forward+backward, {args.dtype}", info, args.device, bandwidth)
    header = "| rows x vocab | implementation | median ms | min-max ms | vs eager | peak extra MB | GB/s | of copy bw |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    results = []
    for rows, vocab in shapes:
        eager_ms = None
        for impl in impls:
            r = harness.run_isolated(__file__, [impl, rows, vocab, args.dtype, args.device, repeats, args.loss])
            if "error" in r or "skipped" in r:
                what = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
                print(f"| {rows}x{vocab} | {impl} | {what} |")
                continue
            if impl == "torch eager":
                eager_ms = r["median_ms"]
            # the least traffic a fused step can have: read the logits, write their gradient
            gbs = 2 * rows * vocab * itemsize / (r["median_ms"] / 1e3) / 1e9
            r.update(rows=rows, vocab=vocab, impl=impl, dtype=args.dtype, device=args.device, loss=args.loss,
                     speedup_vs_eager=(eager_ms / r["median_ms"]) if eager_ms else None,
                     gb_per_s=gbs, fraction_of_copy_bandwidth=gbs * 1e9 / bandwidth)
            results.append(r)
            if (r.get("loss_error") or 0) > harness.LOSS_TOLERANCE:
                print(f"# {impl}: its loss is off by {r['loss_error']:.1e} (relative) from a float64 reference")
            speed = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-"
            print(f"| {rows}x{vocab} | {impl} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | "
                  f"{speed} | {r['peak_extra_mb']:.0f} | {gbs:.1f} | {r['fraction_of_copy_bandwidth']:.0%} |",
                  flush=True)
    for rows, vocab in shapes:
        by = {r["impl"]: r for r in results if (r["rows"], r["vocab"]) == (rows, vocab)}
        if "spkern" in by and "spkern +stats" in by:
            cost = by["spkern +stats"]["median_ms"] / by["spkern"]["median_ms"] - 1
            print(f"# {rows}x{vocab}: statistics cost {cost:+.1%} over the plain loss")
    if args.out:
        name = "cross_entropy" if args.loss == "ce" else "mse_onehot"
        harness.save(args.out, f"{name}_{args.device}_{args.dtype}", args.quick, info, results,
                     repeats=repeats, copy_bandwidth_gb_s=bandwidth / 1e9)
    return 0


if __name__ == "__main__":
    sys.exit(main())
