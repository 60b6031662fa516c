"""Trainers: :mod:`spkern.experiments.train.mlp` (MLP width x learning-rate sweeps)."""
