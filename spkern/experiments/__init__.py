"""The experiments: width x learning-rate sweeps that reproduce the paper's measurements.

In layers, each importing only those below it:

results.py  the bottom: the results file, and what a run and a learning rate came to (score,
            optimum, maximal stable rate, regime)
param.py    parameterizations (one table of learning-rate exponents by layer role) and the MLP
gpt.py      the GPT model (head loss through spkern's fused linear loss)
data.py     image datasets (digits, MNIST-1D, MNIST, CIFAR-10, a teacher); text.py: tokens
options.py  the sweeps' options and defaults (the demo's), generated from the run configs
train/      what the trainers share (common.py: option tables, checks, the torchrun set-up),
            one training loop (loop.py) and the MLP and GPT trainers (mlp.py, gpt.py)
sweep.py    grids of runs, resume, the adaptive grid, locks (reads results, runs the trainers)
report.py   the report: plots, fitted learning-rate exponents, the regime map (reads results)
cli.py      the top: the ``spkern`` command (demo, sweep, report, coord-check, bench, info);
            nothing imports it

They use the kernel API (spkern's ops, optimizers, tracker and :mod:`spkern.regime`) and
nothing in it uses them.
"""
