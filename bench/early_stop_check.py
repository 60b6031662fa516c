"""Does stopping catastrophic runs early change what a sweep finds?

Runs the demo's sweep on its full learning-rate grid twice, with the regime classifier's
early stopping (the default) and without it (``--no-stop-catastrophic``), or reads two
such sweeps already run, and compares, per experiment and width, the optimal and the
maximal stable learning rate, the regime of every rate, the steps run and the time. Writes
the comparison as JSON (``--json``) and prints it; exits 1 when a width's optimal or
maximal stable rate differs.

    python bench/early_stop_check.py --out runs/early_stop --json bench/results/regimes/early_stop_check.json
"""

import argparse
import json
import os
import subprocess
import sys
import time

from harness import machine_info

from spkern.experiments import results


def sweep(out, stop, extra):
    """Runs the demo on the full grid into ``out`` (resuming what is there); returns seconds."""
    argv = [sys.executable, "-m", "spkern", "demo", "--grid", "full", "--no-progress", "--no-report", "--out", out]
    argv += [] if stop else ["--no-stop-catastrophic"]
    start = time.perf_counter()
    subprocess.run(argv + extra, check=True)
    return time.perf_counter() - start


def outcome(out):
    """{experiment label: {width: {...}}} of a sweep's results."""
    found = {}
    for exp, by_width in results.experiments(results.read_results(out)).items():
        d = dict(exp)
        label = f"{d['loss']} {d['optim']} {d['param']}"
        for width, s in results.summarize(by_width).items():
            runs = [r for rs in s["runs"] for r in rs]
            found.setdefault(label, {})[width] = {
                "optimal_lr": s["opt_lr"], "max_stable_lr": s["max_stable_lr"],
                "regimes": dict(zip(map(str, s["lrs"]), s["regimes"])),
                "steps": sum(r.get("steps") or 0 for r in runs),
                "stopped_early": sum(bool(r.get("stopped_early")) for r in runs),
                "seconds": sum(r.get("seconds") or 0.0 for r in runs)}
    return found


def _g(v):
    return "none" if v is None else f"{v:.3g}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/early_stop", help="the folder of the two sweeps (on/ and off/)")
    p.add_argument("--json", default=None, help="write the comparison here")
    p.add_argument("--no-run", action="store_true", help="only compare the sweeps already in --out")
    args, extra = p.parse_known_args(argv)
    on, off = os.path.join(args.out, "on"), os.path.join(args.out, "off")
    seconds = {}
    if not args.no_run:
        seconds = {"on": sweep(on, True, extra), "off": sweep(off, False, extra)}
    a, b = outcome(on), outcome(off)
    differ = []
    for label in sorted(b):
        for width in sorted(b[label]):
            x, y = a.get(label, {}).get(width), b[label][width]
            same = x is not None and all(x[k] == y[k] for k in ("optimal_lr", "max_stable_lr"))
            if not same:
                differ.append((label, width))
            x = x or {}
            print(f"{label} n={width}: optimal {_g(y['optimal_lr'])} / {_g(x.get('optimal_lr'))}, max stable "
                  f"{_g(y['max_stable_lr'])} / {_g(x.get('max_stable_lr'))} (without / with early stopping)"
                  f"{'' if same else '  DIFFERS'}; steps {y['steps']} / {x.get('steps')}, "
                  f"{x.get('stopped_early')} run(s) stopped")
    steps = {k: sum(w["steps"] for e in v.values() for w in e.values()) for k, v in (("on", a), ("off", b))}
    print(f"steps: {steps['off']} without early stopping, {steps['on']} with ({steps['off'] - steps['on']} saved); "
          f"{'every' if not differ else 'NOT every'} width's optimal and maximal stable rate unchanged")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info("cpu"), "date": time.strftime("%Y-%m-%d"), "sweep_seconds": seconds,
                       "steps": steps,
                       "differ": differ, "with_early_stopping": a, "without": b}, f, indent=1)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
