"""Classification data with no download, and real datasets read from local files.

``load(name, root=None)`` returns a :class:`Dataset` of float32 features (flattened,
standardised with the training statistics) and int64 labels:

* ``digits``: scikit-learn's 1,797 handwritten 8x8 digits (ships with scikit-learn);
  a fixed 80/20 split.
* ``mnist1d``: MNIST-1D, generated procedurally by the ``mnist1d`` package (4,000 train
  and 1,000 test sequences of length 40).
* ``teacher``: a synthetic task: Gaussian inputs (dimension 32) labelled by the argmax
  of a fixed random ReLU teacher network (10 classes), 4,000 train and 1,000 test.
* ``mnist``: MNIST from ``root`` in its official IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
  optionally gzipped).
* ``cifar10``: CIFAR-10 from ``root`` in its official Python format
  (``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, or those files in root).
"""

import gzip
import os
import pickle
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("digits", "mnist1d", "teacher", "mnist", "cifar10")


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def d_in(self) -> int:
        return self.x_train.shape[1]

    def to(self, device):
        return Dataset(self.name, self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                       self.y_test.to(device), self.n_classes)


def _finish(name, x_train, y_train, x_test, y_test, n_classes):
    x_train = np.asarray(x_train, dtype=np.float64).reshape(len(x_train), -1)
    x_test = np.asarray(x_test, dtype=np.float64).reshape(len(x_test), -1)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0
    f = lambda a: torch.from_numpy((a - mean) / std).float()  # noqa: E731
    labels = lambda a: torch.from_numpy(np.array(a, dtype=np.int64).reshape(-1))  # noqa: E731
    return Dataset(name, f(x_train), labels(y_train), f(x_test), labels(y_test), n_classes)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    cut = int(0.8 * len(order))
    tr, te = order[:cut], order[cut:]
    return _finish("digits", d.data[tr], d.target[tr], d.data[te], d.target[te], 10)


def _mnist1d():
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise RuntimeError("the mnist1d dataset needs the mnist1d package: pip install mnist1d") from e
    args = get_dataset_args()
    args.seed = 42
    d = make_dataset(args)
    return _finish("mnist1d", d["x"], d["y"], d["x_test"], d["y_test"], 10)


def _teacher(n_train=4000, n_test=1000, d=32, classes=10, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, d, generator=g, dtype=torch.float64)
    w1 = torch.randn(d, width, generator=g, dtype=torch.float64) / d**0.5
    w2 = torch.randn(width, classes, generator=g, dtype=torch.float64) / width**0.5
    y = (torch.relu(x @ w1) @ w2).argmax(1)
    return _finish("teacher", x[:n_train].numpy(), y[:n_train].numpy(), x[n_train:].numpy(),
                   y[n_train:].numpy(), classes)


def _idx_file(root, base) -> np.ndarray:
    """The array of ``root/base`` or ``root/base.gz``; a damaged file is a ValueError naming it."""
    for name in (base, base + ".gz"):
        path = os.path.join(root, name)
        if os.path.exists(path):
            try:
                with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as f:
                    return read_idx(f)
            except (ValueError, struct.error, EOFError, OSError, zlib.error) as e:
                raise ValueError(f"{path}: not a readable IDX file ({e or type(e).__name__})") from None
    raise FileNotFoundError(f"{base}[.gz] not found in {root}")


def read_idx(f) -> np.ndarray:
    """An array from an IDX file (the format of the MNIST files)."""
    magic = f.read(4)
    if len(magic) != 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != 0x08:
        raise ValueError("not an IDX file of unsigned bytes")
    ndim = magic[3]
    header = f.read(4 * ndim)
    if len(header) != 4 * ndim:
        raise ValueError(f"IDX header cut short ({len(header)} of {4 * ndim} bytes of dimensions)")
    shape = struct.unpack(">" + "I" * ndim, header)
    data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"IDX file holds {data.size} values, its header says {shape}")
    return data.reshape(shape)


def _mnist(root):
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _idx_file(root, f"{prefix}-images-idx3-ubyte")
        labels = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
        if len(images) != len(labels):
            raise ValueError(f"MNIST {split}: {len(images)} images but {len(labels)} labels")
        parts[split] = (images.astype(np.float64) / 255.0, labels)
    return _finish("mnist", *parts["train"], *parts["test"], 10)


def _cifar10(root):
    folder = os.path.join(root, "cifar-10-batches-py")
    folder = folder if os.path.isdir(folder) else root

    def batch(name):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"CIFAR-10 file {name} not found in {folder}")
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            return np.asarray(d[b"data"], dtype=np.float64) / 255.0, np.asarray(d[b"labels"])
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 batch file ({type(e).__name__}: {e})") from None

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = batch("test_batch")
    return _finish("cifar10", np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
                   x_test, y_test, 10)


def load(name: str = "digits", root: str = None) -> Dataset:
    """The dataset called ``name`` (see the module docstring); ``root`` is the folder of
    the files of ``mnist`` and ``cifar10``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    if name in ("mnist", "cifar10"):
        if not root:
            raise ValueError(f"the {name} dataset is read from local files: pass its folder as root (--data-root)")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data root {root!r} is not a folder")
        return _mnist(root) if name == "mnist" else _cifar10(root)
    return {"digits": _digits, "mnist1d": _mnist1d, "teacher": _teacher}[name]()


__all__ = ["DATASETS", "Dataset", "load", "read_idx"]
