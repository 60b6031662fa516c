"""The coordinate check of your own model, in the refined form of Haas et al. (2025).

    check = spkern.coord_check(lambda n: MyModel(width=n), (x, y),
                               lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                               widths=(64, 128, 256, 512, 1024), steps=3)
    check.flags            # layers whose updates grow or shrink with width
    check.plot("coord.png")
    print(check.table())

For each width it builds the model, trains it ``steps`` steps with a :class:`spkern.Tracker`
measuring every step on a fixed probe (the first batch's inputs), and keeps every layer's
feature change ``change_rms`` (rms(h_t - h_0)), effective update ``eff_rms``
(rms((W_t - W_0) x_t)) and propagating update ``prop_rms`` (rms(W_0 (x_t - x_0))), at
every step. The width exponent of a quantity is the slope of log(value) against
log(width) at the last step (least squares over the widths); a layer whose exponent is
above ``tolerance`` grows with width (its updates blow up as the model widens), one below
``-tolerance`` shrinks (its updates vanish): in a parameterization that keeps every
layer's update stable (muP) all exponents are near 0; in standard parameterization at a
fixed learning rate (SGD) the hidden layers' effective updates grow as width^(1/2) and the
output layer's as width^1, the input layer's shrink as width^(-1/2).

``spkern coord-check`` runs it from the command line, on spkern's MLP
(``--param sp|mup|...``, :mod:`spkern.experiments.param`) or on a model factory of yours
(``file.py:function``), on a built-in dataset.
"""

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

METRICS = ("change_rms", "eff_rms", "prop_rms")


