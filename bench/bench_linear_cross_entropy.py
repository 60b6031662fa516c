"""Linear cross-entropy benchmark: forward+backward time and peak memory of
spkern.linear_cross_entropy against the three matrix products alone (the floor), eager
F.linear + F.cross_entropy, its torch.compile, PyTorch's chunked F.linear_cross_entropy,
and the peers where installed (bench/peers.py: cut-cross-entropy, impl "torch_compile" on
CPU and "cce" on GPU; Liger Kernel and quack on GPU), all in the same run.

    python bench/bench_linear_cross_entropy.py            # (4096, 1024, 32768), (8192, 768, 50257)
    python bench/bench_linear_cross_entropy.py --device cuda   # (8192, 768, 50257), (16384, 4096, 131072)
    python bench/bench_linear_cross_entropy.py --quick    # one small shape
    python bench/bench_linear_cross_entropy.py --interleave   # spkern against the floor in one process
    pip install cut-cross-entropy                         # optional peer

Every step starts from x.grad = W.grad = None; inputs rotate through copies that hold
twice the last-level cache. Peak memory is what a step needs above
the inputs and the weight (it includes the gradients: N x D + V x D). Method:
bench/harness.py. Results: a table on stdout, JSON under runs/bench/ (or --out).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import peers  # noqa: E402

IMPLS = ["three matmuls", "torch eager", "torch.compile", "torch chunked", *peers.LINEAR_CROSS_ENTROPY,
         "spkern", "spkern +stats"]


def run_one(impl, N, D, V, dtype_name, device, repeats):
    """Runs in the subprocess: one implementation on one shape."""
    import torch.nn.functional as F

    made = make_step(impl, N, D, V, dtype_name, device)
    if isinstance(made, dict):
        return made
    step, clear, rotation, loss_of = made
    r = harness.measure(step, device, repeats, warmup=1, before_each=clear, rotation=rotation)
    if loss_of is None:
        r["peak_extra_mb"] = None  # the stand-in gradient is not the method's memory
    else:
        r["loss_error"] = harness.loss_error(
            loss_of, lambda x, w, t: F.cross_entropy(F.linear(x.double(), w.double()), t), rotation.sets[0][:3])
    return r


def interleaved(N, D, V, dtype_name, device, rounds, impls=("three matmuls", "spkern", "spkern +stats")):
    """The implementations in this process, one call each in turn, ``rounds`` rounds on
    their own rotated inputs: {impl: [ms of each round]} and each one's median over the
    rounds of its time / the floor's ("three matmuls") in the same round."""
    import statistics

    steps = {}
    for impl in impls:
        made = make_step(impl, N, D, V, dtype_name, device)
        if isinstance(made, dict):
            continue
        step, clear, rotation, _ = made

        def one(step=step, clear=clear, rotation=rotation, at=[0]):
            s = rotation.sets[at[0] % len(rotation.sets)]
            at[0] += 1
            clear(s)
            step(s)
        steps[impl] = one
    times = harness.interleave(steps, rounds, 1, device)
    floor = times.get("three matmuls")
    out = {}
    for impl, ts in times.items():
        out[impl] = {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "rounds": rounds}
        if floor:
            out[impl]["vs_floor"] = statistics.median(t / f for t, f in zip(ts, floor))
    return out


