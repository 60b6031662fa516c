"""Token data for the GPT trainer.

* ``pydoc`` (default): byte-level tokens (vocabulary 256) of the English documentation
  that ships with every CPython, ``pydoc_data/topics.py`` (about 800 KB); the first 90%
  train, the rest validation. ``bytes:PATH`` does the same for any text file.
* ``shards:DIR``: pre-tokenized uint16 token files made elsewhere, in nanoGPT's format
  (``train.bin`` and ``val.bin``: raw little-endian uint16 tokens) or modded-nanogpt's
  (``*train*.bin`` and ``*val*.bin`` shards: a header of 256 int32 with magic 20240520,
  version 1 and the token count, then the uint16 tokens). The vocabulary is taken as
  50304 (GPT-2's, padded) unless given.

Batches are random windows of ``context + 1`` tokens drawn with a seeded generator.
"""

import glob
import os
from dataclasses import dataclass

import numpy as np
import torch

MODDED_MAGIC = 20240520
HEADER_INTS = 256


@dataclass
class Tokens:
    name: str
    train: np.ndarray  # uint8 or uint16 tokens
    val: np.ndarray
    vocab: int

    def batch(self, split: str, batch_size: int, context: int, generator: torch.Generator):
        """(inputs, targets) int64 tensors of shape (batch_size, context)."""
        data = self.train if split == "train" else self.val
        if len(data) < context + 2:
            raise ValueError(f"the {split} split has {len(data)} tokens, fewer than context + 2 = {context + 2}")
        starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator).numpy()
        windows = np.stack([np.asarray(data[s:s + context + 1], dtype=np.int64) for s in starts])
        x = torch.from_numpy(windows[:, :-1].copy())
        y = torch.from_numpy(windows[:, 1:].copy())
        return x, y


def read_shard(path: str) -> np.ndarray:
    """uint16 tokens of one file, in modded-nanogpt's format (detected by its magic) or
    nanoGPT's (raw uint16)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(min(size, 4 * HEADER_INTS))
    head = np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<i4")
    if len(head) >= 3 and head[0] == MODDED_MAGIC:
        if head[1] != 1:
            raise ValueError(f"{path}: unsupported modded-nanogpt shard version {head[1]}")
        n = int(head[2])
        if size != 4 * HEADER_INTS + 2 * n:
            raise ValueError(f"{path}: header says {n} tokens but the file holds {(size - 4 * HEADER_INTS) // 2}")
        return np.memmap(path, dtype="<u2", mode="r", offset=4 * HEADER_INTS, shape=(n,))
    if size % 2:
        raise ValueError(f"{path}: not a uint16 token file (odd size {size})")
    return np.memmap(path, dtype="<u2", mode="r")


def _shards(folder, split):
    if os.path.exists(os.path.join(folder, f"{split}.bin")):
        return [os.path.join(folder, f"{split}.bin")]
    found = sorted(glob.glob(os.path.join(folder, f"*{split}*.bin")))
    if not found:
        raise FileNotFoundError(f"no {split}.bin or *{split}*.bin shards in {folder}")
    return found


def load_tokens(spec: str = "pydoc", vocab: int = None) -> Tokens:
    """Tokens for ``spec``: ``pydoc``, ``bytes:PATH`` or ``shards:DIR``."""
    if spec == "pydoc" or spec.startswith("bytes:"):
        if spec == "pydoc":
            import pydoc_data

            path = os.path.join(os.path.dirname(pydoc_data.__file__), "topics.py")
        else:
            path = spec[len("bytes:"):]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text file {path!r} not found")
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
        cut = int(0.9 * len(data))
        return Tokens(spec, data[:cut], data[cut:], 256)
    if spec.startswith("shards:"):
        folder = spec[len("shards:"):]
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"shard folder {folder!r} not found")
        train = np.concatenate([read_shard(p) for p in _shards(folder, "train")])
        val = np.concatenate([read_shard(p) for p in _shards(folder, "val")])
        v = vocab or 50304
        top = int(max(train.max(initial=0), val.max(initial=0)))
        if top >= v:
            raise ValueError(f"shards hold token {top}, outside the vocabulary of {v} (pass vocab)")
        return Tokens(spec, train, val, v)
    raise ValueError(f"unknown token data {spec!r}: use 'pydoc', 'bytes:PATH' or 'shards:DIR'")


def write_modded_shard(path: str, tokens) -> None:
    """Writes tokens in modded-nanogpt's shard format (for tests and small corpora)."""
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MODDED_MAGIC, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())


__all__ = ["Tokens", "load_tokens", "read_shard", "write_modded_shard"]
