"""Where the tracker writes: ``metrics.jsonl`` (one JSON object a measurement,
non-finite values as null) and TensorBoard scalars (when tensorboard is installed)."""

import json
import math
import os
import warnings


class MetricsLog:
    """Appends measurements to ``log_dir/metrics.jsonl`` and TensorBoard events there."""

    def __init__(self, log_dir):
        os.makedirs(log_dir, exist_ok=True)
        self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a")
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir)
        except ImportError:
            warnings.warn("tensorboard is not installed: the tracker writes metrics.jsonl only",
                          RuntimeWarning, stacklevel=3)

    def write(self, m):
        """Appends one measurement, ``{name: float}`` with its ``step``."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                          for k, v in m.items()}) + "\n")
            self._jsonl.flush()
        if self._writer is not None:
            for k, v in m.items():
                if k != "step":
                    self._writer.add_scalar(k, v, m["step"])
            self._writer.flush()

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
