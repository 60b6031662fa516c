"""The ``spkern`` command line (also ``python -m spkern``).

    spkern demo                     the default sweep on digits, then its report
    spkern sweep mlp [options]      a width x learning-rate sweep of MLPs
    spkern sweep gpt [options]      a width x learning-rate sweep of small GPTs
    spkern report DIR               the report of a sweep's results
    spkern coord-check [FILE.py:FN] how each layer's updates scale with width
    spkern bench [op] [options]     the kernel benchmarks side by side with the peers
"""

import argparse
import os
import sys

from spkern.experiments.options import (DEMO, GPT_DEFAULTS, GPT_HELP, MLP_HELP, config_from, config_options, number,
                                        positive_ints)

class UsageError(SystemExit):
    """A bad option or input file: one line on stderr and exit status 2 (``run`` prints it)."""

    def __init__(self, message):
        super().__init__(message)
        self.code = 2


def _ints(text, name):
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"spkern: --{name} must be a comma list of positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"spkern: --{name} must be a comma list of positive integers, got {text!r}")
    return values


def _seeds(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"spkern: --seeds is the number of seeds, a positive integer (the runs use seeds 0 to "
                         f"N-1), got {text!r}")
    return n


def _choices(text, allowed, name):
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise UsageError(f"spkern: --{name}: unknown value {bad[0] if bad else text!r}; choose from "
                         f"{', '.join(allowed)}")
    return values


def _add_mlp_options(p, defaults):
    from spkern.experiments.data import DATASETS
    from spkern.experiments.train.common import DTYPES
    from spkern.experiments.train.mlp import RunConfig

    p.add_argument("--data", default=defaults.get("data", "digits"), choices=DATASETS,
                   help="dataset (mnist and cifar10 are read from --data-root)")
    p.add_argument("--data-root", default=None, help="folder of the MNIST / CIFAR-10 files")
    p.add_argument("--widths", default=defaults.get("widths", "64,128,256,512,1024"), help="comma list")
    p.add_argument("--lrs", default=defaults.get("lrs", "1e-3:10:13"),
                   help="'low:high:count' (log-spaced) or a comma list")
    p.add_argument("--loss", default=defaults.get("loss", "ce,mse"), help="ce, mse or both")
    p.add_argument("--optim", default=defaults.get("optim", "sgd"), help="sgd, adam or both")
    p.add_argument("--param", default=defaults.get("param", "sp"), help="sp, mup, ntp, sp-full-align (comma list)")
    p.add_argument("--seeds", default=defaults.get("seeds", "2"), help="number of seeds (runs use seeds 0..N-1)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    config_options(p, RunConfig, MLP_HELP, defaults, choices={"data": DATASETS, "dtype": DTYPES},
                    skip=("data",))
    _add_sweep_options(p, "accuracy", defaults.get("grid", "full"), defaults.get("grid_below"))


def _add_sweep_options(p, score, grid, below=None):
    """The options of how a sweep runs and reports (the MLP and the GPT sweep's)."""
    p.add_argument("--stable-threshold", type=number(), default=None,
                   help=f"{score} a stable lr must reach (default: halfway from chance to the best)")
    _add_grid_options(p, grid, below)
    from spkern.experiments.engines import ENGINES

    p.add_argument("--engine", default="serial", choices=ENGINES,
                   help="serial: one run after another in this process; ray: every run a Ray task, on a local Ray "
                        "cluster started for the sweep or the one at --address (see spkern.experiments.engines)")
    p.add_argument("--workers", type=int, default=None,
                   help="ray engine without GPUs: runs at once, each on an equal share of the cores (default: one "
                        "per core)")
    p.add_argument("--gpus-per-run", type=number(above=0), default=None,
                   help="ray engine: GPUs per run (default 1 where the cluster has GPUs and --device is not cpu)")
    p.add_argument("--address", default=None, help="ray engine: an existing Ray cluster (auto, or host:port)")
    p.add_argument("--ahead", type=int, default=2,
                   help="ray engine, adaptive grid: rates an idle slot may run ahead of each search (their runs are "
                        "dropped when the search does not visit them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")


