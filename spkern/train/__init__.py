"""Trainers: :mod:`spkern.train.mlp` (MLP width x learning-rate sweeps)."""
