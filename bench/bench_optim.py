"""Optimizer-step benchmark: the step of an 8-layer MLP (784 -> width x 7 -> 10) with
torch.optim alone, with spkern.optim (the same step plus every per-parameter norm), and
the naive way of getting those norms (copy the weights, step, subtract, norm), all in
the same run.

    python bench/bench_optim.py             # widths 1024, 2048, 4096; SGD (momentum) and AdamW;
                                            # float32 and bfloat16 parameters
    python bench/bench_optim.py --quick

Method: bench/harness.py (each step on the next of several models and optimizers that
together hold twice the last-level cache). Peak memory is what a step needs above the parameters, their
gradients and the optimizer state (created by the warm-up); "+drift" keeps the initial
weights in bfloat16, created before the measurement like the state.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

IMPLS = ["torch.optim", "spkern.optim +norms", "spkern.optim +norms +drift", "naive norms"]
OPTIMS = {"sgd": dict(lr=0.01, momentum=0.9), "adamw": dict(lr=1e-3)}


def run_one(impl, optim, width, dtype, device, repeats):
    import torch

    import spkern

    torch.manual_seed(0)
    dims = [784] + [width] * 7 + [10]
    kw = OPTIMS[optim]
    torch_cls = torch.optim.SGD if optim == "sgd" else torch.optim.AdamW
    spkern_cls = spkern.optim.SGD if optim == "sgd" else spkern.optim.AdamW

    def make(i):
        model = torch.nn.Sequential(*[torch.nn.Linear(dims[k], dims[k + 1]) for k in range(8)])
        model = model.to(device=device, dtype=getattr(torch, dtype))
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        if impl.startswith("spkern"):
            opt = spkern_cls(model.parameters(), track_drift=impl.endswith("+drift"), drift_dtype=torch.bfloat16,
                             **kw)
        else:
            opt = torch_cls(model.parameters(), **kw)
        opt.step()  # creates the state
        return opt

    if impl == "naive norms":
        def step(opt):
            params = [p for group in opt.param_groups for p in group["params"]]
            before = [p.detach().clone() for p in params]
            opt.step()
            return [((p - q).norm(), p.norm(), p.grad.norm()) for p, q in zip(params, before)]
    else:
        def step(opt):
            opt.step()
    # bytes a step reads and writes: SGD with momentum 5 per element (parameter, gradient and
    # buffer read; parameter and buffer written), AdamW 7 (two moments)
    n = sum(dims[k] * dims[k + 1] + dims[k + 1] for k in range(8))
    per = 5 if optim == "sgd" else 7
    rotation = harness.Rotation(make, per * n * torch.empty((), dtype=getattr(torch, dtype)).element_size(), device)
    return harness.measure(step, device, repeats, warmup=2, rotation=rotation)


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--widths", default=None, help="MLP widths, e.g. 1024,2048,4096")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="parameter dtypes")
    args = harness.parse(parser, argv, run_one)
    if args is None:
        return 0
    widths = harness.parse_ints(parser, args.widths or ("512" if args.quick else "1024,2048,4096"), "--widths")
    repeats = args.repeats or (3 if args.quick else 7)
    info = harness.machine_info(args.device)
    harness.print_header("optimizer step of an 8-layer MLP", info, args.device)
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if bad:
        parser.error(f"--dtypes: unknown dtype {bad[0]!r} (float32, bfloat16, float16)")
    print("| optimizer | dtype | width | implementation | median ms | min-max ms | vs torch.optim | peak extra MB |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for optim in OPTIMS:
        for dtype in dtypes:
            for width in widths:
                base = None
                for impl in IMPLS:
                    r = harness.run_isolated(__file__, [impl, optim, width, dtype, args.device, repeats])
                    if "error" in r:
                        print(f"| {optim} | {dtype} | {width} | {impl} | failed: {r['error']} |")
                        continue
                    base = r["median_ms"] if impl == "torch.optim" else base
                    r.update(optim=optim, dtype=dtype, width=width, impl=impl, device=args.device,
                             vs_torch=r["median_ms"] / base if base else None)
                    results.append(r)
                    vs = "-" if r["vs_torch"] is None else f"{r['vs_torch']:.2f}x"
                    print(f"| {optim} | {dtype} | {width} | {impl} | {r['median_ms']:.1f} | "
                          f"{r['min_ms']:.1f}-{r['max_ms']:.1f} | {vs} | {r['peak_extra_mb']:.0f} |", flush=True)
    if args.out:
        harness.save(args.out, f"optim_{args.device}", args.quick, info, results, repeats=repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
