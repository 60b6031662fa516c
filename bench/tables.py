"""Markdown tables of benchmark results.

    python bench/tables.py bench/results/cross_entropy_cpu_float32_2026-11-24.json ...
    python bench/tables.py --docs           # docs/benchmarks.md's measured tables, from bench/results/
    python bench/tables.py --docs --check   # exit 1 when docs/benchmarks.md is not what they give

``--docs`` writes, between the two markers of docs/benchmarks.md, one table for each
result file of bench/results/ (and its suite/ folder), the latest date of each benchmark
(the part of the file name before its date) with all its runs that day.
"""

import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN = "<!-- measured tables: written by `python bench/tables.py --docs` from bench/results/; do not edit -->"
END = "<!-- end of the measured tables -->"


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(path):
    with open(path) as f:
        d = json.load(f)
    where = d.get("gpu") or d["cpu"]
    if "ops" in d:  # spkern bench (bench/suite.py)
        return _suite(d, where)
    if isinstance(d["results"], dict) and "copies" in d["results"]:  # bench/bench_cpu_isa.py
        return _cpu_isa(d, where)
    lines = [f"`{d['command']}` on {where}, {d['threads']} threads, torch {d['torch']}, "
             f"spkern `_C` CPU kernels {d['spkern_cpu_isa']}, commit {d['commit']}, {d['date'][:10]}.", ""]
    rows = d["results"]
    if rows and "optim" in rows[0]:
        lines += ["| optimizer | dtype | width | implementation | median ms | vs torch.optim | peak extra MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['optim']} | {r.get('dtype', 'float32')} | {r['width']} | {r['impl']} | "
                         f"{r['median_ms']:.1f} | "
                         f"{_fmt(r['vs_torch'], '.2f')}x | {r['peak_extra_mb']:.0f} |")
    elif rows and "case" in rows[0]:
        lines += ["| case | width | implementation | median ms | vs torch | peak extra MB | relative error |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            err = r.get("relative_error")
            lines.append(f"| {r['case']} | {r['width']} | {r['impl']} | {r['median_ms']:.2f} | "
                         f"{_fmt(r['speedup_vs_torch'], '.1f')}x | {r['peak_extra_mb']:.0f} | "
                         f"{'-' if err is None else format(err, '+.2%')} |")
    elif rows and "tokens_per_s" in rows[0]:
        lines += ["| width | implementation | median ms per step | tokens/s | vs eager | peak extra MB |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['width']} | {r['impl']} | {r['median_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                         f"{_fmt(r['throughput_vs_eager'], '.2f')}x | {r['peak_extra_mb']:.0f} |")
    elif rows and "overhead" in rows[0]:
        lines += ["| width | implementation | median ms per step | min-max ms | overhead vs no tracking | "
                  "peak extra MB |", "|---|---|---|---|---|---|"]
        for r in rows:
            over = _fmt(r['overhead'], '+.0%') + (f", {r['vs_floor']:.2f}x the floor" if r.get("vs_floor") else "")
            lines.append(f"| {r['width']} | {r['impl']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | "
                         f"{over} | {_fmt(r.get('peak_extra_mb'), '.0f')} |")
    elif rows and "vocab" in rows[0]:
        lines += ["| rows x vocab | implementation | median ms | min-max ms | vs eager | peak extra MB |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['rows']} x {r['vocab']} | {r['impl']} | {r['median_ms']:.1f} | "
                         f"{r['min_ms']:.1f}-{r['max_ms']:.1f} | {_fmt(r['speedup_vs_eager'], '.2f')}x | "
                         f"{r['peak_extra_mb']:.0f} |")
    else:
        lines += ["| N x D x V | implementation | median ms | vs three matmuls | vs eager | peak extra MB "
                  "| extra beyond gradients / eager's logits + gradient |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['N']} x {r['D']} x {r['V']} | {r['impl']} | {r['median_ms']:.0f} | "
                         f"{_fmt(r['vs_floor'], '.2f')}x | {_fmt(r['vs_eager'], '.2f')}x | "
                         f"{_fmt(r['peak_extra_mb'], '.0f')} | {_fmt(r['extra_fraction_of_eager_logits'], '.1%')} |")
    return "\n".join(lines)


def _cpu_isa(d, where):
    copies = d["results"]["copies"]
    isas = list(next(iter(copies.values())))
    lines = [f"`{d['command']}` on {where}, {d['threads']} threads, torch {d['torch']}, commit {d['commit']}, "
             f"{d['date'][:10]}; medians of {d['rounds']} rounds.", "",
             "Each copy of the CPU kernels this CPU runs, timed in alternation in one process:", "",
             "| step | " + " | ".join(f"{isa} ms" for isa in isas) + f" | {isas[0]} / {isas[-1]} |",
             "|---|" + "---|" * (len(isas) + 1)]
    for name, ms in copies.items():
        lines.append(f"| {name} | " + " | ".join(f"{ms[isa]:.1f}" for isa in isas) +
                     f" | {ms[isas[0]] / ms[isas[-1]]:.2f}x |")
    against = d["results"].get("against_baseline")
    if against:
        commit = f", commit {d['baseline_commit']}" if d.get("baseline_commit") else ""
        lines += ["", f"This build (every copy, running {d['isa']['this']}) against `{d['baseline']}`{commit} (built for "
                  f"{d['isa']['baseline']} alone), processes of each alternating:", "",
                  "| step | one-ISA build ms | this build ms | ratio |", "|---|---|---|---|"]
        for name, r in against.items():
            lines.append(f"| {name} | {r['baseline']:.1f} | {r['this']:.1f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def _suite(d, where):
    rate = lambda t: "-" if t["rate"] is None else (  # noqa: E731
        f"{t['rate'] / 1e9:.1f} GB/s" if t["rate_unit"] == "B" else f"{t['rate'] / 1e9:.0f} GFLOP/s")
    lines = [f"`spkern bench {' '.join(d['ops']) if len(d['ops']) == 1 else 'all'}` on {where}, {d['threads']} "
             f"threads, torch {d['torch']}, triton {d['triton']}, commit {d['commit']}, {d['date'][:10]}; "
             f"limits measured in the run: copy {d['copy_bandwidth_gb_s']:.1f} GB/s, float32 matmul "
             f"{d['matmul_gflop_s']:.0f} GFLOP/s.", "",
             "| op | shape | dtype | implementation | median ms | peak extra MB | achieved | of limit |",
             "|---|---|---|---|---|---|---|---|"]
    for t in d["results"]:
        frac = "-" if t["fraction_of_limit"] is None else f"{t['fraction_of_limit']:.0%}" + ("*" if t.get("in_cache")
                                                                                             else "")
        lines.append(f"| {t['op']} | {t['shape']} | {t['dtype']} | {t['impl']} | {t['median_ms']:.1f} | "
                     f"{_fmt(t['peak_extra_mb'], '.0f')} | {rate(t)} | {frac} |")
    return "\n".join(lines)


def latest_results(folder=os.path.join(ROOT, "bench", "results")):
    """The result files of the latest date of each benchmark, sorted by name."""
    families = {}
    for path in glob.glob(os.path.join(folder, "*.json")) + glob.glob(os.path.join(folder, "suite", "*.json")):
        name = os.path.relpath(path, folder)
        m = re.match(r"(.*?)_(\d{4}-\d{2}-\d{2})", name)
        if m:
            families.setdefault(m.group(1), []).append((m.group(2), path))
    out = []
    for runs in families.values():
        last = max(date for date, _ in runs)
        out += [path for date, path in runs if date == last]
    return sorted(out)


def generic(path):
    """A table of any result file: its rows' scalar fields (the benchmarks with no table of
    their own)."""
    with open(path) as f:
        d = json.load(f)
    where = d.get("gpu") or d.get("cpu", "?")
    rows = d["results"] if isinstance(d["results"], list) else [d["results"]]
    keys = [k for k in rows[0] if all(isinstance(r.get(k), (int, float, str, type(None))) for r in rows)][:10]

    def cell(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [f"`{d.get('command', '?')}` on {where}, {d.get('threads', '?')} threads, torch {d.get('torch', '?')}, "
             f"commit {d.get('commit', '?')}, {str(d.get('date', '?'))[:10]}.", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def docs_tables():
    parts = []
    for path in latest_results():
        rel = os.path.relpath(path, ROOT)
        try:
            body = table(path)
        except (KeyError, TypeError, ValueError):  # (a result of another shape)
            body = generic(path)
        parts.append(f"### `{rel}`\n\n{body}")
    return "\n\n".join(parts)


def write_docs(check=False):
    text = open(DOCS).read()
    if BEGIN not in text or END not in text:
        sys.exit(f"{DOCS} has no markers for the measured tables")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n\n{docs_tables()}\n\n{END}{tail}"
    if check:
        return 0 if new == text else 1
    with open(DOCS, "w") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    if "--docs" in sys.argv:
        sys.exit(write_docs(check="--check" in sys.argv))
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("\n\n".join(table(p) for p in sys.argv[1:]))
