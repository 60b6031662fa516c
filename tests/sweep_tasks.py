"""Stand-ins for training runs, importable by the Ray workers of tests/test_sweep_ray.py (the
tests put this folder on their PYTHONPATH)."""

import math
import os
import time
from dataclasses import asdict


def landscape(cfg, data=None, device=None, progress=None):
    """The score peaks at lr = 8 / width (and stays high up to the edge of stability at
    16 / width), every run above that diverges; ``data``, when given, is seconds to sleep."""
    if data:
        time.sleep(data)
    edge, best = 16.0 / cfg.width, 8.0 / cfg.width
    r = {"config": asdict(cfg), "n_classes": 10, "chance_score": 0.1, "seconds": 0.0, "history": [], "steps": 10}
    if cfg.lr > edge * 1.0001:
        return {**r, "status": "diverged", "diverged_step": 3}
    distance = abs(math.log(cfg.lr / best))
    return {**r, "status": "ok", "diverged_step": None, "score": max(0.1, 1.0 - 0.2 * distance) - 1e-3 * cfg.seed,
            "train_loss": 0.1 + distance}


def dies_once(cfg, data=None, device=None, progress=None):
    """landscape, but the worker process running a run at the smallest width dies the first
    time (``data``: the folder of the marks)."""
    mark = os.path.join(data, f"{cfg.width}-{cfg.lr:.6g}-{cfg.seed}")
    if cfg.width == 16 and not os.path.exists(mark):
        open(mark, "w").close()
        os._exit(1)
    return landscape(cfg)