def _add_grid_options(p, default, below=None):
    from spkern.experiments.sweep import Adaptive

    p.add_argument("--grid", default=default, choices=["full", "adaptive"],
                   help="full: every learning rate at every width; adaptive: per width, from the previous "
                        "width's optimum up to --grid-above unstable rates and down to --grid-below rates "
                        "under the best (see spkern.experiments.sweep)")
    p.add_argument("--grid-below", type=int, default=Adaptive.below if below is None else below,
                   help="adaptive grid: rates run below the best")
    p.add_argument("--grid-above", type=int, default=Adaptive.above,
                   help="adaptive grid: consecutive unstable rates that end the search upwards")


def _adaptive(args):
    from spkern.experiments.sweep import Adaptive

    if args.grid == "full":
        return None
    try:
        return Adaptive(below=args.grid_below, above=args.grid_above, threshold=args.stable_threshold)
    except ValueError:
        raise UsageError(f"spkern: --grid-below must be >= 0 and --grid-above >= 1, got {args.grid_below} and "
                         f"{args.grid_above}") from None


def _device(text):
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text not in ("cpu", "cuda") and not text.startswith("cuda:"):
        raise UsageError(f"spkern: --device must be auto, cpu or cuda, got {text!r}")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("spkern: --device cuda, but no CUDA device is available")
    return text


def _grid_args(args, positive):
    """The learning rates, widths, seeds and device of a sweep's arguments, checked."""
    from spkern.experiments import sweep

    try:
        lrs = sweep.parse_lrs(args.lrs)
    except ValueError as e:
        raise UsageError(f"spkern: --lrs: {e}") from None
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"spkern: --{name.replace('_', '-')} must be a positive integer")
    return lrs, _ints(args.widths, "widths"), list(range(_seeds(args.seeds))), _device(args.device)


def _run_sweep(kind, args, configs, data, device):
    """Runs the configs not yet in args.out, then writes the report."""
    from spkern.distributed import rank_and_world
    from spkern.experiments import report, sweep

    adaptive = _adaptive(args)
    _writable_folder(args.out)
    if rank_and_world()[0] != 0:  # a torch.distributed sweep: rank 0 reports
        sweep.run(configs, args.out, data, device=device, progress=False, adaptive=adaptive)
        return 0
    print(f"spkern sweep {kind}: {len(configs)} runs{' at most (adaptive grid)' if adaptive else ''} on {args.data} "
          f"({device}), results in {args.out}/results.jsonl", flush=True)
    engine = _engine(args, configs, device)
    try:
        counts = sweep.run(configs, args.out, data, device=device, progress=not args.no_progress, adaptive=adaptive,
                           engine=engine, ahead=args.ahead)
    except (sweep.SweepLocked, sweep.ResultsError) as e:
        raise UsageError(f"spkern: {e}") from None
    finally:
        if engine is not None:
            engine.close()
    print(f"done: {counts['ok']} ok, {counts['diverged']} diverged, {counts['skipped']} already in the results"
          + (f", {counts['left_out']} left out by the adaptive grid" if adaptive else ""), flush=True)
    if counts["speculative"]:
        print(f"run ahead of the adaptive search and dropped: {counts['speculative']} run(s) "
              f"({counts['speculative_steps']} steps of finished ones)", flush=True)
    if counts["stopped_early"]:
        print(f"early stopping: {counts['stopped_early']} catastrophic run(s) stopped before their last step, "
              f"{counts['steps_not_run']} of their scheduled steps not run (at most what it saved: a run whose loss "
              f"diverges stops there anyway)", flush=True)
    if not args.no_report:
        print(f"report: {report.write(args.out, args.stable_threshold)}")
    return 0


