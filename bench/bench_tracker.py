"""Tracker benchmark: one SGD training step of an MLP (784 -> width x 3 -> 10, batch 128 or --batch,
or with --model gpt the GPT of spkern.experiments.gpt: depth 2, context 64, batch 4, vocabulary 8192)
without tracking, with spkern.Tracker measuring every step (feature change, RCC effective
and propagating updates with their alignments, per-parameter update, drift, weight and
gradient norms, logit statistics), and, when installed, with torch-module-monitor
measuring every step (its refined coordinate check, activation norms, activation
differences against the initial model, parameter, parameter-difference and gradient
norms), all in the same run.

    python bench/bench_tracker.py             # widths 1024, 2048
    python bench/bench_tracker.py --quick
    python bench/bench_tracker.py --interleave   # all in one process, alternating
    python bench/bench_tracker.py --model gpt --interleave

Method: bench/harness.py; "every=10" times cycles of 10 steps (one measured) and reports
the time per step. spkern's probe is a fixed batch of --probe rows (default: the
training batch size, --batch, 128), or 16 rows, or "probe=batch": the training batch itself,
measured in the step's own forward (as torch-module-monitor measures); "no op norms"
skips op(W_t - W_0) and the alignment ratios (op_norms=False). "spkern loss and
optimizer only" is the step with spkern.cross_entropy (with its statistics) and
spkern.optim.SGD (with its norms) but no tracker: the part of the trackers' overhead
that is not the tracker. "floor: the step and the probe's two products" is what a tracker
measuring every step on a probe cannot avoid (spkern's step, then the probe's paired
W_t x, W_0 x at every layer); with --interleave every row also gets its time over the
floor's, the median of the rounds' ratios. --impls picks a subset. The tracker's cost
goal, measured as

    python bench/bench_tracker.py --widths 2048 --batch 64 --probe 64 --interleave \
        --impls "spkern Tracker,floor: the step and the probe's two products"

A change to the tracker against the code before it, in one run: ``--baseline DIR`` (a
checkout of the earlier commit, its extension built: ``git worktree add DIR COMMIT``,
then ``./run.sh setup`` there or a copy of spkern/_C*.so) adds "spkern Tracker
(baseline)", spkern imported from DIR; every implementation then runs in a worker
process of its own (this file, with DIR first on the path for the baseline), and the
workers' cycles are interleaved one at a time, each timing its own steps.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

IMPLS = ["no tracking", "spkern loss and optimizer only", "spkern Tracker", "spkern Tracker probe=batch",
         "spkern Tracker probe=batch no op norms", "spkern Tracker every=10", "spkern Tracker probe=16",
         "spkern Tracker probe=16 no op norms", "spkern Tracker probe=16 no op norms every=10",
         "torch-module-monitor", "floor: the step and the probe's two products"]
FLOOR = IMPLS[-1]
BATCH = 128
GPT_VOCAB, GPT_CONTEXT, GPT_BATCH, GPT_DEPTH = 8192, 64, 4, 2


def build(model_kind, width, device, batch=BATCH):
    """(model, x, y, loss(model, x, y, stats) -> (loss, stats or None)) of one benchmark."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import spkern

    torch.manual_seed(0)
    g = torch.Generator(device=device).manual_seed(1)
    if model_kind == "hf-gpt2":  # transformers' GPT-2 (HF Conv1D projections), its own loss
        import transformers

        cfg = transformers.GPT2Config(vocab_size=GPT_VOCAB, n_positions=GPT_CONTEXT, n_embd=width,
                                      n_layer=GPT_DEPTH, n_head=max(1, width // 64), resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg).to(device)
        x = torch.randint(0, GPT_VOCAB, (GPT_BATCH, GPT_CONTEXT), device=device, generator=g)

        def loss(model, x, y, stats):
            return model(input_ids=x, labels=x).loss, None
        return model, x, x, loss
    if model_kind == "gpt":
        from spkern.experiments.gpt import GPT, GPTConfig

        model = GPT(GPTConfig(vocab=GPT_VOCAB, width=width, depth=GPT_DEPTH, context=GPT_CONTEXT)).to(device)
        x = torch.randint(0, GPT_VOCAB, (GPT_BATCH, GPT_CONTEXT), device=device, generator=g)
        y = torch.randint(0, GPT_VOCAB, (GPT_BATCH, GPT_CONTEXT), device=device, generator=g)

        def loss(model, x, y, stats):  # every implementation: the trunk's forward, then the fused head
            out = spkern.linear_cross_entropy(model(x), model.head.weight, y, return_stats=stats)
            return out if stats else (out, None)
        return model, x, y, loss
    dims = [784] + [width] * 3 + [10]
    layers = []
    for i in range(4):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False)] + ([nn.ReLU()] if i < 3 else [])
    model = nn.Sequential(*layers).to(device)
    x = torch.randn(batch, 784, device=device, generator=g)
    y = torch.randint(0, 10, (batch,), device=device, generator=g)

    def loss(model, x, y, stats):
        return spkern.cross_entropy(model(x), y, return_stats=True) if stats else (F.cross_entropy(model(x), y), None)
    return model, x, y, loss


