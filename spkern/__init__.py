"""spkern: fused kernels that make width-scaling measurements nearly free.

Functional API: :func:`cross_entropy`, :func:`mse_onehot_loss`, :func:`linear_cross_entropy`,
:func:`linear_mse_onehot_loss`, :func:`multi_tensor_norms`, :func:`spectral_norm`,
:func:`spectral_norm_steps`, :func:`pair_stats`, :func:`multi_pair_stats`. The metric tracker: :class:`Tracker`. Modules: :class:`CrossEntropyLoss`, :class:`LinearCrossEntropyLoss`.
Backends: :func:`use_backend`, the ``SPKERN_BACKEND`` environment variable.
"""

from spkern import optim
from spkern.registry import BACKENDS, empty_cache, use_backend
from spkern.cross_entropy import LogitStats, cross_entropy, mse_onehot_loss
from spkern.linear_loss import linear_cross_entropy, linear_mse_onehot_loss
from spkern.modules import CrossEntropyLoss, LinearCrossEntropyLoss
from spkern.constants import Sum
from spkern.features import multi_pair_stats, pair_stats
from spkern.norms import SpectralNorm, multi_tensor_norms, spectral_norm, spectral_norm_steps
from spkern.monitor import Tracker

__version__ = "0.1.0"

__all__ = ["BACKENDS", "CrossEntropyLoss", "LinearCrossEntropyLoss", "LogitStats", "cross_entropy",
           "SpectralNorm", "empty_cache", "linear_cross_entropy", "linear_mse_onehot_loss",
           "mse_onehot_loss", "multi_pair_stats", "multi_tensor_norms", "optim", "pair_stats", "spectral_norm",
           "spectral_norm_steps", "Sum", "Tracker", "use_backend"]
