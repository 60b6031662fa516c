"""spkern: fused kernels that make width-scaling measurements nearly free.

Functional API: :func:`cross_entropy`, :func:`mse_onehot_loss`, :func:`linear_cross_entropy`,
:func:`linear_mse_onehot_loss`, :func:`multi_tensor_norms`, :func:`spectral_norm`,
:func:`spectral_norm_steps`, :func:`pair_stats`, :func:`multi_pair_stats`. The metric
tracker: :class:`Tracker`; the regime of a run: :class:`Regime`. Modules:
:class:`CrossEntropyLoss`, :class:`LinearCrossEntropyLoss`. Backends: :func:`use_backend`,
the ``SPKERN_BACKEND`` environment variable. Submodules: ``spkern.optim``,
``spkern.functional``, ``spkern.hf`` (transformers), ``spkern.lightning``,
``spkern.monitor``, ``spkern.regime``, ``spkern.features``, ``spkern.norms``,
``spkern.vocab_parallel`` (tensor-parallel losses), ``spkern.experiments``.

Everything is imported when first used (``import spkern`` does not import torch), so that
the ``spkern`` command starts at once.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# name -> the module that defines it
_NAMES = {
    "BACKENDS": "spkern.registry", "empty_cache": "spkern.registry", "use_backend": "spkern.registry",
    "LogitStats": "spkern.cross_entropy", "cross_entropy": "spkern.cross_entropy",
    "mse_onehot_loss": "spkern.cross_entropy",
    "linear_cross_entropy": "spkern.linear_loss", "linear_mse_onehot_loss": "spkern.linear_loss",
    "CrossEntropyLoss": "spkern.modules", "LinearCrossEntropyLoss": "spkern.modules",
    "Sum": "spkern.constants",
    "multi_pair_stats": "spkern.features", "pair_stats": "spkern.features",
    "SpectralNorm": "spkern.norms", "multi_tensor_norms": "spkern.norms", "spectral_norm": "spkern.norms",
    "spectral_norm_steps": "spkern.norms",
    "Tracker": "spkern.monitor",
    "coord_check": "spkern.coord",
    "Regime": "spkern.regime",
}
_SUBMODULES = ("backends", "compile_check", "constants", "coord", "cpu_isa", "cross_entropy", "distributed",
               "experiments", "features", "functional", "hf", "info", "lightning", "linear_loss", "modules", "monitor",
               "norms", "optim", "regime", "registry", "vocab_parallel")

__all__ = sorted(_NAMES) + ["optim"]


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"spkern.{name}")
    else:
        raise AttributeError(f"module 'spkern' has no attribute {name!r}")
    globals()[name] = value  # (once: later reads find it here)
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES) | set(_SUBMODULES))


class _Package(types.ModuleType):
    """The import system sets a submodule as an attribute of its package once imported;
    where a function has the submodule's name (``spkern.cross_entropy``) the function
    keeps it."""

    def __setattr__(self, name, value):
        if name in _NAMES and isinstance(value, types.ModuleType) and value.__name__ == f"spkern.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _TorchFirst:
    """``import spkern._C`` imports torch first: the extension links against its libraries
    (which ``import torch`` loads), and ``import spkern`` alone no longer imports torch."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "spkern._C":
            import torch  # noqa: F401
        return None


sys.meta_path.insert(0, _TorchFirst)
