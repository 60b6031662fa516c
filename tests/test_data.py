"""spkern.experiments.data: the built-in datasets and the readers of MNIST and CIFAR-10 files, on tiny
files written here in the official formats."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from spkern.experiments import data as D


def _write_idx(path, array, gz=False):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,)), gz)
    d = D.load("mnist", str(tmp_path))
    assert d.x_train.shape == (12, 784) and d.x_test.shape == (5, 784) and d.n_classes == 10
    assert d.y_train.dtype == torch.long and d.x_train.dtype == torch.float32
    torch.testing.assert_close(d.x_train.mean(0), torch.zeros(784), atol=1e-5, rtol=0)


def test_mnist_errors(tmp_path):
    with pytest.raises(ValueError, match="root"):
        D.load("mnist")
    with pytest.raises(FileNotFoundError, match="train-images"):
        D.load("mnist", str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="IDX"):
        D.load("mnist", str(tmp_path))


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, n))}, f)
    d = D.load("cifar10", str(tmp_path))
    assert d.x_train.shape == (20, 3072) and d.x_test.shape == (3, 3072)


def test_builtin_datasets():
    digits = D.load("digits")
    assert digits.x_train.shape == (1437, 64) and digits.x_test.shape == (360, 64) and digits.n_classes == 10
    teacher = D.load("teacher")
    assert teacher.x_train.shape == (4000, 32) and teacher.y_train.unique().numel() > 3
    m1d = D.load("mnist1d")
    assert m1d.x_train.shape == (4000, 40) and m1d.x_test.shape == (1000, 40)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load("imagenet")


@pytest.mark.parametrize("damage", ["truncated header", "truncated gzip", "not gzip"])
def test_damaged_mnist_files_name_the_file(tmp_path, damage):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), gz=True)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)), gz=True)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    if damage == "truncated header":
        with gzip.open(bad, "wb") as f:
            f.write(bytes([0, 0, 0x08, 3, 0, 0]))
    elif damage == "truncated gzip":
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        bad.write_bytes(b"plain bytes, no gzip header at all")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: not a readable IDX file"):
        D.load("mnist", str(tmp_path))


def test_damaged_cifar_file_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match="data_batch_1: not a CIFAR-10 batch file"):
        D.load("cifar10", str(tmp_path))