def make_step(impl, width, probe_rows, device, model_kind="mlp", batch=BATCH):
    """(one training step of impl, measurement period in steps), or {"skipped": why}."""
    import copy

    import torch

    import spkern

    model, x, y, loss_fn = build(model_kind, width, device, batch)
    if model_kind in ("gpt", "hf-gpt2") and "probe=16" in impl:
        return {"skipped": "the GPT's probe is whole sequences (its batch is 4)"}
    if impl.startswith("floor"):
        if model_kind != "mlp":
            return {"skipped": "the floor is written for the MLP"}
        # what a tracker measuring every step cannot avoid: spkern's step, then the probe's
        # pass with W_t x and W_0 x at every Linear layer (one paired product each)
        from spkern.features import paired_linear

        opt = spkern.optim.SGD(model.named_parameters(), lr=0.01)
        layers = [m for m in model if isinstance(m, torch.nn.Linear)]
        w0 = [m.weight.detach().clone() for m in layers]
        probe = x[:probe_rows]

        def floor():
            opt.zero_grad()
            loss, _ = loss_fn(model, x, y, True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                h = probe
                for i, (m, w) in enumerate(zip(layers, w0)):
                    out, _ = paired_linear(h, m.weight, w)
                    h = torch.relu(out) if i < len(layers) - 1 else out
        return floor, 1
    if impl.startswith("spkern"):
        opt = spkern.optim.SGD(model.named_parameters(), lr=0.01)
        tracker = None
        if "Tracker" in impl:
            rows = 16 if "probe=16" in impl else probe_rows
            probe = "batch" if "probe=batch" in impl else x[:rows]
            tracker = spkern.Tracker(model, opt, probe=probe, every=10 if "every" in impl else 1,
                                     op_norms="no op norms" not in impl)

        def one():
            opt.zero_grad()
            loss, stats = loss_fn(model, x, y, True)
            loss.backward()
            if tracker is not None:
                tracker.record_loss(loss, stats)
            opt.step()
            return tracker.metrics() if tracker is not None and tracker.steps % tracker.every == 0 else None
        return one, tracker.every if tracker is not None else 1
    elif impl == "torch-module-monitor":
        try:
            from torch_module_monitor import ModuleMonitor, RefinedCoordinateCheck
        except ImportError:
            return {"skipped": "torch-module-monitor is not installed"}
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        reference = copy.deepcopy(model)
        monitor = ModuleMonitor(monitor_step_fn=lambda s: True)
        monitor.set_module(model)
        monitor.set_reference_module(reference)
        rms = lambda t: t.pow(2).mean(dim=-1).sqrt()  # noqa: E731
        monitor.add_activation_metric("rms", rms)
        monitor.add_activation_difference_metric("change_rms", lambda a, b: rms(a - b))
        monitor.add_parameter_metric("fro", lambda p: p.norm())
        monitor.add_parameter_difference_metric("drift_fro", lambda p, q: (p - q).norm())
        monitor.add_gradient_metric("fro", lambda g: g.norm())
        rcc = RefinedCoordinateCheck(monitor)
        counter = [0]

        def step():
            counter[0] += 1
            monitor.begin_step(counter[0])
            opt.zero_grad()
            with torch.no_grad():
                reference(x)
            loss_fn(model, x, y, False)[0].backward()
            monitor.monitor_parameters()
            monitor.monitor_gradients()
            rcc.refined_coordinate_check()
            monitor.end_step()
            opt.step()
            return monitor.get_step_metrics()
        return step, 1
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad()
        loss_fn(model, x, y, False)[0].backward()
        opt.step()
    return step, 1


def run_one(impl, width, probe_rows, device, repeats, model_kind="mlp", batch=BATCH):
    made = make_step(impl, width, probe_rows, device, model_kind, batch)
    if isinstance(made, dict):
        return made
    step, every = made
    if every > 1:  # whole cycles of `every` steps, reported per step
        return harness.measure_cycles(step, device, repeats, every)
    return harness.measure(step, device, repeats, warmup=2)


def interleaved(width, probe_rows, device, repeats, impls=IMPLS, cycle=10, model_kind="mlp", batch=BATCH):
    """Every implementation in this process, timed in alternation: cycles of ``cycle``
    steps, one implementation after the other, ``repeats`` rounds; the median time per
    step of each. Slow drifts of a shared machine then hit all implementations alike;
    ``paired_overhead`` is the median over the rounds of each round's time against the
    untracked step's in that round. {impl: result}; peak memory is not measured this way."""
    import statistics

    steps, out = {}, {}
    for impl in impls:
        made = make_step(impl, width, probe_rows, device, model_kind, batch)
        if isinstance(made, dict):
            out[impl] = made
        else:
            steps[impl] = made[0]
    times = harness.interleave(steps, repeats, cycle, device)
    base, floor = times.get("no tracking"), times.get(FLOOR)
    for impl, ts in times.items():
        out[impl] = {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts),
                     "peak_extra_mb": None, "method": f"interleaved cycles of {cycle} steps"}
        if base:  # against the untracked step of the same round: the machine's state cancels
            out[impl]["paired_overhead"] = statistics.median(t / b for t, b in zip(ts, base)) - 1
        if floor:  # and against the floor of the same round
            out[impl]["vs_floor"] = statistics.median(t / f for t, f in zip(ts, floor))
    return {impl: out[impl] for impl in impls}


