"""A sweep's results: the file, and what a run and a learning rate came to.

The bottom of the experiments package: the sweep writes and reads ``results.jsonl``, the
report reads it, and both judge runs by the definitions here (nothing here imports them).

* a run's score: its ``score`` (MLP: final training accuracy; GPT: minus the validation
  cross-entropy), chance for a diverged run (1 / classes, minus log vocabulary);
* a learning rate's outcome over seeds: mean score, mean training loss, whether a seed
  diverged;
* a width's optimal learning rate: among the rates with no diverged seed, the highest mean
  score (ties: the lowest training loss); its maximal stable rate: the largest rate with no
  diverged seed and a mean score at or above the threshold (by default halfway from chance
  to the optimum's);
* a run's regime (:mod:`spkern.regime`): the label the trainer recorded; a diverged run is
  ``catastrophic``; for a result written before runs carried a label, the classifier run
  over its recorded history (initial values: its first measurement).
"""

import json
import os
from collections import defaultdict
from typing import List

import numpy as np

from spkern.regime import CATASTROPHIC, REGIMES, Regime, worst

RESULTS = "results.jsonl"
SWEPT = ("width", "lr", "seed")  # what varies inside one experiment


class ResultsError(ValueError):
    """A results file holds a line that is not a run's result."""


def read_results(out: str) -> List[dict]:
    """Every run recorded in ``out``'s results file (a torn line is ignored; a JSON line
    that is not a run's result raises :class:`ResultsError` naming the file and line)."""
    path = os.path.join(out, RESULTS)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a run interrupted while being written
            if not (isinstance(row, dict) and isinstance(row.get("config"), dict) and "width" in row["config"]
                    and "lr" in row["config"] and row.get("status") in ("ok", "diverged")):
                raise ResultsError(f"{path}, line {number}: not a sweep result (a JSON object with 'config' and "
                                   f"'status')")
            rows.append(row)
    return rows


def experiment_key(config: dict) -> tuple:
    """What identifies a run's experiment: its config but the swept width, lr and seed."""
    return tuple(sorted((k, v) for k, v in config.items() if k not in SWEPT))


def experiments(rows):
    """{experiment key: {width: {lr: [run, ...]}}}."""
    out = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        c = r["config"]
        out[experiment_key(c)][c["width"]][c["lr"]].append(r)
    return out


def chance_score(run):
    """The score of a run at chance (MLP: 1 / classes; GPT: minus log vocabulary)."""
    return run["chance_score"] if "chance_score" in run else 1.0 / run.get("n_classes", 10)


def score(run):
    """The run's score (higher is better); chance for a diverged run."""
    value = run.get("score", run.get("train_acc"))
    if run["status"] != "ok" or value is None:
        return chance_score(run)
    return value


def lr_outcome(runs):
    """(mean score, mean training loss, whether any seed diverged) of the runs of one lr."""
    mean = float(np.mean([score(r) for r in runs]))
    loss = float(np.mean([r["train_loss"] if r["status"] == "ok" and r.get("train_loss") is not None else np.nan
                          for r in runs]))
    return mean, loss, any(r["status"] != "ok" for r in runs)


def best_index(acc, loss, diverged):
    """Index of the highest mean score among the lrs where no seed diverged (among equal
    scores, the lowest training loss); None when every lr has a diverged seed."""
    candidates = [i for i in range(len(acc)) if not diverged[i]]
    if not candidates:
        return None
    return max(candidates, key=lambda i: (acc[i], -(loss[i] if np.isfinite(loss[i]) else np.inf)))


def stable_threshold(chance, best_score, threshold=None):
    """The score a stable lr must reach: ``threshold``, or halfway from chance to the best."""
    return threshold if threshold is not None else chance + 0.5 * (best_score - chance)


def regime_of(run) -> str:
    """The run's regime label (see the module's docstring)."""
    if run["status"] != "ok":
        return CATASTROPHIC
    if run.get("regime") in REGIMES:
        return run["regime"]
    regime = Regime()
    for row in run.get("history") or []:
        regime.observe({k: v for k, v in row.items() if v is not None})
    return regime.regime


def summarize(by_width, threshold=None):
    """Per width: lrs, mean score and loss per lr, the regime of each lr (the worst of its
    seeds'), optimal and maximal stable lr."""
    out = {}
    for width in sorted(by_width):
        lrs = sorted(by_width[width])
        runs = [by_width[width][lr] for lr in lrs]
        chance = chance_score(runs[0][0])
        acc, loss, diverged = (np.array(v) for v in zip(*(lr_outcome(rs) for rs in runs)))
        best = best_index(acc, loss, diverged)
        thr = stable_threshold(chance, acc[best], threshold) if best is not None else None
        stable = [] if best is None else [i for i in range(len(lrs)) if not diverged[i] and acc[i] >= thr]
        out[width] = dict(lrs=lrs, acc=acc, loss=loss, diverged=diverged, runs=runs, threshold=thr,
                          regimes=[worst([regime_of(r) for r in rs]) for rs in runs],
                          opt_lr=lrs[best] if best is not None else None, opt_index=best,
                          opt_at_edge=best in (0, len(lrs) - 1),
                          max_stable_lr=lrs[max(stable)] if stable else None,
                          max_stable_index=max(stable) if stable else None,
                          max_stable_at_edge=bool(stable) and max(stable) == len(lrs) - 1)
    return out


__all__ = ["RESULTS", "SWEPT", "ResultsError", "best_index", "chance_score", "experiment_key", "experiments",
           "lr_outcome", "read_results", "regime_of", "score", "stable_threshold", "summarize"]
