"""Norm benchmark: spkern.multi_tensor_norms over all parameters of an 8-layer MLP
(||W - W0||^2, ||W||^2, ||W0||^2, <W, W0> per parameter) against the per-tensor PyTorch
way, spkern.spectral_norm (warm-started power iteration) against the SVD-based
torch.linalg.matrix_norm(A, ord=2), and an AdamW step with the operator norm of its
update (spkern: fused step + update_spectral_norm; torch: copy, step, SVD of the
difference), all in the same run.

    python bench/bench_norms.py               # widths 1024, 2048, 4096; spectral at 4096
    python bench/bench_norms.py --quick

Method: bench/harness.py (each case in a fresh process; median of repeated calls on
inputs rotated through copies that hold twice the last-level cache; peak memory above the
parameters and the initial weights).
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
        def make(i):
            A = torch.randn(width, width, device=device, generator=g) / width**0.5
            state = spkern.spectral_norm(A).state  # the previous step's vectors, for the warm start
            B = A + 1e-3 * torch.randn(width, width, device=device, generator=g) / width**0.5
            return [B, state]

        call = {
            "torch matrix_norm(ord=2)": lambda s: torch.linalg.matrix_norm(s[0], ord=2),
            "spkern spectral_norm warm": lambda s: spkern.spectral_norm(s[0], s[1]),
            "spkern spectral_norm cold": lambda s: spkern.spectral_norm(s[0]),
        }[impl]
        rotation = harness.Rotation(make, 4 * width * width, device)
        r = harness.measure(call, device, repeats, warmup=1, rotation=rotation)
        s = rotation.sets[0]
        exact = torch.linalg.matrix_norm(s[0].double(), ord=2).item()
        r["relative_error"] = (call(s).op.item() if "spkern" in impl else call(s).item()) / exact - 1
        return r
    # 8-layer MLP: input 784 -> width x 7 -> 10, with biases
    dims = [784] + [width] * 7 + [10]

    def make(i):
        params = []
        for k in range(8):
            params.append(torch.randn(dims[k + 1], dims[k], device=device, generator=g) / dims[k] ** 0.5)
            params.append(torch.zeros(dims[k + 1], device=device))
        init = [p.clone() for p in params]
        for p in params:
            p.add_(1e-3 * torch.randn(p.shape, device=device, generator=g))
        return params, init

    if impl == "torch per-tensor":
        def step(s):
            return torch.stack([torch.stack([(p - q).square().sum(), p.square().sum(), q.square().sum(),
                                             (p * q).sum()]) for p, q in zip(*s)])
    elif impl == "torch _foreach":
        def step(s):
            params, init = s
            diff = torch._foreach_sub(params, init)
            return torch.stack([torch.stack(torch._foreach_norm(diff)) ** 2,
                                torch.stack(torch._foreach_norm(params)) ** 2,
                                torch.stack(torch._foreach_norm(init)) ** 2,
                                torch.stack([(p * q).sum() for p, q in zip(params, init)])], 1)
    else:
        def step(s):
            return spkern.multi_tensor_norms(*s)
    # a call reads every parameter and its initial value
    rotation = harness.Rotation(make, 2 * 4 * _mlp_params(dims), device)
    return harness.measure(step, device, repeats, warmup=2, rotation=rotation)


def _mlp_params(dims):
    return sum(dims[k] * dims[k + 1] + dims[k + 1] for k in range(len(dims) - 1))


def update_norm(impl, width, device, repeats, g):
    """Operator norm of one AdamW step's update of a width x width layer: a copy of W_t,
    the step and an SVD, against the fused step and the update rebuilt from the state."""
    import torch

    import spkern

    def make(i):
        w = torch.nn.Parameter(torch.randn(width, width, device=device, generator=g) / width**0.5)
        w.grad = torch.randn(width, width, device=device, generator=g) * 1e-3
        if impl.startswith("torch"):
            opt = torch.optim.AdamW([w], lr=1e-3)
            opt.step()  # creates the state
            return [w, opt, None]
        opt = spkern.optim.AdamW([w], lr=1e-3)
        opt.step()
        return [w, opt, opt.update_spectral_norm(w).state]

    if impl.startswith("torch"):
        def step(s):
            w, opt, _ = s
            before = w.detach().clone()
            opt.step()
            return torch.linalg.matrix_norm(w.detach() - before, ord=2)
    else:
        def step(s):
            w, opt, state = s
            opt.step()
            r = opt.update_spectral_norm(w, state)
            s[2] = r.state
            return r.op
    # a step reads W, its gradient and the two moments and writes W and the moments
    rotation = harness.Rotation(make, 7 * 4 * width * width, device)
    r = harness.measure(step, device, repeats, warmup=1, rotation=rotation)
    s = rotation.sets[0]
    before = s[0].detach().clone()
    got = step(s)
    exact = torch.linalg.matrix_norm((s[0].detach() - before).double(), ord=2).item()
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