def _engine(args, configs, device):
    """The engine --engine names (None: the serial one, made by the sweep), checked and started."""
    import time

    from spkern.distributed import rank_and_world
    from spkern.experiments import engines

    ray_only = {"--workers": args.workers, "--gpus-per-run": args.gpus_per_run, "--address": args.address}
    if args.engine == "serial":
        given = [k for k, v in ray_only.items() if v is not None]
        if given:
            raise UsageError(f"spkern: {', '.join(given)} only with --engine ray")
        return None
    if args.ahead < 0:
        raise UsageError(f"spkern: --ahead must be >= 0, got {args.ahead}")
    if rank_and_world()[1] > 1 or any(getattr(c, "tp", 1) > 1 or getattr(c, "fsdp", False) for c in configs):
        raise UsageError("spkern: runs on several processes (--fsdp, --tp, torchrun) stay under torchrun: "
                         "use --engine serial")
    gpus = args.gpus_per_run
    if gpus is None and str(device).startswith("cuda"):
        gpus = 1
    if gpus and args.workers is not None:
        raise UsageError("spkern: --workers is for CPU runs; with GPUs the runs at once are the GPUs / --gpus-per-run")
    start = time.perf_counter()
    try:
        engine = engines.RayEngine(workers=args.workers, gpus_per_run=gpus or 0, address=args.address)
    except (RuntimeError, ValueError, ConnectionError) as e:
        raise UsageError(f"spkern: --engine ray: {e}") from None
    each = f"{gpus:g} GPU(s)" if gpus else f"{engine.threads} core(s)"
    print(f"ray: {engine.slots} runs at once, {each} each, on {engine.address} (started in "
          f"{time.perf_counter() - start:.1f} s)", flush=True)
    return engine


def _writable_folder(out):
    """Refuses an --out that is a file or cannot be written, before any run."""
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, ".lock"), "a"):
            pass
    except OSError as e:
        raise UsageError(f"spkern: --out {out!r}: cannot write there ({e.strerror or e})") from None


def sweep_mlp(args):
    from spkern.experiments import param, sweep
    from spkern.experiments.data import load
    from spkern.experiments.train.common import LOSSES
    from spkern.experiments.train.mlp import RunConfig

    lrs, widths, seeds, device = _grid_args(args, positive_ints(RunConfig))
    base = config_from(args, RunConfig)
    try:
        configs = sweep.grid(base, loss=_choices(args.loss, LOSSES, "loss"),
                             optim=_choices(args.optim, param.OPTIMIZERS, "optim"),
                             param=_choices(args.param, tuple(param.PARAMETERIZATIONS), "param"),
                             width=widths, seed=seeds, lr=lrs)
    except ValueError as e:
        raise UsageError(f"spkern: {e}") from None
    try:
        data = load(args.data, args.data_root)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise UsageError(f"spkern: {e}") from None
    return _run_sweep("mlp", args, configs, data, device)


def _add_gpt_options(p):
    from spkern.experiments.train.common import DTYPES
    from spkern.experiments.train.gpt import GPTRunConfig

    d = GPT_DEFAULTS
    p.add_argument("--data", default="pydoc", help="pydoc (CPython's documentation, bytes), bytes:PATH (any text "
                                                   "file) or shards:DIR (nanoGPT / modded-nanogpt uint16 shards)")
    p.add_argument("--widths", default=d["widths"], help="comma list (multiples of --head-dim)")
    p.add_argument("--lrs", default=d["lrs"], help="'low:high:count' (log-spaced) or a comma list")
    p.add_argument("--loss", default=d["loss"], help="ce, mse (on softmax probabilities) or both")
    p.add_argument("--optim", default=d["optim"], help="adam (AdamW), sgd or both")
    p.add_argument("--param", default=d["param"], help="sp, mup (comma list)")
    p.add_argument("--seeds", default=d["seeds"], help="number of seeds (runs use seeds 0..N-1)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    config_options(p, GPTRunConfig, GPT_HELP, d, choices={"dtype": DTYPES}, skip=("data",))
    _add_sweep_options(p, "score", "full")
    p.add_argument("--out", default="runs/gpt")


def sweep_gpt(args):
    from spkern.experiments import sweep
    from spkern.experiments.gpt import GPT_PARAMS
    from spkern.experiments.text import load_tokens
    from spkern.experiments.train.common import LOSSES, torchrun
    from spkern.experiments.train.gpt import GPTRunConfig

    lrs, widths, seeds, device = _grid_args(args, positive_ints(GPTRunConfig))
    base = config_from(args, GPTRunConfig)
    try:
        configs = sweep.grid(base, loss=_choices(args.loss, LOSSES, "loss"),
                             optim=_choices(args.optim, ("sgd", "adam"), "optim"),
                             param=_choices(args.param, GPT_PARAMS, "param"), width=widths, seed=seeds, lr=lrs)
        tokens = load_tokens(args.data)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"spkern: {e}") from None
    # under torchrun: every rank trains each run together (DDP, or FSDP2 with --fsdp); rank 0
    # writes the results and the report
    with torchrun(device) as device:
        return _run_sweep("gpt", args, configs, tokens, device)


