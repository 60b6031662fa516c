"""One MLP training run with every statistic tracked by spkern's kernels.

:func:`train` builds a ReLU MLP through :mod:`spkern.experiments.param`, trains it with
:mod:`spkern.optim` (SGD, or AdamW without weight decay for "adam") under
``spkern.cross_entropy`` ("ce") or ``spkern.mse_onehot_loss`` on the logits ("mse",
summed over classes, averaged over the batch) and an :class:`spkern.Tracker`, and returns
a JSON-ready dict: the config, final training and test accuracy and loss, whether and
when it diverged, a history of tracked statistics and the last tracker metrics.

A run diverges when its training loss is NaN, infinite or above ``diverge_loss``; the
check runs on the device and is read after every step on CPU (a diverged run stops at its
first bad loss), at every measurement on a GPU (no host sync per step). Every measurement
is shown to a :class:`spkern.Regime`, whose label the result carries (``regime``,
``regime_step``, ``regime_evidence``); with ``stop_catastrophic`` (default) a run it finds
catastrophic stops there and is recorded as diverged (``stopped_early``, ``steps_not_run``).
"""

import math
import time
from dataclasses import asdict, dataclass, fields

import torch

import spkern
from spkern.experiments import param as P
from spkern.experiments.data import Dataset
from spkern.experiments.train import loop
from spkern.experiments.train.common import check_choices, check_number, json_safe, regime_fields

@dataclass
class RunConfig:
    data: str = "digits"
    width: int = 256
    depth: int = 2
    lr: float = 0.1
    loss: str = "ce"
    optim: str = "sgd"
    param: str = "sp"
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    base_width: int = 64
    bias: bool = False
    momentum: float = 0.0
    dtype: str = "float32"
    track_every: int = 10
    track_first: int = 5
    diverge_loss: float = 100.0
    stop_catastrophic: bool = True

    def check(self):
        check_choices(self)
        if self.optim not in P.OPTIMIZERS:
            raise ValueError(f"optim must be one of {P.OPTIMIZERS}, got {self.optim!r}")
        P.get(self.param)
        for name in ("width", "depth", "epochs", "batch_size", "base_width", "track_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.track_first, int) or self.track_first < 0:
            raise ValueError(f"track_first must be an int >= 0, got {self.track_first!r}")
        check_number(self, "lr", above=0)
        check_number(self, "diverge_loss", above=0)
        check_number(self, "momentum", low=0)
        return self

    def key(self) -> tuple:
        """What identifies a run in a sweep's results."""
        return tuple((f.name, getattr(self, f.name)) for f in fields(self))


def _loss(cfg, out, y):
    if cfg.loss == "ce":
        return spkern.cross_entropy(out, y, return_stats=True)
    per_row, stats = spkern.mse_onehot_loss(out, y, reduction="none", return_stats=True)
    return per_row.mean(), stats


HISTORY_KEYS = ("train/loss", "train/accuracy", "logits/rms", "logits/change_rms")
LAYER_KEYS = ("change_rms", "eff_rms", "prop_rms", "act_rms")


@torch.no_grad()
def evaluate(model, x, y, cfg, batch=2048):
    """(mean loss, accuracy) of model on (x, y)."""
    total, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch]).float()
        loss, stats = _loss(cfg, out, y[i:i + batch])
        total += loss.item() * len(out)
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    return total / len(x), correct / len(x)


def train(cfg: RunConfig, data: Dataset, device=None, progress=None) -> dict:
    """Trains one run; ``progress`` is a tqdm bar over its steps (or None)."""
    cfg.check()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = data.to(device)
    torch.manual_seed(cfg.seed)
    model = P.MLP(data.d_in, cfg.width, cfg.depth, data.n_classes, bias=cfg.bias, param=cfg.param).to(device)
    groups = P.param_groups(model, cfg.param, cfg.optim, cfg.lr, cfg.base_width)
    if cfg.optim == "sgd":
        opt = spkern.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        opt = spkern.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    tracker = spkern.Tracker(model, opt, probe=data.x_train[:256], every=cfg.track_every)
    regime = spkern.Regime().start(tracker)
    n = len(data.x_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    layers = [f"layers.{i}" for i in range(cfg.depth + 1)]

    def batches():  # a fresh order each epoch
        for _epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=g).to(device)
            for b in range(steps_per_epoch):
                yield order[b * cfg.batch_size:(b + 1) * cfg.batch_size]

    def train_step(step, idx):
        with autocast:
            out = model(data.x_train[idx])
        loss, stats = _loss(cfg, out.float(), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        tracker.record_loss(loss, stats)
        opt.step()
        return loss

    def history_row(step, m):
        row = {"step": step, **{k: m.get(k) for k in HISTORY_KEYS}}
        for layer in layers:
            for k in LAYER_KEYS:
                row[f"{layer}/{k}"] = m.get(f"{layer}/{k}")
        return row

    start = time.perf_counter()
    # A diverged run stops at its first bad loss where reading the flag costs nothing (CPU);
    # on a GPU it is read at the measurements only, so that steps do not wait for the host.
    total = cfg.epochs * steps_per_epoch
    history, step, diverged_at, stopped = loop.run(
        batches(), total, train_step, tracker, track_every=cfg.track_every,
        diverge_loss=cfg.diverge_loss, device=device, history_row=history_row,
        check_every_step=device.type == "cpu", progress=progress, regime=regime,
        stop_catastrophic=cfg.stop_catastrophic, track_first=cfg.track_first)
    tracker.close()
    result = {"config": asdict(cfg), "status": "diverged" if diverged_at is not None else "ok",
              "diverged_step": diverged_at, "steps": step, "device": str(device), "n_classes": data.n_classes,
              "seconds": time.perf_counter() - start, "history": history}
    if diverged_at is None:
        result["train_loss"], result["train_acc"] = evaluate(model, data.x_train, data.y_train, cfg)
        result["test_loss"], result["test_acc"] = evaluate(model, data.x_test, data.y_test, cfg)
        result["final_metrics"] = {k: v for k, v in tracker.metrics().items()}
        result["score"], result["chance_score"] = result["train_acc"], 1.0 / data.n_classes
        if not all(math.isfinite(result[k]) for k in ("train_loss", "test_loss")):
            result["status"], result["diverged_step"] = "diverged", step
            regime.diverged(step, "the final training or test loss is not finite")
    result.update(regime_fields(regime, stopped, step, total))
    return json_safe(result)


__all__ = ["RunConfig", "evaluate", "train"]
