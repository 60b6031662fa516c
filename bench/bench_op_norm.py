"""Operator-norm benchmark: the tracker's warm estimate of op(W_t - W_0), its cost and its
accuracy: power iteration (one step: the tracker's default before 2026-12-01) against
Lanczos with the estimate on span(A Q) (1 step: the default since the second measurement
of 2026-12-01; 2 and 3) and Lanczos with a tolerance. (Lanczos 2 with the plain Ritz
value, the default of the first 2026-12-01 measurement, is in
bench/results/op_norm_cpu_2026-12-01.json.)

    python bench/bench_op_norm.py                 # widths 1024 and 4096, drifts 3% and 10%
    python bench/bench_op_norm.py --quick         # width 512

The matrix: W_t - W_0 for a width x width layer whose top singular values are close
(1, 0.957, 0.95: nanoGPT's c_fc at sigma2/sigma1 = 0.957), moving by a random walk of
--drifts of its norm a step (3%: slow; 10%: fast); 12 steps, each method warm-started
from its own previous vector (the first step cold, 50 iterations, not counted). Time:
median over the steps of one call (``spectral_norm(W_t, state, iters, minus=W_0)``,
float32 CPU: one fused pass over W_t and W_0 a product), methods interleaved within each
step. Accuracy: the worst and the mean relative error against
torch.linalg.matrix_norm(ord=2) over the steps.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

METHODS = [("power", 1, None), ("lanczos", 1, None), ("lanczos", 2, None), ("lanczos", 3, None),
           ("lanczos", 1, 1e-3)]


def run(width, steps, device, drift=0.03):
    import math

    import torch

    import spkern
    import spkern.norms as norms

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
    v, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
    s = torch.cat([torch.tensor([1.0, 0.957, 0.95]), torch.linspace(0.9, 0.01, width - 3)])
    w0 = (torch.randn(width, width, generator=g) / math.sqrt(width)).to(device)
    delta = (u @ torch.diag(s) @ v.t()).to(device)
    states, times, errs, iters = {}, {m: [] for m in METHODS}, {m: [] for m in METHODS}, {m: [] for m in METHODS}
    lanczos = norms.lanczos
    try:
        for t in range(steps + 1):
            delta = delta + drift * torch.randn(width, width, generator=g).to(device) / math.sqrt(width)
            wt = w0 + delta
            exact = torch.linalg.matrix_norm((wt - w0).double(), 2).item()
            for m in METHODS:
                kind, k, tol = m
                norms.lanczos = lanczos if kind == "lanczos" else norms.power_iteration
                state = states.get(m)
                t0 = time.perf_counter()
                r = spkern.spectral_norm(wt, state, k if state is not None else None, minus=w0, tol=tol)
                op = r.op.item()  # (the host read: part of the cost of one call)
                dt = time.perf_counter() - t0
                states[m] = r.state
                if t:
                    times[m].append(dt * 1e3)
                    errs[m].append(op / exact - 1)
                    iters[m].append(r.iters)
    finally:
        norms.lanczos = lanczos
    out = []
    for m in METHODS:
        kind, k, tol = m
        out.append({"width": width, "drift": drift, "method": kind, "steps": k, "tol": tol,
                    "median_ms": statistics.median(times[m]), "worst_error": min(errs[m]),
                    "mean_error": statistics.mean(errs[m]), "mean_products": statistics.mean(iters[m])})
    return out


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--widths", default=None, help="default 1024,4096 (--quick: 512)")
    parser.add_argument("--drifts", default="0.03,0.1", help="random-walk steps, relative to the norm (default 0.03,0.1)")
    args = harness.parse(parser, argv, None)
    widths = harness.parse_ints(parser, args.widths or ("512" if args.quick else "1024,4096"), "--widths")
    steps = args.repeats or (4 if args.quick else 12)
    info = harness.machine_info(args.device)
    try:
        drifts = [float(d) for d in args.drifts.split(",") if d.strip()]
    except ValueError:
        parser.error(f"--drifts: expected numbers like 0.03,0.1, got {args.drifts!r}")
    if not drifts or not all(0 < d < 1 for d in drifts):
        parser.error(f"--drifts: each must be in (0, 1), got {args.drifts!r}")
    harness.print_header("warm operator norm of W_t - W_0 (sigma2/sigma1 = 0.957, a random walk a step)", info,
                         args.device)
    print("| width | drift | method | median ms per call | products (mean) | worst error | mean error |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for width, drift in [(w, d) for w in widths for d in drifts]:
        for r in run(width, steps, args.device, drift):
            results.append(r)
            name = f"{r['method']} {r['steps']}" + (f", tol {r['tol']:g}" if r["tol"] else "")
            print(f"| {width} | {drift:.0%} | {name} | {r['median_ms']:.1f} | {r['mean_products']:.1f} | "
                  f"{r['worst_error']:+.2%} | {r['mean_error']:+.3%} |", flush=True)
    if args.out:
        harness.save(args.out, f"op_norm_{args.device}", args.quick, info, results, steps=steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
