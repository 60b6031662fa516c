"""The monitor: the metric tracker and its parts.

tracker.py  :class:`Tracker`: which modules, the probes (fixed, first batch, training
            batch), the hooks that measure
capture.py  the tracker's own passes (modes, RNG and buffers restored; F.linear captured)
params.py   parameter statistics: the protocol the tracker reads them through, and the
            adapter for any torch optimizer
values.py   metrics as sums, and their reduction (over the ranks under torch.distributed)
layers.py   which layers get the refined coordinate check and how they apply their weight
            (the extension point: :func:`register_layer`)
log.py      metrics.jsonl, TensorBoard and Weights & Biases
"""

from spkern.monitor.layers import LinearMap, register_layer
from spkern.monitor.params import StepStats, TorchStepStats
from spkern.monitor.tracker import Tracker

__all__ = ["LinearMap", "StepStats", "TorchStepStats", "Tracker", "register_layer"]
