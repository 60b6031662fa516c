"""The training loop both trainers use: steps, divergence, measurements, progress.

A trainer gives the loop its steps (an iterable, one item per optimizer step) and a
``train_step(step, item)`` that runs the forward, backward and optimizer step and returns
the step's training loss (a device scalar; the tracker has it already). The loop keeps
the first step whose loss was NaN, infinite or above ``diverge_loss`` in a device flag,
reads it at every measurement (and after every step where ``check_every_step``: on CPU,
where reading costs nothing, a diverged run stops at its first bad loss) and stops there;
at every ``track_every``-th step, each of the first ``track_first`` and the last (and at
step 0, when the tracker measured before training) it appends ``history_row(step, metrics)``,
``step`` the one the metrics were measured at (a step the tracker does not measure itself
is measured on its probe then). Each measurement is shown
to ``regime`` (a :class:`spkern.Regime`); with ``stop_catastrophic`` a run it finds
catastrophic stops there, as a diverged one.
"""

import torch


def run(items, total, train_step, tracker, *, track_every, diverge_loss, device, history_row,
        check_every_step=False, progress=None, regime=None, stop_catastrophic=False, track_first=0):
    """Runs the steps; returns (history, steps done, the diverged step or None, whether the
    regime stopped it)."""
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    history, done = [], 0
    if tracker.measured_step == 0:  # (a measurement before training: the initial values)
        history.append(history_row(0, tracker.metrics()))
    if progress is not None:
        progress.reset(total=total)
    for item in items:
        loss = train_step(done, item)
        bad = ~torch.isfinite(loss) | (loss > diverge_loss)
        first_bad = torch.where((first_bad < 0) & bad, torch.full_like(first_bad, done), first_bad)
        done += 1
        if progress is not None:
            progress.update(1)
        measure = done % track_every == 0 or done == total or done <= track_first
        if measure or check_every_step:
            fb = int(first_bad.item())
            if fb >= 0:
                if regime is not None:
                    regime.diverged(fb + 1, f"the training loss of step {fb + 1} is NaN, infinite or above "
                                            f"{diverge_loss:g}")
                return history, done, fb, False
        if measure:
            if tracker.measured_step != done and tracker.probe is not None:
                tracker.measure()  # (one of the first steps, or the last, between two measured ones)
            m = tracker.metrics()
            if not history or history[-1]["step"] != m["step"]:
                history.append(history_row(m["step"], m))
            if regime is not None and regime(m) and stop_catastrophic:
                return history, done, regime.step, True
    return history, done, None, False
