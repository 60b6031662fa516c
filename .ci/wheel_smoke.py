"""Run by .ci/run in a fresh virtual environment holding only the built wheel and its
requirements (torch, no triton), from a folder outside the checkout: the package imports
from site-packages with its compiled extension and its data, and a loss, an optimizer
step, a tracker measurement and `spkern info` work."""

import os
import re
import subprocess
import sys

import torch
import torch.nn.functional as F

import spkern

here = os.path.dirname(os.path.abspath(spkern.__file__))
assert "site-packages" in here, f"spkern imported from {here}, not the installed wheel"
C = spkern.registry.compiled()
assert C is not None, spkern.registry.compiled_reason()
isas = spkern.cpu_isa.compiled()
assert isas == ["default", "avx2", "avx512"], isas  # (one wheel for every x86-64 CPU)
assert spkern.cpu_isa.current() == spkern.cpu_isa.supported()[-1]

torch.manual_seed(0)
x = torch.randn(8, 50, requires_grad=True)
y = torch.randint(0, 50, (8,))
loss, stats = spkern.cross_entropy(x, y, return_stats=True)
torch.testing.assert_close(loss, F.cross_entropy(x, y))
for isa in spkern.cpu_isa.supported():  # each copy of the CPU kernels this CPU runs
    with spkern.cpu_isa.use(isa):
        torch.testing.assert_close(spkern.cross_entropy(x, y), F.cross_entropy(x, y))
loss.backward()
assert spkern.registry.resolve("cross_entropy", x).backend == "cpu"

model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
opt = spkern.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
tracker = spkern.Tracker(model, opt, probe=torch.randn(4, 10))
for _ in range(2):
    opt.zero_grad()
    loss, stats = spkern.cross_entropy(model(torch.randn(16, 10)), torch.randint(0, 5, (16,)), return_stats=True)
    loss.backward()
    tracker.record_loss(loss, stats)
    opt.step()
metrics = tracker.metrics()
assert metrics["2/eff_rms"] > 0 and metrics["0.weight/update_rms"] > 0, metrics
info = subprocess.run([sys.executable, "-m", "spkern", "info"], capture_output=True, text=True, check=True).stdout
assert f"CPU kernels for {', '.join(isas)}" in info and re.search(r"^triton +not installed", info, re.M), info
print(f"wheel smoke test: ok ({here}, spkern._C CPU kernels {', '.join(isas)}, running {spkern.cpu_isa.current()}, {len(metrics)} metrics)")