@dataclasses.dataclass
class CoordCheck:
    """The result of :func:`coord_check`.

    ``values[metric][layer]``: the value at the last step, one per width (NaN where the
    layer had none); ``history[metric][layer]``: the values at every step, a list per
    width; ``exponents[metric][layer]``: the fitted width exponent (None with fewer than
    two positive values); ``flags``: ``(layer, metric, exponent, "grows" or "shrinks")``
    of every exponent beyond ``tolerance``."""
    widths: List[int]
    steps: int
    tolerance: float
    values: Dict[str, Dict[str, List[float]]]
    history: Dict[str, Dict[str, List[List[float]]]]
    exponents: Dict[str, Dict[str, Optional[float]]]
    flags: List[tuple]

    def table(self) -> str:
        """A markdown table: each layer's exponent of each quantity, flagged ones marked."""
        metrics = list(self.exponents)
        layers = list(next(iter(self.exponents.values()))) if metrics else []
        flagged = {(layer, metric) for layer, metric, _, _ in self.flags}
        lines = ["| layer | " + " | ".join(f"{m} exponent" for m in metrics) + " |",
                 "|---|" + "---|" * len(metrics)]
        for layer in layers:
            cells = []
            for m in metrics:
                e = self.exponents[m].get(layer)
                cells.append("-" if e is None else f"{e:+.2f}" + (" !" if (layer, m) in flagged else ""))
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"Exponents of log(value) against log(width) at step {self.steps}, widths "
                     f"{', '.join(map(str, self.widths))}; ! beyond +-{self.tolerance:g}.")
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None):
        """One panel per quantity, every layer's value at the last step against width
        (log-log), its fitted exponent in the legend; written to ``path`` when given.
        Returns the matplotlib figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        metrics = list(self.values)
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for layer, vals in self.values[metric].items():
                e = self.exponents[metric].get(layer)
                label = f"{layer} ({'-' if e is None else f'{e:+.2f}'})"
                ax.plot(self.widths, vals, marker="o", label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("width")
            ax.set_title(f"{metric} at step {self.steps}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        if path is not None:
            import os

            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


def _batches(data) -> Callable[[int], tuple]:
    """``data`` as a function of the step: one batch (the same every step), a sequence of
    batches (in turn), or a function of the step; a batch is ``(inputs, target)``."""
    if callable(data):
        return data
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple):
        return lambda step: data
    if isinstance(data, Sequence) and len(data) > 0:
        return lambda step: data[step % len(data)]
    raise TypeError("data must be (inputs, target), a sequence of them, or a function of the step giving one")


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _default_loss(out, target):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def fit_exponent(widths, values) -> Optional[float]:
    """The least-squares slope of log(value) against log(width), over the positive finite
    values (None with fewer than two)."""
    pts = [(math.log(w), math.log(v)) for w, v in zip(widths, values) if v is not None and math.isfinite(v) and v > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 0 else None


def coord_check(model_fn: Callable[[int], torch.nn.Module], data, optimizer_fn: Callable, *,
                widths: Sequence[int] = (64, 128, 256, 512), steps: int = 3, loss_fn: Optional[Callable] = None,
                metrics: Sequence[str] = METRICS, tolerance: float = 0.25, seed: int = 0,
                device=None, progress: bool = False, tracker_kwargs: Optional[dict] = None) -> CoordCheck:
    """Trains ``model_fn(width)`` for ``steps`` steps at each width and fits how every
    layer's feature change and refined-coordinate-check updates scale with width (see the
    module docstring).

    Args:
        model_fn: the model of a width.
        data: ``(inputs, target)`` (the same batch every step), a sequence of batches, or
            a function of the step; inputs are a tensor or a dict of keyword arguments.
        optimizer_fn: the optimizer of a model (``lambda m: torch.optim.SGD(m.parameters(),
            lr=0.1)``; per-layer rates, muP's say, are yours to give).
        widths, steps: the widths (at least two) and the steps at each.
        loss_fn: ``loss_fn(output, target)``; default cross-entropy of the logits (an
            output with ``.logits`` too).
        metrics: which tracker quantities (names of :meth:`spkern.Tracker.metrics`).
        tolerance: the exponent beyond which a layer is flagged.
        seed: ``torch.manual_seed`` before each model is built.
        device: where to train (default: where the model is made).
        tracker_kwargs: more arguments of :class:`spkern.Tracker` (``modules=``, ...).
    """
    import spkern

    widths = list(widths)
    if len(widths) < 2 or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be at least two positive ints, got {widths!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    batch = _batches(data)
    loss_fn = loss_fn or _default_loss
    history: Dict[str, Dict[str, List[List[float]]]] = {m: {} for m in metrics}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(widths) * steps, desc="coord-check", unit="step")
    for i, width in enumerate(widths):
        torch.manual_seed(seed)
        model = model_fn(width)
        if device is not None:
            model = model.to(device)
        opt = optimizer_fn(model)
        move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t) if device is not None else (lambda t: t)
        probe_inputs = batch(0)[0]
        probe = ({k: move(v) for k, v in probe_inputs.items()} if isinstance(probe_inputs, dict)
                 else move(probe_inputs))
        tracker = spkern.Tracker(model, opt, probe=probe, **(tracker_kwargs or {}))
        for step in range(steps):
            inputs, target = batch(step)
            inputs = {k: move(v) for k, v in inputs.items()} if isinstance(inputs, dict) else move(inputs)
            opt.zero_grad(set_to_none=True)
            loss_fn(_call(model, inputs), move(target)).backward()
            opt.step()
            m = tracker.metrics()
            for metric in metrics:
                for key, value in m.items():
                    if key.endswith("/" + metric):
                        layer = key[: -len(metric) - 1]
                        runs = history[metric].setdefault(layer, [[] for _ in widths])
                        runs[i].append(value)
            if bar is not None:
                bar.update(1)
        tracker.close()
    if bar is not None:
        bar.close()
    values = {m: {layer: [run[-1] if len(run) == steps else math.nan for run in runs]
                  for layer, runs in layers.items()} for m, layers in history.items()}
    exponents = {m: {layer: fit_exponent(widths, vals) for layer, vals in layers.items()}
                 for m, layers in values.items()}
    flags = [(layer, m, e, "grows" if e > 0 else "shrinks") for m, layers in exponents.items()
             for layer, e in layers.items() if e is not None and abs(e) > tolerance]
    return CoordCheck(widths, steps, float(tolerance), values, history, exponents, flags)


__all__ = ["CoordCheck", "coord_check", "fit_exponent"]
