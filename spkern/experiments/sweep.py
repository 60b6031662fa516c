"""Width x learning-rate sweeps: a grid of runs, results appended to one JSONL file.

Each finished run is appended to ``<out>/results.jsonl`` (one JSON object per line,
flushed and synced) as soon as it ends; a sweep started again with the same ``out``
skips the runs already there, so a killed sweep loses at most the run in progress. A
diverging run is recorded with the step it diverged at, and the sweep goes on.

With ``adaptive=Adaptive()`` only the part of the learning-rate grid that decides the
report is run, width by width (smallest first) within each experiment, every seed of a
learning rate together. The first width starts at the top of the grid, every later one
at the previous width's optimum. From the start the search goes up, one grid rate at a
time, until ``above`` consecutive rates are unstable (a seed diverged, or the mean score
is below the report's stability threshold: halfway from chance to the best score so
far); then down from below the start until ``below`` rates below the best one have run
(further down while no rate is stable yet). So every width has its optimum with
``below`` rates under it and its maximal stable rate with ``above`` unstable rates over
it, as the full grid would give them unless a stable rate lies above two unstable ones.
With ``regimes`` (default) the search goes further down until it has run a rate below the
best one whose every run is in the stable regime (:mod:`spkern.regime`), so that the
report's regime map has both of its boundaries.
The decisions are read from the results, so a resumed sweep makes the same ones.

An engine (:mod:`spkern.experiments.engines`) executes the runs: one after another in this
process, or as Ray tasks several at once. This process alone decides which runs and writes
the results, in either case: the searches consume their runs in the serial order, and a run
started ahead of a search that the search does not visit is dropped, so a parallel sweep's
results are the serial sweep's.
"""

import concurrent.futures
import contextlib
import fcntl
import itertools
import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from spkern.distributed import rank_and_world
from spkern.experiments import results
from spkern.experiments.results import RESULTS, ResultsError, read_results
from spkern.experiments.train import gpt as gpt_trainer
from spkern.experiments.train import mlp as mlp_trainer
from spkern.experiments.train.mlp import RunConfig
from spkern.regime import STABLE

TRAINERS = {RunConfig: mlp_trainer.train, gpt_trainer.GPTRunConfig: gpt_trainer.train}  # config class -> trainer


