"""``spkern bench``: every kernel benchmark in one harness, side by side with the peers.

    spkern bench [ce|lce|mse|norms|optim|tracker|gpt|all] [--device cpu|cuda] [--quick]

It measures this machine's limits once (the copy bandwidth of a 512 MB buffer and the
float32 throughput of a 4096^3 matrix product), runs the benchmark scripts of the chosen
ops (each implementation in a fresh process, peers measured in the same run and reported
as skipped when not installed), and prints one table: op, shape, dtype, implementation,
median and min-max time, peak extra memory, the achieved rate and its fraction of the
machine's limit. Rates count the work an ideal implementation must do:

* ce, mse: bytes of reading the logits and writing their gradient, against the copy
  bandwidth;
* lce: FLOPs of the three products (logits, input gradient, weight gradient), against the
  matrix-product throughput;
* norms: bytes of reading every parameter and its initial value (the operator norm: one
  pass over the matrix per power iteration, 4 warm, 50 cold: what the CPU kernel reads;
  on GPU each iteration is two matrix-vector products, two passes), against the copy
  bandwidth;
* optim: bytes the step reads and writes (SGD with momentum: 5 per parameter element;
  AdamW: 7; times the element size), against the copy bandwidth;
* gpt: 6 x (block and head parameters) x tokens FLOPs, against the matrix-product
  throughput;
* tracker: no single rate (its time is the overhead over a plain step).

Inputs rotate between calls (bench/harness.py): the kernel benchmarks build as many input
sets as hold twice the last-level cache (the CPU's, from sysfs; the GPU's L2) and each
call takes the next, so rates are those of data coming from memory. Marked * : a row whose
sets could not reach that within the memory budget, and the operator norms, whose power
iterations sweep one matrix 4 times (warm) or 50 times (cold) within a call, where that
matrix fits in the cache; their rate may be a cache rate, not a fraction of the memory
limit. The copy bandwidth counts the bytes read and written by a copy; traffic that is
mostly reads (the norms, the optimizer steps) runs faster than that and can show more
than 100%. The tracker and GPT rows time whole training steps, on the same batch each time.

The rows go to ``<out>/suite_<device>_<date>.json`` and ``.csv`` and one PNG per op (time
and memory against size, one line per implementation) next to them.
"""

import csv
import datetime
import glob
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = {
    "ce": ("bench_cross_entropy.py", [], "cross_entropy_{device}_float32"),
    "mse": ("bench_cross_entropy.py", ["--loss", "mse"], "mse_onehot_{device}_float32"),
    "lce": ("bench_linear_cross_entropy.py", [], "linear_cross_entropy_{device}_float32"),
    "norms": ("bench_norms.py", [], "norms_{device}"),
    "optim": ("bench_optim.py", [], "optim_{device}"),
    "tracker": ("bench_tracker.py", [], "tracker_{device}"),
    "gpt": ("bench_gpt.py", [], "gpt_{device}"),
}
ALL = tuple(OPS)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _mlp_params(width, dims_in=784, depth=8, out=10):
    dims = [dims_in] + [width] * (depth - 1) + [out]
    return sum(dims[i] * dims[i + 1] + dims[i + 1] for i in range(depth))


def annotate(op, r, bandwidth, flops):
    """(shape text, rate text, fraction of the limit) of one result row."""
    if op in ("ce", "mse"):
        work = 2 * r["rows"] * r["vocab"] * _BYTES[r.get("dtype", "float32")]
        return f"{r['rows']}x{r['vocab']}", work / (r["median_ms"] / 1e3), "B", bandwidth
    if op == "lce":
        work = 3 * 2 * r["N"] * r["D"] * r["V"]
        return f"{r['N']}x{r['D']}x{r['V']}", work / (r["median_ms"] / 1e3), "FLOP", flops
    if op == "norms":
        shape = f"{r['case']} @ {r['width']}"
        if r["case"].startswith("8-layer"):
            work = 2 * 4 * _mlp_params(r["width"])
        elif "warm" in r["impl"] and r["case"] == "operator norm":
            work = 4 * 4 * r["width"] ** 2
        elif "cold" in r["impl"]:
            work = 50 * 4 * r["width"] ** 2
        else:
            return shape, None, None, None
        return shape, work / (r["median_ms"] / 1e3), "B", bandwidth
    if op == "optim":
        per = 5 if r["optim"] == "sgd" else 7
        work = per * _BYTES[r.get("dtype", "float32")] * _mlp_params(r["width"])
        return (f"{r['optim']} {r.get('dtype', 'float32')} @ {r['width']}", work / (r["median_ms"] / 1e3), "B",
                bandwidth)
    if op == "gpt":
        w, v = r["width"], r["vocab"]
        params = r["depth"] * 12 * w * w + v * w  # blocks and head (embedding lookups are not products)
        work = 6 * params * r["batch"] * r["context"]
        return f"width {w}", work / (r["median_ms"] / 1e3), "FLOP", flops
    return f"width {r['width']}", None, None, None


def from_cache(op, r, rate, cache):
    """Whether a row's rate may come from the cache rather than memory: its inputs did not
    rotate through twice the cache, or (the power iterations of the operator norm) one
    call sweeps a matrix that fits in it several times. Rows measured before inputs rotated fall back to their
    traffic per call against the cache."""
    if not rate or not cache:
        return False
    if op == "norms" and r["case"] == "operator norm":
        return 4 * r["width"] ** 2 < cache
    if "cold" in r:
        return not r["cold"]
    return rate * r["median_ms"] / 1e3 < cache