def _add_coord_options(p):
    from spkern.experiments.data import DATASETS
    from spkern.experiments.param import PARAMETERIZATIONS

    p.add_argument("model", nargs="?", default=None,
                   help="FILE.py:FUNCTION, a function of the width that returns your model (default: spkern's MLP)")
    p.add_argument("--param", default="sp", choices=sorted(PARAMETERIZATIONS),
                   help="spkern's MLP: its parameterization (init and per-layer learning rates)")
    p.add_argument("--depth", type=int, default=2, help="spkern's MLP: hidden layers")
    p.add_argument("--data", default="digits", choices=DATASETS, help="the inputs and labels")
    p.add_argument("--data-root", default=None, help="folder of the MNIST / CIFAR-10 files")
    p.add_argument("--widths", default="64,128,256,512,1024", help="comma list")
    p.add_argument("--steps", type=int, default=3, help="training steps at each width")
    p.add_argument("--batch", type=int, default=128, help="rows of the batch (the same batch every step)")
    p.add_argument("--optim", default="sgd", choices=["sgd", "adam"], help="SGD or AdamW")
    p.add_argument("--lr", type=number(above=0), default=0.002, help="the learning rate (at the smallest width)")
    p.add_argument("--tolerance", type=number(above=0), default=0.25,
                   help="an exponent beyond it flags the layer")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--out", default="runs/coord", help="the folder of coord.png and coord.md")


