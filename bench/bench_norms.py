"""Norm benchmark: spkern.multi_tensor_norms over all parameters of an 8-layer MLP
(||W - W0||^2, ||W||^2, ||W0||^2, <W, W0> per parameter) against the per-tensor PyTorch
way, spkern.spectral_norm (warm-started power iteration) against the SVD-based
torch.linalg.matrix_norm(A, ord=2), and an AdamW step with the operator norm of its
update (spkern: fused step + update_spectral_norm; torch: copy, step, SVD of the
difference), all in the same run.

    python bench/bench_norms.py               # widths 1024, 2048, 4096; spectral at 4096
    python bench/bench_norms.py --quick

Method: bench/harness.py (each case in a fresh process; median of repeated calls;
peak memory above the parameters and the initial weights).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

IMPLS = ["torch per-tensor", "torch _foreach", "spkern multi_tensor_norms",
         "torch matrix_norm(ord=2)", "spkern spectral_norm warm", "spkern spectral_norm cold"]
UPDATE_IMPLS = ["torch copy + step + matrix_norm(ord=2)", "spkern step + update_spectral_norm warm"]


def run_one(impl, width, device, repeats):
    import torch

    import spkern

    g = torch.Generator(device=device).manual_seed(0)
    if impl in UPDATE_IMPLS:
        return update_norm(impl, width, device, repeats, g)
    if "spectral" in impl or "matrix_norm" in impl:
        A = torch.randn(width, width, device=device, generator=g) / width**0.5
        state = spkern.spectral_norm(A).state
        B = A + 1e-3 * torch.randn(width, width, device=device, generator=g) / width**0.5
        step = {
            "torch matrix_norm(ord=2)": lambda: torch.linalg.matrix_norm(B, ord=2),
            "spkern spectral_norm warm": lambda: spkern.spectral_norm(B, state),
            "spkern spectral_norm cold": lambda: spkern.spectral_norm(B),
        }[impl]
        r = harness.measure(step, device, repeats, warmup=1)
        exact = torch.linalg.matrix_norm(B.double(), ord=2).item()
        r["relative_error"] = (step().op.item() if "spkern" in impl else step().item()) / exact - 1
        return r
    # 8-layer MLP: input 784 -> width x 7 -> 10, with biases
    dims = [784] + [width] * 7 + [10]
    params = []
    for i in range(8):
        params.append(torch.randn(dims[i + 1], dims[i], device=device, generator=g) / dims[i] ** 0.5)
        params.append(torch.zeros(dims[i + 1], device=device))
    init = [p.clone() for p in params]
    for p in params:
        p.add_(1e-3 * torch.randn(p.shape, device=device, generator=g))
    if impl == "torch per-tensor":
        def step():
            return torch.stack([torch.stack([(p - q).square().sum(), p.square().sum(), q.square().sum(),
                                             (p * q).sum()]) for p, q in zip(params, init)])
    elif impl == "torch _foreach":
        def step():
            diff = torch._foreach_sub(params, init)
            return torch.stack([torch.stack(torch._foreach_norm(diff)) ** 2,
                                torch.stack(torch._foreach_norm(params)) ** 2,
                                torch.stack(torch._foreach_norm(init)) ** 2,
                                torch.stack([(p * q).sum() for p, q in zip(params, init)])], 1)
    else:
        def step():
            return spkern.multi_tensor_norms(params, init)
    return harness.measure(step, device, repeats, warmup=2)


def update_norm(impl, width, device, repeats, g):
    """Operator norm of one AdamW step's update of a width x width layer: a copy of W_t,
    the step and an SVD, against the fused step and the update rebuilt from the state."""
    import torch

    import spkern

    w = torch.nn.Parameter(torch.randn(width, width, device=device, generator=g) / width**0.5)
    w.grad = torch.randn(width, width, device=device, generator=g) * 1e-3
    if impl.startswith("torch"):
        opt = torch.optim.AdamW([w], lr=1e-3)

        def step():
            before = w.detach().clone()
            opt.step()
            return torch.linalg.matrix_norm(w.detach() - before, ord=2)
    else:
        opt = spkern.optim.AdamW([w], lr=1e-3)
        opt.step()
        state = [opt.update_spectral_norm(w).state]

        def step():
            opt.step()
            r = opt.update_spectral_norm(w, state[0])
            state[0] = r.state
            return r.op
    r = harness.measure(step, device, repeats, warmup=1)
    before = w.detach().clone()
    got = step()
    exact = torch.linalg.matrix_norm((w.detach() - before).double(), ord=2).item()
    r["relative_error"] = got.item() / exact - 1
    return r


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--widths", default=None, help="MLP widths, e.g. 1024,2048,4096")
    args = harness.parse(parser, argv, run_one)
    if args is None:
        return 0
    widths = harness.parse_ints(parser, args.widths or ("512" if args.quick else "1024,2048,4096"), "--widths")
    repeats = args.repeats or (3 if args.quick else 7)
    info = harness.machine_info(args.device)
    harness.print_header("norms", info, args.device)
    print("| case | width | implementation | median ms | min-max ms | vs torch | peak extra MB | rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    cases = [("8-layer MLP parameters", w, i) for w in widths for i in IMPLS[:3]]
    cases += [("operator norm", max(widths), i) for i in IMPLS[3:]]
    cases += [("AdamW step + update operator norm", max(widths), i) for i in UPDATE_IMPLS]
    baseline = {}
    for case, width, impl in cases:
        r = harness.run_isolated(__file__, [impl, width, args.device, repeats])
        if "error" in r:
            print(f"| {case} | {width} | {impl} | failed: {r['error']} |")
            continue
        if impl.startswith("torch"):
            baseline.setdefault((case, width), r["median_ms"])
        base = baseline.get((case, width))
        r.update(case=case, width=width, impl=impl, device=args.device,
                 speedup_vs_torch=base / r["median_ms"] if base else None)
        results.append(r)
        err = r.get("relative_error")
        print(f"| {case} | {width} | {impl} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} | "
              f"{r['speedup_vs_torch']:.1f}x | {r['peak_extra_mb']:.0f} | "
              f"{'-' if err is None else f'{err:+.2%}'} |", flush=True)
    if args.out:
        harness.save(args.out, f"norms_{args.device}", args.quick, info, results, repeats=repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
