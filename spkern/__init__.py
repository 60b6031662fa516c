"""spkern: fused kernels that make width-scaling measurements nearly free.

Functional API: :func:`cross_entropy`. Modules: :class:`CrossEntropyLoss`.
Backends: :func:`use_backend`, the ``SPKERN_BACKEND`` environment variable.
"""

from spkern._backend import BACKENDS, empty_cache, use_backend
from spkern.cross_entropy import LogitStats, cross_entropy, mse_onehot_loss
from spkern.modules import CrossEntropyLoss

__version__ = "0.1.0"

__all__ = ["BACKENDS", "CrossEntropyLoss", "LogitStats", "cross_entropy", "empty_cache", "mse_onehot_loss",
           "use_backend"]