def _factory(spec):
    """The function FILE.py:FUNCTION names."""
    import importlib.util

    path, _, name = spec.rpartition(":")
    if not path or not name or not os.path.isfile(path):
        raise UsageError(f"spkern coord-check: the model must be FILE.py:FUNCTION, got {spec!r}")
    module_spec = importlib.util.spec_from_file_location("spkern_coord_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"spkern coord-check: {path} has no function {name!r}")
    return fn


def coord_check(args):
    import torch

    import spkern
    from spkern.experiments import param
    from spkern.experiments.data import load

    widths = _ints(args.widths, "widths")
    if len(widths) < 2 or args.steps < 1 or args.batch < 1 or args.depth < 1:
        raise UsageError("spkern coord-check: at least two --widths, and --steps, --batch, --depth >= 1")
    device = _device(args.device)
    try:
        data = load(args.data, args.data_root)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise UsageError(f"spkern: {e}") from None
    x, y = data.x_train[:args.batch].to(device), data.y_train[:args.batch].to(device)
    if args.model is not None:
        make = _factory(args.model)

        def optimizer(m):
            cls = torch.optim.SGD if args.optim == "sgd" else torch.optim.AdamW
            return cls(m.parameters(), lr=args.lr)
        what = args.model
    else:
        def make(n):
            return param.MLP(data.d_in, n, args.depth, data.n_classes, param=args.param)

        def optimizer(m):
            return torch.optim.SGD(param.param_groups(m, args.param, args.optim, args.lr, widths[0]), lr=args.lr) \
                if args.optim == "sgd" else torch.optim.AdamW(
                    param.param_groups(m, args.param, "adam", args.lr, widths[0]), lr=args.lr, weight_decay=0.0)
        what = f"spkern's MLP, depth {args.depth}, {args.param}"
    check = spkern.coord_check(make, (x, y), optimizer, widths=widths, steps=args.steps, tolerance=args.tolerance,
                               device=device, progress=True)
    _writable_folder(args.out)
    check.plot(os.path.join(args.out, "coord.png"))
    text = (f"# Coordinate check: {what}\n\n{args.optim}, lr {args.lr:g}, {args.steps} steps on {args.batch} rows "
            f"of {args.data}\n\n{check.table()}\n\n![](coord.png)\n")
    with open(os.path.join(args.out, "coord.md"), "w") as f:
        f.write(text)
    print(check.table())
    for layer, metric, e, how in check.flags:
        print(f"{layer}: {metric} {how} with width (exponent {e:+.2f})")
    print(f"report: {os.path.join(args.out, 'coord.md')}")
    return 0


def bench(argv):
    """Runs bench/suite.py of the source tree (the benchmarks are not installed)."""
    import runpy

    import spkern

    suite = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(spkern.__file__))), "bench", "suite.py")
    if not os.path.exists(suite):
        raise UsageError("spkern bench: the benchmark suite is in the bench/ folder of spkern's source tree; "
                         "install spkern from a checkout (pip install --no-build-isolation -e .)")
    return runpy.run_path(suite, run_name="spkern_bench")["main"](argv)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (argparse would print the usage too)
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default in its help; descriptions as written."""


def _text(doc):
    """A docstring as the terminal shows it (no reStructuredText markup)."""
    return doc.replace("``", "")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only the chosen command's options are built (they import torch and the trainers for
    # their defaults): `spkern --help` answers at once.
    command = next((a for a in argv if not a.startswith("-")), None)
    kind = next((a for a in argv[argv.index(command) + 1:] if not a.startswith("-")), None) if command else None
    parser = _Parser(prog="spkern", description=_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", formatter_class=_Help,
                          help="the default MLP sweep on digits (adaptive grid), every run labelled by its regime, "
                               "and its report with the regime map (under 2 minutes on 2 CPU cores)")
    if command == "demo":
        _add_mlp_options(demo, DEMO)
        demo.add_argument("--out", default="runs/demo", help="the folder of the results and the report")
    sw = sub.add_parser("sweep", help="run a sweep")
    kinds = sw.add_subparsers(dest="kind", required=True)
    mlp = kinds.add_parser("mlp", formatter_class=_Help, help="width x learning-rate sweep of ReLU MLPs")
    gpt = kinds.add_parser("gpt", formatter_class=_Help, help="width x learning-rate sweep of small GPTs (about 4 "
                                                               "minutes on 2 CPU cores with the defaults)")
    if command == "sweep" and kind == "mlp":
        _add_mlp_options(mlp, {})
        mlp.add_argument("--out", default="runs/mlp", help="the folder of the results and the report")
    if command == "sweep" and kind == "gpt":
        _add_gpt_options(gpt)
    rep = sub.add_parser("report", formatter_class=_Help, help="write the report of a sweep")
    rep.add_argument("out", help="the sweep's folder (holding results.jsonl)")
    rep.add_argument("--stable-threshold", type=number(), default=None)
    cc = sub.add_parser("coord-check", formatter_class=_Help,
                        help="how each layer's feature change and updates scale with width, on spkern's MLP or a "
                             "model of yours (a few seconds)")
    if command == "coord-check":
        _add_coord_options(cc)
    sub.add_parser("bench", help="run the benchmark suite (spkern bench --help)", add_help=False)
    sub.add_parser("info", help="versions, how spkern._C was built, and which backend runs each op here")
    sub.add_parser("compile-check", help="compile every GPU kernel for sm_80 and sm_90 without a GPU "
                                          "(spkern compile-check --help)", add_help=False)
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    if argv[:1] == ["compile-check"]:
        from spkern import compile_check
        return compile_check.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        from spkern import info
        return info.main()
    if args.command == "sweep" and args.kind == "gpt":
        return sweep_gpt(args)
    if args.command == "coord-check":
        return coord_check(args)
    if args.command in ("demo", "sweep"):
        return sweep_mlp(args)
    from spkern.experiments import report
    from spkern.experiments.results import ResultsError

    try:
        print(f"report: {report.write(args.out, args.stable_threshold)}")
    except (FileNotFoundError, ResultsError) as e:
        raise UsageError(f"spkern: {e}") from None
    return 0


def run(argv=None):
    """The console entry point: ``main``, with a usage error as one line and exit status 2."""
    try:
        return main(argv)
    except UsageError as e:
        print(e.args[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
