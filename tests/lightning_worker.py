"""Run by tests/test_lightning.py, alone or under ``torch.distributed.run``: a
lightning.Trainer with spkern's callback, the same global batch of 8 rows a step (8 rows in
one process, 4 a rank in two, in order); rank 0 writes what the callback logged."""

import json
import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spkern.lightning  # noqa: E402
from conftest import end_process_group  # noqa: E402
from test_lightning import Memory, Net  # noqa: E402


def main(out):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 10, generator=g), torch.randint(0, 5, (32,), generator=g))
    logger = Memory()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                        callbacks=[spkern.lightning.SpkernCallback(probe="batch")], logger=logger,
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, use_distributed_sampler=False)
    sampler = (torch.utils.data.distributed.DistributedSampler(ds, num_replicas=world, rank=int(os.environ["RANK"]),
                                                              shuffle=False) if world > 1 else None)
    # (rank r gets rows r, r + 2, ...: the two ranks' batches are the one process's batch)
    trainer.fit(Net(), torch.utils.data.DataLoader(ds, batch_size=8 // world, sampler=sampler))
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump({"world": trainer.world_size, "logged": logger.logged}, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group(wait=True)
