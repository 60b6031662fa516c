"""The CPU kernels' copies per instruction set: what each one buys, and that the build holding
them all (csrc/cpu_dispatch.cpp chooses one at load) is as fast as a build of one.

Two measurements, on the fused cross-entropy (forward + backward, with the logit statistics;
rows x vocabulary float32, bfloat16, float16) and the fused optimizer steps (SGD with momentum,
AdamW; an 8-layer MLP of the given width, every per-parameter norm):

* each copy of the kernels this CPU runs (``spkern.cpu_isa.use``), timed in alternation in one
  process (``harness.interleave``);
* with ``--baseline DIR``: rounds of fresh processes alternating between the build of DIR (a
  checkout whose spkern._C holds one instruction set, an earlier commit say:
  ``git worktree add DIR COMMIT && (cd DIR && python setup.py build_ext --inplace)``) and this
  one, each timing the same steps with the copy it chooses by itself; the median over rounds of
  each build, and their ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def steps(rows, vocab, width):
    """{name: step()} for every configuration: the calls both builds have (spkern.cross_entropy,
    spkern.optim); what each one allocates it frees before it returns."""
    import torch

    import spkern

    torch.manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(rows, vocab).to(dtype).requires_grad_(True)
        t = torch.randint(0, vocab, (rows,))

        def ce(x=x, t=t):
            loss, _ = spkern.cross_entropy(x, t, return_stats=True)
            loss.backward()
            x.grad = None

        out[f"cross_entropy {rows}x{vocab} {str(dtype)[6:]}"] = ce
    dims = [784] + [width] * 7 + [10]
    for name, cls, kw, dtype in (("SGD", spkern.optim.SGD, dict(lr=0.01, momentum=0.9), torch.float32),
                                 ("AdamW", spkern.optim.AdamW, dict(lr=1e-3, weight_decay=0.1), torch.float32),
                                 ("AdamW", spkern.optim.AdamW, dict(lr=1e-3, weight_decay=0.1), torch.bfloat16)):
        model = torch.nn.Sequential(*[torch.nn.Linear(dims[k], dims[k + 1]) for k in range(8)]).to(dtype)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt = cls(model.parameters(), **kw)
        opt.step()  # (the state)
        out[f"{name} step, width {width} {str(dtype)[6:]}"] = opt.step
    return out


def one_round(args):
    """A worker's round: every step warmed up, then the median of ``--repeats`` calls, in ms."""
    import time

    result = {}
    for name, step in steps(args.rows, args.vocab, args.width).items():
        for _ in range(2):
            step()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        result[name] = statistics.median(times)
    import spkern

    C = spkern.registry.compiled()
    result["_isa"] = C.cpu_isa() if hasattr(C, "cpu_isa") else C.compiled_isa()
    return result


def copies_in_one_process(args):
    """{config: {copy: median ms}} for each copy this CPU runs, timed in alternation."""
    import harness
    import spkern

    table = {}
    for name, step in steps(args.rows, args.vocab, args.width).items():
        def under(isa, step=step):
            def run():
                with spkern.cpu_isa.use(isa):
                    step()
            return run

        runs = {isa: under(isa) for isa in spkern.cpu_isa.supported()}
        times = harness.interleave(runs, args.rounds, 1, "cpu")
        table[name] = {isa: statistics.median(t) for isa, t in times.items()}
        print(f"  {name:<36}" + "".join(f"  {isa} {ms:8.1f} ms" for isa, ms in table[name].items()), flush=True)
    return table


def against_baseline(args):
    """{config: {"baseline": ms, "this": ms}}: medians over rounds of worker processes that
    alternate between the two builds (which one goes first alternates too)."""
    worker = [sys.executable, os.path.abspath(__file__), "--_round", "--rows", str(args.rows), "--vocab",
              str(args.vocab), "--width", str(args.width), "--repeats", str(args.repeats)]
    builds = {"baseline": os.path.abspath(args.baseline), "this": ROOT}
    rounds = {name: [] for name in builds}
    for r in range(args.rounds):
        for name in (("baseline", "this") if r % 2 == 0 else ("this", "baseline")):
            env = {**os.environ, "PYTHONPATH": builds[name]}
            proc = subprocess.run(worker, capture_output=True, text=True, env=env, cwd="/")
            if proc.returncode != 0:
                raise SystemExit(f"the {name} build's worker failed:\n{proc.stderr[-3000:]}")
            rounds[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  round {r + 1}/{args.rounds}", flush=True)
    isa = {name: [run.pop("_isa") for run in runs][0] for name, runs in rounds.items()}
    table = {}
    for config in rounds["this"][0]:
        med = {name: statistics.median(run[config] for run in runs) for name, runs in rounds.items()}
        table[config] = {**med, "ratio": med["this"] / med["baseline"]}
        print(f"  {config:<36}  baseline {med['baseline']:8.1f} ms  this {med['this']:8.1f} ms  "
              f"ratio {table[config]['ratio']:.3f}", flush=True)
    return table, isa


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--width", type=int, default=2048, help="the optimizer steps' MLP width")
    p.add_argument("--rounds", type=int, default=9, help="rounds of the alternation (default 9)")
    p.add_argument("--repeats", type=int, default=5, help="calls per step in a worker's round (default 5)")
    p.add_argument("--baseline", help="a checkout with a built spkern._C of one instruction set")
    p.add_argument("--quick", action="store_true", help="small sizes, 3 rounds")
    p.add_argument("--out", default=os.path.join("runs", "bench"),
                   help="folder for the JSON results ('' to skip); committed ones are in bench/results")
    p.add_argument("--_round", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.vocab, args.width, args.rounds, args.repeats = 64, 1000, 64, 3, 3
    if args._round:
        print(json.dumps(one_round(args)))
        return 0
    import harness
    import spkern

    info = harness.machine_info("cpu")
    harness.print_header("CPU kernels per instruction set", info, "cpu")
    print(f"copies of the CPU kernels this CPU runs, timed in alternation ({args.rounds} rounds):")
    results = {"copies": copies_in_one_process(args)}
    extra = {}
    if args.baseline:
        print(f"this build ({', '.join(spkern.cpu_isa.compiled())}) against {args.baseline}, "
              f"{args.rounds} rounds of one process each:")
        results["against_baseline"], extra["isa"] = against_baseline(args)
        extra["baseline"] = args.baseline
        try:
            extra["baseline_commit"] = subprocess.check_output(["git", "-C", args.baseline, "rev-parse", "--short",
                                                                "HEAD"], text=True).strip()
        except (OSError, subprocess.CalledProcessError):
            extra["baseline_commit"] = None
    if args.out:
        harness.save(args.out, "cpu_isa", args.quick, info, results, rows=args.rows, vocab=args.vocab, width=args.width, rounds=args.rounds, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
