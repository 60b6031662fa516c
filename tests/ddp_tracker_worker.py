"""Run by tests/test_tracker.py, alone or under ``torch.distributed.run``: trains a small
MLP with DDP (gloo) on an equal share of a fixed batch per process, tracked on a share
of a probe and on the training batch, and writes rank 0's metrics as JSON."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import spkern

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import end_process_group  # noqa: E402


def main(out):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 10, generator=g), torch.randint(0, 5, (64,), generator=g)
    probe = torch.randn(32, 10, generator=g)
    share = lambda t: t.chunk(world)[rank]  # noqa: E731
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    on_probe = spkern.Tracker(model, opt, probe=share(probe), row_l2=True)
    on_batch = spkern.Tracker(model, opt, probe="batch", row_l2=True)
    for _ in range(3):
        opt.zero_grad()
        loss, stats = spkern.cross_entropy(net(share(x)), share(y), return_stats=True)
        loss.backward()
        on_batch.record_loss(loss, stats)
        opt.step()
    result = {"world": world, "probe": on_probe.metrics(), "batch": on_batch.metrics()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
