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
"""

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


def search_grid(n: int, start: int, runs_at: Callable[[int], List[dict]],
                adaptive: Adaptive = Adaptive()) -> Dict[int, Tuple[float, float, bool]]:
    """The adaptive search over a grid of ``n`` rates from index ``start``: ``runs_at(i)``
    makes (or reads) the runs of every seed at grid rate i and returns their results.
    Returns {index: (mean score, mean training loss, any seed diverged)} of the rates run."""
    known: Dict[int, Tuple[float, float, bool]] = {}
    regime_stable = set()  # the rates whose every seed is in the stable regime
    base = []  # the chance score, from the first results

    def visit(i):
        runs = runs_at(i)
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
        visit(i)
        if i - adaptive.above + 1 >= start and not any(stable(j) for j in range(i - adaptive.above + 1, i + 1)):
            break
    for i in range(start - 1, -1, -1):
        if any(stable(j) for j in known) and i < best_of(known) - adaptive.below and (
                not adaptive.regimes or any(j < best_of(known) for j in regime_stable)):
            break
        visit(i)
    return known


def best_of(known: Dict[int, Tuple[float, float, bool]]) -> Optional[int]:
    """The index of the best rate of a search's outcomes (the report's choice), or None
    when every rate run had a diverged seed."""
    order = sorted(known)
    best = results.best_index(*([known[i][k] for i in order] for k in range(3)))
    return None if best is None else order[best]


def _experiment(cfg) -> tuple:
    return results.experiment_key(asdict(cfg))


def run(configs: List[RunConfig], out: str, data, *, device=None, progress: bool = True, train_fn=None,
        adaptive: Optional[Adaptive] = None) -> dict:
    """Runs every config not yet in ``out``'s results (with ``adaptive``, those of them
    that the adaptive search reaches); returns counts of what happened. Raises
    :class:`SweepLocked` while another sweep writes to ``out``."""
    if train_fn is None and configs:
        if type(configs[0]) not in TRAINERS:
            raise TypeError(f"no trainer for {type(configs[0]).__name__}: a sweep runs "
                            f"{', '.join(c.__name__ for c in TRAINERS)}")
        train_fn = TRAINERS[type(configs[0])]
    os.makedirs(out, exist_ok=True)
    if rank_and_world()[0] != 0:  # under torchrun (a sharded GPT sweep): rank 0 holds the lock and writes
        return _run_locked(configs, out, data, device, False, train_fn, adaptive)
    with _lock(out):
        return _run_locked(configs, out, data, device, progress, train_fn, adaptive)


def _same_on_every_rank(done):
    """Rank 0's record of the runs done, on every rank of a torch.distributed sweep (each
    rank must train the same runs, together)."""
    if rank_and_world()[1] == 1:
        return done
    import torch

    box = [done]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _run_locked(configs, out, data, device, progress, train_fn, adaptive):
    from tqdm.auto import tqdm

    writer = rank_and_world()[0] == 0
    path = os.path.join(out, RESULTS)
    if writer:
        _drop_torn_line(path)
    done = _same_on_every_rank({_key(r["config"]): r for r in read_results(out)} if writer else None)
    counts = {"total": len(configs), "skipped": 0, "ok": 0, "diverged": 0, "left_out": 0, "stopped_early": 0,
              "steps": 0, "steps_not_run": 0}
    todo = sum(_key(asdict(c)) not in done for c in configs)
    runs_bar = tqdm(total=todo, desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    steps_bar = tqdm(desc="steps", unit="step", leave=False, disable=not progress, dynamic_ncols=True)

    def result(cfg, f):
        """The recorded result of cfg, trained now if it is not in the results yet."""
        key = _key(asdict(cfg))
        if key in done:
            counts["skipped"] += 1
            return done[key]
        runs_bar.set_postfix_str(f"{cfg.loss} {cfg.optim} {cfg.param} n={cfg.width} lr={cfg.lr:.3g} seed={cfg.seed}")
        r = train_fn(cfg, data, device=device, progress=steps_bar if progress else None)
        f.write(json.dumps(r) + "\n")
        f.flush()
        if writer:
            os.fsync(f.fileno())
        done[key] = r
        counts[r["status"]] += 1
        counts["steps"] += r.get("steps") or 0
        if r.get("stopped_early"):
            counts["stopped_early"] += 1
            counts["steps_not_run"] += r.get("steps_not_run") or 0
        runs_bar.update(1)
        return r

    try:
        with open(path if writer else os.devnull, "a") as f:
            if adaptive is None:
                for cfg in configs:
                    result(cfg, f)
            else:
                # experiment -> width -> lr -> the configs of its seeds, in the order given
                groups = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
                for cfg in configs:
                    groups[_experiment(cfg)][cfg.width][cfg.lr].append(cfg)
                for by_width in groups.values():
                    start = None  # the previous width's optimum
                    for width in sorted(by_width):
                        by_lr = by_width[width]
                        grid = sorted(by_lr)
                        known = search_grid(len(grid), len(grid) - 1 if start is None else start,
                                            lambda i: [result(cfg, f) for cfg in by_lr[grid[i]]], adaptive)
                        left = [cfg for i in range(len(grid)) if i not in known for cfg in by_lr[grid[i]]]
                        counts["left_out"] += len(left)
                        runs_bar.total -= sum(_key(asdict(c)) not in done for c in left)
                        runs_bar.refresh()
                        best = best_of(known)
                        start = start if best is None else best
    finally:
        steps_bar.close()
        runs_bar.close()
    return counts


__all__ = ["RESULTS", "TRAINERS", "Adaptive", "ResultsError", "SweepLocked", "best_of", "grid", "parse_lrs",
           "read_results", "run", "search_grid"]
