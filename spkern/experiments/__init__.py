"""The experiments: width x learning-rate sweeps that reproduce the paper's measurements.

param.py   parameterizations (one table of learning-rate exponents by layer role) and the MLP
gpt.py     the GPT model (head loss through spkern's fused linear loss)
data.py    image datasets (digits, MNIST-1D, MNIST, CIFAR-10, a teacher); text.py: tokens
train/     one training loop (loop.py) and the MLP and GPT trainers (mlp.py, gpt.py)
sweep.py   grids of runs, resume, the adaptive grid, locks
report.py  the report: plots, fitted learning-rate exponents
cli.py     the ``spkern`` command (demo, sweep, report, bench, info)

They use the kernel API (spkern's ops, optimizers and tracker) and nothing uses them.
"""