BASELINE = "spkern Tracker (baseline)"


def _worker(spec):
    """A worker of --baseline: builds ``spec``'s step, then for each line N of stdin runs N
    steps and prints the milliseconds per step ("quit" ends it)."""
    import time

    import torch

    import spkern

    impl, width, probe_rows, device, model_kind, batch = spec
    made = make_step("spkern Tracker" if impl == BASELINE else impl, width, probe_rows, device, model_kind, batch)
    print(json.dumps({"ready": True, "spkern": os.path.dirname(os.path.dirname(os.path.abspath(spkern.__file__)))}
                     if not isinstance(made, dict) else made), flush=True)
    if isinstance(made, dict):
        return
    step = made[0]
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        n = int(line)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        print((time.perf_counter() - t0) * 1e3 / n, flush=True)


def with_baseline(baseline, width, probe_rows, device, repeats, impls, cycle=10, model_kind="mlp", batch=BATCH):
    """:func:`interleaved` with every implementation in a worker process, "spkern Tracker
    (baseline)" importing spkern from the checkout ``baseline``: one cycle of each worker
    in turn, ``repeats`` rounds after one of warm-up."""
    import statistics
    import subprocess

    workers, out = {}, {}
    for impl in impls:
        env = dict(os.environ)
        if impl == BASELINE:
            env["PYTHONPATH"] = os.path.abspath(baseline) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_worker",
                                 json.dumps([impl, width, probe_rows, device, model_kind, batch])],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        hello = json.loads(proc.stdout.readline() or '{"error": "the worker did not start"}')
        if not hello.get("ready"):
            out[impl] = hello
            proc.wait()
            continue
        workers[impl] = proc
        out[impl] = {"spkern_from": hello["spkern"]}
    times = {impl: [] for impl in workers}
    try:
        for r in range(repeats + 1):  # the first round warms up
            for impl, proc in workers.items():
                proc.stdin.write(f"{cycle}\n")
                proc.stdin.flush()
                ms = float(proc.stdout.readline())
                if r:
                    times[impl].append(ms)
    finally:
        for proc in workers.values():
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait()
    base, floor = times.get("no tracking"), times.get(FLOOR)
    for impl, ts in times.items():
        out[impl].update({"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts),
                          "peak_extra_mb": None, "method": f"worker processes, interleaved cycles of {cycle} steps"})
        if base:
            out[impl]["paired_overhead"] = statistics.median(t / b for t, b in zip(ts, base)) - 1
        if floor:
            out[impl]["vs_floor"] = statistics.median(t / f for t, f in zip(ts, floor))
    return {impl: out[impl] for impl in impls}


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--widths", default=None, help="model widths, e.g. 1024,2048")
    parser.add_argument("--model", choices=["mlp", "gpt", "hf-gpt2"], default="mlp",
                        help="the MLP, or the GPT (spkern.experiments.gpt: depth 2, context 64, batch 4, vocabulary "
                             "8192), or transformers' GPT-2 of the same size (its own loss)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"the MLP's training batch (default {BATCH})")
    parser.add_argument("--probe", type=int, default=None, help="rows of spkern's probe batch (default: the batch)")
    parser.add_argument("--impls", default=None,
                        help="comma-separated subset of: " + ", ".join(IMPLS) + " (no tracking is always run)")
    parser.add_argument("--interleave", action="store_true",
                        help="time all implementations in one process, in alternation (for noisy machines)")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="also time the tracker of the spkern checkout DIR (an earlier commit), every "
                             "implementation in a worker process, interleaved")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    if argv is None and "--_worker" in sys.argv:
        return _worker(json.loads(sys.argv[sys.argv.index("--_worker") + 1]))
    args = harness.parse(parser, argv, run_one)
    if args is None:
        return 0
    widths = harness.parse_ints(parser, args.widths or ("512" if args.quick else "1024,2048"), "--widths")
    repeats = args.repeats or (3 if args.quick else 20)
    if args.batch < 1 or (args.probe is not None and args.probe < 1):
        parser.error("--batch and --probe must be positive")
    args.probe = args.probe or args.batch
    impls = IMPLS
    if args.impls:
        chosen = [i.strip() for i in args.impls.split(",") if i.strip()]
        unknown = [i for i in chosen if i not in IMPLS]
        if unknown:
            parser.error(f"--impls: unknown {unknown[0]!r}; choose from {', '.join(IMPLS)}")
        impls = ["no tracking"] + [i for i in IMPLS if i in chosen and i != "no tracking"]
    if args.baseline is not None:
        if not os.path.isfile(os.path.join(args.baseline, "spkern", "__init__.py")):
            parser.error(f"--baseline: {args.baseline} is not an spkern checkout")
        impls = impls + [BASELINE]
        args.interleave = True
    info = harness.machine_info(args.device)
    harness.print_header("training step with metric tracking", info, args.device)
    print("| width | implementation | median ms | min-max ms | overhead vs no tracking | peak extra MB |")
    print("|---|---|---|---|---|---|")
    results = []
    for width in widths:
        base = None
        if args.baseline is not None:
            together = with_baseline(args.baseline, width, args.probe, args.device, repeats, impls,
                                     model_kind=args.model, batch=args.batch)
        else:
            together = (interleaved(width, args.probe, args.device, repeats, impls, model_kind=args.model,
                                    batch=args.batch) if args.interleave else None)
        for impl in impls:
            r = (together[impl] if together is not None
                 else harness.run_isolated(__file__, [impl, width, args.probe, args.device, repeats, args.model, args.batch]))
            if "error" in r or "skipped" in r:
                print(f"| {width} | {impl} | {'failed: ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']} |")
                continue
            base = r["median_ms"] if impl == "no tracking" else base
            r.update(model=args.model, width=width, impl=impl, device=args.device, probe_rows=args.probe, batch=args.batch,
                     overhead=r["median_ms"] / base - 1 if base else None)
            results.append(r)
            over = "-" if r["overhead"] is None else f"{r['overhead']:+.0%}"
            if "paired_overhead" in r:
                over += f" (paired {r['paired_overhead']:+.0%})"
            if "vs_floor" in r and impl != FLOOR:
                over += f", {r['vs_floor']:.2f}x the floor"
            mem = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
            print(f"| {width} | {impl} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {over} | "
                  f"{mem} |", flush=True)
    if args.out:
        name = ("tracker_" + ("" if args.model == "mlp" else args.model + "_") + args.device
                + ("_interleaved" if args.interleave else ""))
        extra = {}
        if args.baseline is not None:
            import subprocess

            commit = subprocess.run(["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            extra["baseline"] = {"dir": os.path.abspath(args.baseline), "commit": commit or None}
            name += "_vs_baseline"
        harness.save(args.out, name, args.quick, info, results, repeats=repeats, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
