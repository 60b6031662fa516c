"""The monitor: the metric tracker and its parts, one responsibility each.

tracker.py    :class:`Tracker`: the parts put together; steps, metrics(), state_dict()
selection.py  which layers and parameters are tracked
layers.py     what a layer is to the tracker and how it applies its weight (the extension
              point: :func:`register_layer`)
reference.py  W_0, each layer's θ_0, and the initial state (probe="batch")
probes.py     the probes: a fixed batch, the first batch, or the training batch
record.py     the layers' applications in the tracker's passes and in training forwards
capture.py    the tracker's own passes (no autocast; modes, RNG and written tensors restored;
              F.linear seen)
measure.py    one measurement: the definition of every quantity, the products f(x; θ), the sums
opnorms.py    op(W_t - W_0) and op(W_0)
params.py     parameter statistics: the protocol the tracker reads them through, the adapter
              for any torch optimizer, and the values of a measurement
values.py     metrics as sums, and their reduction (over the ranks under torch.distributed)
log.py        metrics.jsonl, TensorBoard and Weights & Biases
"""

from spkern.monitor.layers import LinearMap, register_layer
from spkern.monitor.params import StepStats, TorchStepStats
from spkern.monitor.tracker import Tracker

__all__ = ["LinearMap", "StepStats", "TorchStepStats", "Tracker", "register_layer"]