def make_step(impl, N, D, V, dtype_name, device):
    """(step(set), clear(set), rotation, loss function or None for the floor) of one
    implementation, or {"skipped": why}."""
    import torch
    import torch.nn.functional as F

    import spkern

    if impl in peers.LINEAR_CROSS_ENTROPY:
        try:
            peer_loss = peers.linear_cross_entropy(impl, device)
        except peers.Skip as e:
            return {"skipped": str(e)}
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=device).manual_seed(0)
    floor = impl == "three matmuls"

    def make(i):
        x = torch.randn(N, D, device=device, dtype=dtype, generator=g).requires_grad_()
        w = (torch.randn(V, D, device=device, dtype=dtype, generator=g) * D**-0.5).requires_grad_()
        t = torch.randint(0, V, (N,), device=device, generator=g)
        # the floor's products run on a stand-in gradient of the logits
        dlogits = torch.randn(N, V, device=device, dtype=dtype, generator=g) if floor else None
        return x, w, t, dlogits

    # a call reads x and W and writes their gradients (the floor also reads the logits' gradient)
    set_bytes = (2 * (N * D + V * D) + (N * V if floor else 0)) * dtype.itemsize
    rotation = harness.Rotation(make, set_bytes, device)

    if floor:
        def step(s):
            x, w, _, dlogits = s
            with torch.no_grad():
                x @ w.t()
                dlogits @ w
                dlogits.t() @ x
    else:
        if impl == "torch eager":
            def loss_of(x, w, t):
                return F.cross_entropy(F.linear(x, w), t)
        elif impl == "torch.compile":
            loss_of = torch.compile(lambda x, w, t: F.cross_entropy(F.linear(x, w), t))
        elif impl == "torch chunked":
            options = torch.nn.LinearCrossEntropyOptions()

            def loss_of(x, w, t):
                return F.linear_cross_entropy(x, w, t, options=options)
        elif impl in peers.LINEAR_CROSS_ENTROPY:
            loss_of = peer_loss
        else:
            stats = impl.endswith("+stats")

            def loss_of(x, w, t):
                out = spkern.linear_cross_entropy(x, w, t, return_stats=stats)
                return out[0] if stats else out

        def step(s):
            loss_of(*s[:3]).backward()

    def clear(s):
        s[0].grad = None
        s[1].grad = None

    return step, clear, rotation, (None if floor else loss_of)


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--shapes", default=None, help="N x D x V list, e.g. 4096x1024x32768")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--impls", default=None, help="comma-separated subset of: " + ", ".join(IMPLS))
    parser.add_argument("--interleave", action="store_true",
                        help="time against the floor in one process, a call of each in turn (--repeats rounds, "
                             "default 10; times only: peak memory needs the separate processes)")
    args = harness.parse(parser, argv, run_one)
    if args is None:
        return 0
    import torch

    default_shapes = "8192x768x50257,16384x4096x131072" if args.device == "cuda" else "4096x1024x32768,8192x768x50257"
    shapes = harness.parse_shapes(args.shapes or ("1024x512x16384" if args.quick else default_shapes), 3, parser)
    repeats = args.repeats or (3 if args.quick else 5)
    impls = IMPLS
    if args.impls:
        unknown = set(args.impls.split(",")) - set(IMPLS)
        if unknown:
            parser.error(f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")
        impls = [i for i in IMPLS if i in args.impls.split(",")]

    info = harness.machine_info(args.device)
    if args.interleave:
        chosen = [i for i in impls if i not in ("three matmuls",)] if args.impls else ["spkern", "spkern +stats"]
        rounds = args.repeats or (3 if args.quick else 10)
        harness.print_header(f"linear cross-entropy forward+backward against the three products, interleaved, "
                             f"{args.dtype}", info, args.device)
        print("| N x D x V | implementation | median ms | min-max ms | vs floor (median of the rounds' ratios) |")
        print("|---|---|---|---|---|")
        results = []
        for N, D, V in shapes:
            out = interleaved(N, D, V, args.dtype, args.device, rounds, ["three matmuls", *chosen])
            for impl, r in out.items():
                r.update(N=N, D=D, V=V, impl=impl, dtype=args.dtype, device=args.device)
                results.append(r)
                print(f"| {N}x{D}x{V} | {impl} | {r['median_ms']:.0f} | {r['min_ms']:.0f}-{r['max_ms']:.0f} | "
                      f"{r.get('vs_floor', 0):.3f}x |", flush=True)
        if args.out:
            harness.save(args.out, f"linear_cross_entropy_{args.device}_{args.dtype}_interleaved", args.quick, info,
                         results, rounds=rounds)
        return 0
    harness.print_header(f"linear cross-entropy forward+backward, {args.dtype}", info, args.device)
    header = ("| N x D x V | implementation | median ms | min-max ms | vs floor | vs eager "
              "| peak extra MB | extra beyond gradients, of eager's logits+grad |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    results = []
    for N, D, V in shapes:
        floor_ms = eager_ms = None
        grads_mb = (N * D + V * D) * itemsize / 2**20
        logits_mb = 2 * N * V * itemsize / 2**20  # what eager holds for logits and their gradient
        for impl in impls:
            r = harness.run_isolated(__file__, [impl, N, D, V, args.dtype, args.device, repeats])
            if "error" in r or "skipped" in r:
                print(f"| {N}x{D}x{V} | {impl} | {'failed: ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']} |")
                continue
            floor_ms = r["median_ms"] if impl == "three matmuls" else floor_ms
            eager_ms = r["median_ms"] if impl == "torch eager" else eager_ms
            extra = None if r["peak_extra_mb"] is None else max(r["peak_extra_mb"] - grads_mb, 0.0)
            r.update(N=N, D=D, V=V, impl=impl, dtype=args.dtype, device=args.device,
                     vs_floor=r["median_ms"] / floor_ms if floor_ms else None,
                     vs_eager=eager_ms / r["median_ms"] if eager_ms else None,
                     extra_beyond_gradients_mb=extra,
                     extra_fraction_of_eager_logits=None if extra is None else extra / logits_mb)
            results.append(r)
            if (r.get("loss_error") or 0) > harness.LOSS_TOLERANCE:
                print(f"# {impl}: its loss is off by {r['loss_error']:.1e} (relative) from a float64 reference")

            def fmt(v, spec):
                return "-" if v is None else format(v, spec)

            print(f"| {N}x{D}x{V} | {impl} | {r['median_ms']:.0f} | {r['min_ms']:.0f}-{r['max_ms']:.0f} | "
                  f"{fmt(r['vs_floor'], '.3f')}x | {fmt(r['vs_eager'], '.2f')}x | {fmt(r['peak_extra_mb'], '.0f')} | "
                  f"{fmt(r['extra_fraction_of_eager_logits'], '.1%')} |", flush=True)
    if args.out:
        harness.save(args.out, f"linear_cross_entropy_{args.device}_{args.dtype}", args.quick, info, results,
                     repeats=repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
