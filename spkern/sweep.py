"""Width x learning-rate sweeps: a grid of runs, results appended to one JSONL file.

Each finished run is appended to ``<out>/results.jsonl`` (one JSON object per line,
flushed and synced) as soon as it ends; a sweep started again with the same ``out``
skips the runs already there, so a killed sweep loses at most the run in progress. A
diverging run is recorded with the step it diverged at, and the sweep goes on.
"""

import itertools
import json
import math
import os
from dataclasses import fields, replace
from typing import Iterable, List

from spkern.train.mlp import RunConfig

RESULTS = "results.jsonl"


def parse_lrs(text: str) -> List[float]:
    """``"1e-3:10:13"`` (13 log-spaced values from 1e-3 to 10) or ``"0.1,0.3,1"``."""
    try:
        if ":" in text:
            lo, hi, num = text.split(":")
            lo, hi, num = float(lo), float(hi), int(num)
            if lo <= 0 or hi <= 0 or num < 1:
                raise ValueError
            if num == 1:
                return [lo]
            return [lo * (hi / lo) ** (i / (num - 1)) for i in range(num)]
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"learning rates must be 'low:high:count' or a comma list of positive numbers, "
                         f"got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ValueError(f"learning rates must be positive and finite, got {text!r}")
    return values


def grid(base: RunConfig, **axes: Iterable) -> List[RunConfig]:
    """Every combination of the values given per RunConfig field."""
    names = {f.name for f in fields(type(base))}
    for k in axes:
        if k not in names:
            raise ValueError(f"unknown sweep axis {k!r}")
    keys = list(axes)
    return [replace(base, **dict(zip(keys, combo))).check() for combo in itertools.product(*(axes[k] for k in keys))]


def read_results(out: str) -> List[dict]:
    """Every run recorded in ``out``'s results file (a torn last line is ignored)."""
    path = os.path.join(out, RESULTS)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a run interrupted while being written
    return rows


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


def run(configs: List[RunConfig], out: str, data, *, device=None, progress: bool = True, train_fn=None) -> dict:
    """Runs every config not yet in ``out``'s results; returns counts of what happened."""
    from dataclasses import asdict

    from tqdm.auto import tqdm

    from spkern.train.mlp import train

    if train_fn is None:
        if configs and type(configs[0]).__name__ == "GPTRunConfig":
            from spkern.train.gpt import train as train_fn
        else:
            train_fn = train
    os.makedirs(out, exist_ok=True)
    _drop_torn_line(os.path.join(out, RESULTS))
    done = {_key(r["config"]) for r in read_results(out)}
    todo = [c for c in configs if _key(asdict(c)) not in done]
    counts = {"total": len(configs), "skipped": len(configs) - len(todo), "ok": 0, "diverged": 0}
    path = os.path.join(out, RESULTS)
    runs_bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    steps_bar = tqdm(desc="steps", unit="step", leave=False, disable=not progress, dynamic_ncols=True)
    try:
        with open(path, "a") as f:
            for cfg in todo:
                runs_bar.set_postfix_str(f"{cfg.loss} {cfg.optim} {cfg.param} n={cfg.width} lr={cfg.lr:.3g} "
                                         f"seed={cfg.seed}")
                result = train_fn(cfg, data, device=device, progress=steps_bar if progress else None)
                f.write(json.dumps(result) + "\n")
                f.flush()
                os.fsync(f.fileno())
                counts[result["status"]] += 1
                runs_bar.update(1)
    finally:
        steps_bar.close()
        runs_bar.close()
    return counts


__all__ = ["RESULTS", "grid", "parse_lrs", "read_results", "run"]