def _fmt_rate(rate, unit):
    if rate is None:
        return "-"
    return f"{rate / 1e9:.1f} GB/s" if unit == "B" else f"{rate / 1e9:.1f} GFLOP/s"


def _size(r):
    for keys in (("rows", "vocab"), ("N", "D", "V"), ("width",)):
        if all(k in r for k in keys):
            out = 1
            for k in keys:
                out *= r[k]
            return out
    return None


def figure(op, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    by_impl = {}
    for r in rows:
        if _size(r) is not None:
            by_impl.setdefault(r["impl"], []).append(r)
    for impl, rs in by_impl.items():
        rs = sorted(rs, key=_size)
        a.plot([_size(r) for r in rs], [r["median_ms"] for r in rs], marker="o", label=impl)
        mem = [(_size(r), max(r["peak_extra_mb"], 0.1)) for r in rs if r.get("peak_extra_mb") is not None]
        if mem:
            b.plot(*zip(*mem), marker="o", label=impl)
    for ax, label in ((a, "median ms"), (b, "peak extra MB")):
        if ax.get_lines():
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_xlabel("size (product of the shape)")
        ax.set_ylabel(label)
    fig.suptitle(f"spkern bench {op}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit status 2, as the other spkern commands
            self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")

    p = Parser(prog="spkern bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("op", nargs="?", default="all", choices=ALL + ("all",), help="which benchmark (default: all)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small sizes, 3 repeats")
    p.add_argument("--out", default=harness.DEFAULT_OUT, help="results folder (default: runs/bench of the "
                                                               "current directory)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "spkern bench: --device cuda, but no CUDA device is available\n")
    ops = ALL if args.op == "all" else (args.op,)
    info = harness.machine_info(args.device)
    bandwidth, flops = harness.copy_bandwidth(args.device), harness.matmul_flops(args.device)
    where = info.get("gpu") or info["cpu"]
    print(f"# spkern bench on {where} ({args.device}, {info['threads']} threads), torch {info['torch']}, "
          f"triton {info['triton']}, commit {info['commit']}")
    cache = harness.cache_bytes(args.device)
    print(f"# limits measured now: copy {bandwidth / 1e9:.1f} GB/s, float32 matmul {flops / 1e9:.0f} GFLOP/s"
          + (f"; last-level cache {cache / 2**20:.0f} MB" if cache else ""), flush=True)
    os.makedirs(args.out, exist_ok=True)
    table = []
    for op in ops:
        script, extra, stem = OPS[op]
        run_dir = os.path.join(args.out, f"raw_{op}")
        os.makedirs(run_dir, exist_ok=True)
        for old in glob.glob(os.path.join(run_dir, "*.json")):
            os.remove(old)
        cmd = [sys.executable, os.path.join(HERE, script), "--device", args.device, "--out", run_dir, *extra]
        if args.quick:
            cmd.append("--quick")
        print(f"# {op}: {' '.join(os.path.relpath(c) if c.startswith(HERE) else c for c in cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if "skipped" in line or "failed" in line:
                print(f"#   {line}")
        files = glob.glob(os.path.join(run_dir, stem.format(device=args.device) + "*.json"))
        if proc.returncode != 0 or not files:
            print(f"# {op}: the benchmark failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
            continue
        with open(files[0]) as f:
            rows = json.load(f)["results"]
        for r in rows:
            shape, rate, unit, limit = annotate(op, r, bandwidth, flops)
            in_cache = unit == "B" and from_cache(op, r, rate, cache)
            table.append(dict(op=op, shape=shape, dtype=r.get("dtype", "float32"), impl=r["impl"],
                              median_ms=r["median_ms"], min_ms=r["min_ms"], max_ms=r["max_ms"],
                              peak_extra_mb=r["peak_extra_mb"], rate=rate, rate_unit=unit,
                              fraction_of_limit=rate / limit if rate and limit else None, in_cache=in_cache,
                              rotated_sets=r.get("rotated_sets"), rotated_mb=r.get("rotated_mb")))
        figure(op, rows, os.path.join(args.out, f"suite_{op}_{args.device}.png"))
    print("| op | shape | dtype | implementation | median ms | min-max ms | peak extra MB | achieved | of limit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in table:
        frac = "-" if t["fraction_of_limit"] is None else f"{t['fraction_of_limit']:.0%}" + ("*" if t["in_cache"] else "")
        print(f"| {t['op']} | {t['shape']} | {t['dtype']} | {t['impl']} | {t['median_ms']:.2f} | "
              f"{t['min_ms']:.2f}-{t['max_ms']:.2f} | "
              f"{'-' if t['peak_extra_mb'] is None else format(t['peak_extra_mb'], '.0f')} | "
              f"{_fmt_rate(t['rate'], t['rate_unit'])} | {frac} |")
    stamp = datetime.datetime.now(datetime.timezone.utc)
    base = os.path.join(args.out, f"suite_{args.device}_{stamp:%Y-%m-%d}{'_quick' if args.quick else ''}")
    with open(base + ".json", "w") as f:
        json.dump(dict(date=stamp.isoformat(timespec="seconds"), ops=list(ops), quick=args.quick,
                       copy_bandwidth_gb_s=bandwidth / 1e9, matmul_gflop_s=flops / 1e9, **info, results=table),
                  f, indent=1)
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["op"])
        w.writeheader()
        w.writerows(table)
    if any(t["in_cache"] for t in table):
        print("# *: the data of a call may come from the last-level cache: the rate is not bounded by the memory's")
    print(f"# wrote {os.path.relpath(base)}.json, .csv and suite_<op>_{args.device}.png")
    return 0 if table else 1


if __name__ == "__main__":
    sys.exit(main())
