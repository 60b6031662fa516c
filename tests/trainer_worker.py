"""Run by tests/test_hf.py, alone or under ``torch.distributed.run``: transformers' Trainer
on a tiny GPT-2 with spkern's callback, the same global batch of 4 rows a step (4 rows in
one process, 2 a rank in two), in order; rank 0 writes the tracker's logged entries."""

import json
import os
import sys

import torch
import transformers

import spkern.hf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import end_process_group  # noqa: E402
from test_hf import Tokens, _model  # noqa: E402


def main(out):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = transformers.TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out), f"run{world}"), max_steps=3, per_device_train_batch_size=4 // world,
        use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", train_sampling_strategy="sequential",
        learning_rate=1e-2, ddp_backend="gloo" if world > 1 else None)
    callback = spkern.hf.SpkernCallback(probe="batch")
    trainer = transformers.Trainer(model=_model("gpt2"), args=args, train_dataset=Tokens(16), callbacks=[callback])
    trainer.train()
    logged = {h["step"]: {k: v for k, v in h.items() if k.startswith("spkern/")}
              for h in trainer.state.log_history if any(k.startswith("spkern/") for k in h)}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "logged": logged,
                       "distributed": torch.distributed.is_initialized()}, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group(wait=True)