def parse_lrs(text: str) -> List[float]:
    """``"1e-3:10:13"`` (13 log-spaced values from 1e-3 to 10) or ``"0.1,0.3,1"``."""
    try:
        if ":" in text:
            lo, hi, num = text.split(":")
            lo, hi, num = float(lo), float(hi), int(num)
            if not (lo > 0 and hi > 0) or num < 1:
                raise ValueError
            values = [lo] if num == 1 else [lo * (hi / lo) ** (i / (num - 1)) for i in range(num)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"learning rates must be 'low:high:count' or a comma list of positive numbers, "
                         f"got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ValueError(f"learning rates must be positive and finite (and so every rate of a range), got {text!r}")
    return values


def grid(base: RunConfig, **axes: Iterable) -> List[RunConfig]:
    """Every combination of the values given per RunConfig field."""
    names = {f.name for f in fields(type(base))}
    for k in axes:
        if k not in names:
            raise ValueError(f"unknown sweep axis {k!r}")
    keys = list(axes)
    return [replace(base, **dict(zip(keys, combo))).check() for combo in itertools.product(*(axes[k] for k in keys))]


class SweepLocked(RuntimeError):
    """Another sweep is writing to the same folder."""


@contextlib.contextmanager
def _lock(out):
    """Holds ``out``'s lock for the duration of a sweep: a second sweep on the same folder
    fails at once instead of running every run a second time."""
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepLocked(f"another sweep is writing to {out} (it holds {f.name}); wait for it or use "
                              f"another --out") from None
        yield
    finally:
        f.close()


def _key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def _drop_torn_line(path):
    """Cuts a last line that a killed sweep left unfinished (no newline)."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


@dataclass(frozen=True)
class Adaptive:
    """The adaptive learning-rate grid (see the module's docstring)."""

    below: int = 3  # grid rates run below each width's best one
    above: int = 2  # consecutive unstable grid rates that end the search upwards
    threshold: Optional[float] = None  # the score a stable rate must reach (the report's --stable-threshold)
    regimes: bool = True  # further down until a rate below the best is in the stable regime (the regime map)

    def __post_init__(self):
        if self.below < 0 or self.above < 1:
            raise ValueError(f"Adaptive needs below >= 0 and above >= 1, got {self.below}, {self.above}")


def _search(n: int, start: int, adaptive: Adaptive):
    """The adaptive search over a grid of ``n`` rates from index ``start``, as a generator: it
    yields each grid index it visits, in order, is sent the runs of every seed at that rate,
    and returns {index: (mean score, mean training loss, any seed diverged)} of the rates run.
    Its decisions depend on nothing but the runs it is sent."""
    known: Dict[int, Tuple[float, float, bool]] = {}
    regime_stable = set()  # the rates whose every seed is in the stable regime
    base = []  # the chance score, from the first results

    def learn(i, runs):
        base[:] = base or [results.chance_score(runs[0])]
        known[i] = results.lr_outcome(runs)
        if all(results.regime_of(r) == STABLE for r in runs):
            regime_stable.add(i)

    def stable(i):
        score, _, diverged = known[i]
        best = best_of(known)
        return (best is not None and not diverged
                and score >= results.stable_threshold(base[0], known[best][0], adaptive.threshold))

    start = min(max(start, 0), n - 1)
    for i in range(start, n):
        learn(i, (yield i))
        if i - adaptive.above + 1 >= start and not any(stable(j) for j in range(i - adaptive.above + 1, i + 1)):
            break
    for i in range(start - 1, -1, -1):
        if any(stable(j) for j in known) and i < best_of(known) - adaptive.below and (
                not adaptive.regimes or any(j < best_of(known) for j in regime_stable)):
            break
        learn(i, (yield i))
    return known


def visit_order(n: int, start: int) -> List[int]:
    """The order in which the search may visit a grid of ``n`` rates from ``start``: up from
    it, then down from below it. It visits a first part of each half, in this order: what a
    parallel sweep runs ahead of it."""
    start = min(max(start, 0), n - 1)
    return list(range(start, n)) + list(range(start - 1, -1, -1))


def search_grid(n: int, start: int, runs_at: Callable[[int], List[dict]],
                adaptive: Adaptive = Adaptive()) -> Dict[int, Tuple[float, float, bool]]:
    """The adaptive search over a grid of ``n`` rates from index ``start``: ``runs_at(i)``
    makes (or reads) the runs of every seed at grid rate i and returns their results.
    Returns {index: (mean score, mean training loss, any seed diverged)} of the rates run."""
    search = _search(n, start, adaptive)
    try:
        i = next(search)
        while True:
            i = search.send(runs_at(i))
    except StopIteration as stop:
        return stop.value


def best_of(known: Dict[int, Tuple[float, float, bool]]) -> Optional[int]:
    """The index of the best rate of a search's outcomes (the report's choice), or None
    when every rate run had a diverged seed."""
    order = sorted(known)
    best = results.best_index(*([known[i][k] for i in order] for k in range(3)))
    return None if best is None else order[best]


def _experiment(cfg) -> tuple:
    return results.experiment_key(asdict(cfg))


def run(configs: List[RunConfig], out: str, data, *, device=None, progress: bool = True, train_fn=None,
        adaptive: Optional[Adaptive] = None, engine=None, ahead: int = 2) -> dict:
    """Runs every config not yet in ``out``'s results (with ``adaptive``, those of them
    that the adaptive search reaches); returns counts of what happened. Raises
    :class:`SweepLocked` while another sweep writes to ``out``.

    ``engine`` (spkern.experiments.engines; default: one run after another in this process)
    executes the runs; this process decides which and alone writes the results. With an engine
    of several slots, independent runs (experiments, seeds, every run of a full grid) run at
    once, and an adaptive search's next rates (up to ``ahead`` rates past the one it waits for)
    run ahead of it on slots it leaves free; a run the search then does not visit is dropped,
    never recorded (counted in ``speculative``), so the results are the serial sweep's."""
    if train_fn is None and configs:
        if type(configs[0]) not in TRAINERS:
            raise TypeError(f"no trainer for {type(configs[0]).__name__}: a sweep runs "
                            f"{', '.join(c.__name__ for c in TRAINERS)}")
        train_fn = TRAINERS[type(configs[0])]
    os.makedirs(out, exist_ok=True)
    if rank_and_world()[0] != 0:  # under torchrun (a sharded GPT sweep): rank 0 holds the lock and writes
        return _run_locked(configs, out, data, device, False, train_fn, adaptive, engine, ahead)
    with _lock(out):
        return _run_locked(configs, out, data, device, progress, train_fn, adaptive, engine, ahead)


def _same_on_every_rank(done):
    """Rank 0's record of the runs done, on every rank of a torch.distributed sweep (each
    rank must train the same runs, together)."""
    if rank_and_world()[1] == 1:
        return done
    import torch

    box = [done]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class _Grid:
    """The runs of a full grid: every config, in the order given."""

    def __init__(self, configs):
        self.configs = list(configs)
        self.finished = not self.configs

    def wanted(self, done):
        return [c for c in self.configs if _key(asdict(c)) not in done]

    def ahead(self, depth):
        return []

    def step(self, done):
        """Moves on when the runs it waits for are recorded: None when it did not, else the
        configs it left out (none here)."""
        if self.finished or self.wanted(done):
            return None
        self.finished = True
        return []


class _Chain:
    """One experiment of an adaptive sweep: its widths searched one after another (smallest
    first), each from the previous width's optimum; ``wanted``: the runs (every seed) of the
    rate its search waits for; ``ahead(d)``: those of the rate it may visit d rates later."""

    def __init__(self, by_width, adaptive):
        self.by_width, self.adaptive = by_width, adaptive
        self.widths = iter(sorted(by_width))
        self.start = None  # the previous width's optimum
        self.finished = False
        self._next_width()

    def _next_width(self):
        width = next(self.widths, None)
        if width is None:
            self.finished = True
            return
        self.by_lr = self.by_width[width]
        self.grid = sorted(self.by_lr)
        start = len(self.grid) - 1 if self.start is None else self.start
        self.order = visit_order(len(self.grid), start)
        self.search = _search(len(self.grid), start, self.adaptive)
        self.index = next(self.search)

    def wanted(self, done):
        return [] if self.finished else self.by_lr[self.grid[self.index]]

    def ahead(self, depth):
        if self.finished:
            return []
        at = self.order.index(self.index) + depth
        return self.by_lr[self.grid[self.order[at]]] if at < len(self.order) else []

    def step(self, done):
        """Hands the search the runs it waits for once they are all recorded (one rate at a
        time: the sweep sees every rate's runs): None when they are not, else the configs of
        the rates a finished width left out."""
        if self.finished or not all(_key(asdict(c)) in done for c in self.wanted(done)):
            return None
        try:
            self.index = self.search.send([done[_key(asdict(c))] for c in self.wanted(done)])
            return []
        except StopIteration as stop:
            known = stop.value
        best = best_of(known)
        self.start = self.start if best is None else best
        left = [cfg for i in range(len(self.grid)) if i not in known for cfg in self.by_lr[self.grid[i]]]
        self._next_width()
        return left


def _run_locked(configs, out, data, device, progress, train_fn, adaptive, engine, ahead):
    from tqdm.auto import tqdm

    from spkern.experiments import engines

    writer = rank_and_world()[0] == 0
    path = os.path.join(out, RESULTS)
    if writer:
        _drop_torn_line(path)
    done = _same_on_every_rank({_key(r["config"]): r for r in read_results(out)} if writer else None)
    initial = set(done)
    counts = {"total": len(configs), "skipped": 0, "ok": 0, "diverged": 0, "left_out": 0, "stopped_early": 0,
              "steps": 0, "steps_not_run": 0, "speculative": 0, "speculative_steps": 0}
    todo = sum(_key(asdict(c)) not in done for c in configs)
    runs_bar = tqdm(total=todo, desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    steps_bar = tqdm(desc="steps", unit="step", leave=False, disable=not progress, dynamic_ncols=True)
    own_engine = engine is None
    if own_engine:
        engine = engines.SerialEngine()
    if isinstance(engine, engines.SerialEngine):
        engine.progress = steps_bar if progress else None
    elif rank_and_world()[1] > 1:
        raise ValueError("a sweep under torchrun (one run on several processes) runs its runs one after another: "
                         "use the serial engine")
    if adaptive is None:
        chains = [_Grid(configs)]
    else:
        # experiment -> width -> lr -> the configs of its seeds, in the order given
        groups = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for cfg in configs:
            groups[_experiment(cfg)][cfg.width][cfg.lr].append(cfg)
        chains = [_Chain(by_width, adaptive) for by_width in groups.values()]
    finished = {}  # key -> the result of a run that ran ahead of its search, not recorded (yet)
    running = {}  # future -> its config
    # the keys of the recorded runs the sweep reads (a full grid: all; adaptive: those its searches visit)
    used = {_key(asdict(c)) for c in configs} if adaptive is None else set()

    def record(cfg, r, f):
        f.write(json.dumps(r) + "\n")
        f.flush()
        if writer:
            os.fsync(f.fileno())
        done[_key(asdict(cfg))] = r
        counts[r["status"]] += 1
        counts["steps"] += r.get("steps") or 0
        if r.get("stopped_early"):
            counts["stopped_early"] += 1
            counts["steps_not_run"] += r.get("steps_not_run") or 0
        runs_bar.update(1)

    def wanted():
        return [c for chain in chains for c in chain.wanted(done)]

    def move_on(f):
        """Records the runs the searches wait for that have ended, and moves the searches on."""
        moved = True
        while moved:
            moved = False
            for cfg in wanted():
                key = _key(asdict(cfg))
                used.add(key)
                if key in finished:
                    record(cfg, finished.pop(key), f)
            for chain in chains:
                left = chain.step(done)
                if left is not None:
                    moved = True
                    counts["left_out"] += len(left)
                    runs_bar.total -= sum(_key(asdict(c)) not in done for c in left)
        runs_bar.refresh()

    def next_runs():
        """What to start on the free slots: the runs the searches wait for, then those ahead of them."""
        depth = range(1, ahead + 1) if engine.speculates else ()
        later = [c for d in depth for chain in chains for c in chain.ahead(d)]
        seen = {_key(asdict(c)) for c in running.values()}
        for cfg in wanted() + later:
            key = _key(asdict(cfg))
            if key not in done and key not in finished and key not in seen:
                seen.add(key)
                yield cfg

    try:
        with open(path if writer else os.devnull, "a") as f:
            move_on(f)
            while not all(chain.finished for chain in chains):
                for cfg in next_runs():
                    if len(running) >= engine.slots:
                        break
                    if isinstance(engine, engines.SerialEngine):
                        runs_bar.set_postfix_str(f"{cfg.loss} {cfg.optim} {cfg.param} n={cfg.width} "
                                                 f"lr={cfg.lr:.3g} seed={cfg.seed}")
                    running[engine.submit(train_fn, cfg, data, device)] = cfg
                ended, _ = concurrent.futures.wait(list(running), return_when=concurrent.futures.FIRST_COMPLETED)
                for future in ended:
                    cfg = running.pop(future)
                    finished[_key(asdict(cfg))] = future.result()
                move_on(f)
                # runs ahead that no search will read any more (their width is done)
                keep = {_key(asdict(c)) for d in range(ahead + 1) for chain in chains for c in
                        (chain.wanted(done) if d == 0 else chain.ahead(d))}
                for future, cfg in list(running.items()):
                    if _key(asdict(cfg)) not in keep:
                        engine.cancel(future)
                        running.pop(future)
                        counts["speculative"] += 1
    finally:
        for future in running:  # (after the last search: runs ahead of it)
            engine.cancel(future)
            counts["speculative"] += 1
        if own_engine:
            engine.close()
        steps_bar.close()
        runs_bar.close()
    counts["skipped"] = len(used & initial)
    counts["speculative"] += len(finished)
    counts["speculative_steps"] = sum(r.get("steps") or 0 for r in finished.values())
    return counts


__all__ = ["RESULTS", "TRAINERS", "Adaptive", "ResultsError", "SweepLocked", "best_of", "grid", "parse_lrs",
           "read_results", "run", "search_grid"]
