"""GPT training runs: the fused head loss, the tracker, AdamW or SGD, one process or
data-parallel (DDP) across several.

    python -m spkern.experiments.train.gpt --width 128 --lr 3e-3 --steps 200 --out run.json
    torchrun --nproc_per_node=2 -m spkern.experiments.train.gpt --width 128 --lr 3e-3 --out run.json

Under ``torchrun`` each process trains on its slice of every global batch (the same
global batch as one process would draw: all ranks share the sampler's seed), gradients
are averaged by DDP (gloo on CPU, NCCL on GPU), the loss, the logit statistics and the
tracker's statistics are averaged over the ranks, and only rank 0 writes results.

With ``--fsdp`` the model is sharded instead (FSDP2: ``fully_shard`` on every block and on
the root; each rank holds a shard of every parameter, of W_0 and of the optimizer state).
With ``--dtype bfloat16`` the sharded parameters stay float32 and FSDP2's mixed-precision
policy gathers them in bfloat16 for forward and backward (gradients reduced in float32),
in place of autocast. The optimizer steps the shards; its statistics and the tracker's are
the whole model's.

    torchrun --nproc_per_node=2 -m spkern.experiments.train.gpt --fsdp --width 128 --out run.json

With ``--tp N`` every layer is split over N processes (tensor parallelism, as torchtitan
does: each rank its attention heads and MLP units, ``ColwiseParallel`` / ``RowwiseParallel``,
the head's weight split over the vocabulary for spkern's vocabulary-parallel fused loss);
with more processes than N, ``--fsdp`` shards the rest data-parallel on a 2-D mesh (dp x
tp). The tracker measures the split layers without gathering their weights.

    torchrun --nproc_per_node=2 -m spkern.experiments.train.gpt --tp 2 --width 128 --out run.json
    torchrun --nproc_per_node=4 -m spkern.experiments.train.gpt --tp 2 --fsdp --width 128 --out run.json

Learning rate: linear warm-up over ``warmup`` steps, then cosine decay to
``min_lr_frac * lr`` at the last step, applied to every group's own rate (the per-layer
rates of the parameterization). AdamW decays matrices only; gradients are clipped to
``clip`` (0: off). The score of a run is minus its validation cross-entropy (whatever the
training loss), so that the sweep report can compare CE and MSE runs.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

import spkern
from spkern.distributed import rank_and_world
from spkern.experiments.gpt import GPT, GPTConfig, tensor_parallel
from spkern.experiments.train import loop
from spkern.experiments.options import GPT_HELP, config_options as _config_options
from spkern.experiments.train.common import (DTYPES, LOSSES, check_choices, check_number, json_safe, regime_fields,
                                             torchrun)


_MODEL = GPTConfig()  # the model's fields take the model's own defaults


@dataclass
class GPTRunConfig:
    data: str = "pydoc"
    width: int = _MODEL.width
    depth: int = _MODEL.depth
    head_dim: int = _MODEL.head_dim
    context: int = _MODEL.context
    qk_norm: bool = _MODEL.qk_norm
    param: str = _MODEL.param
    base_width: int = _MODEL.base_width
    loss: str = "ce"
    optim: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.1
    momentum: float = 0.9
    warmup: int = 20
    min_lr_frac: float = 0.1
    steps: int = 150
    batch_size: int = 16
    grad_accum: int = 1
    clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    fsdp: bool = False
    tp: int = 1
    track_every: int = 25
    track_first: int = 5
    eval_batches: int = 8
    diverge_loss: float = 100.0
    stop_catastrophic: bool = True

    def check(self):
        check_choices(self)
        if self.optim not in ("sgd", "adam"):
            raise ValueError(f"optim must be 'sgd' or 'adam', got {self.optim!r}")
        self.model_config().check()  # width, depth, head_dim, context, base_width, param
        for name in ("steps", "batch_size", "grad_accum", "track_every", "eval_batches", "tp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not isinstance(self.track_first, int) or self.track_first < 0:
            raise ValueError(f"track_first must be an int >= 0, got {self.track_first!r}")
        check_number(self, "lr", above=0)
        check_number(self, "diverge_loss", above=0)
        for name in ("weight_decay", "momentum", "clip", "min_lr_frac"):
            check_number(self, name, low=0)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        return self

    def model_config(self, vocab: int = 256) -> GPTConfig:
        """The model part of this run's configuration."""
        return GPTConfig(vocab=vocab, width=self.width, depth=self.depth, head_dim=self.head_dim,
                         context=self.context, qk_norm=self.qk_norm, param=self.param, base_width=self.base_width)


def lr_factor(step: int, cfg: GPTRunConfig) -> float:
    """Warm-up then cosine decay, for the update of step ``step`` (0-based)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    t = min((step - cfg.warmup) / span, 1.0)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))


def _mean_over_ranks(t):
    rank, world = rank_and_world()
    if world > 1:
        torch.distributed.all_reduce(t)
        t /= world
    return t


@torch.no_grad()
def evaluate(model, tokens, cfg, device):
    """Mean validation cross-entropy over ``eval_batches`` fixed batches."""
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = tokens.batch("val", cfg.batch_size, cfg.context, g)
        # (through forward, where FSDP2 gathers the parameters)
        total += model(x.to(device), y.to(device), "ce", return_stats=False).item()
    return total / cfg.eval_batches


def train(cfg: GPTRunConfig, tokens=None, device=None, progress=None) -> dict:
    """Trains one GPT run (in every process of a torch.distributed job)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from spkern.experiments.text import load_tokens

    cfg.check()
    rank, world = rank_and_world()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mesh = _mesh(cfg, world, device)
    dp, dp_rank = (mesh["dp"].size(), mesh["dp"].get_local_rank()) if mesh is not None else (world, rank)
    micro = cfg.batch_size // cfg.grad_accum
    if micro % dp:
        raise ValueError(f"batch_size / grad_accum ({micro}) must be a multiple of the number of data-parallel "
                         f"processes ({dp})")
    tokens = tokens or load_tokens(cfg.data)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config(tokens.vocab)).to(device)
    if cfg.tp > 1:
        tensor_parallel(model, mesh["tp"])
    if cfg.fsdp:
        shard(model, bfloat16=cfg.dtype == "bfloat16", mesh=mesh["dp"] if mesh is not None else None)
    groups = model.param_groups(cfg.optim, cfg.lr, cfg.weight_decay if cfg.optim == "adam" else 0.0)
    if cfg.optim == "adam":
        opt = spkern.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    else:
        opt = spkern.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    base_lrs = [g["lr"] for g in opt.param_groups]
    g_probe = torch.Generator().manual_seed(999)
    probe, probe_targets = (t.to(device) for t in tokens.batch("val", 4, cfg.context, g_probe))
    tracker = spkern.Tracker(model, opt, probe=probe, every=cfg.track_every, output_key="final_hidden",
                             modules=[r"tok", r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc|proj))", r"ln_f"])
    regime = spkern.Regime().start(tracker)  # (a collective under torch.distributed, as every measurement)
    with torch.no_grad():  # the logits' initial scale, as the fused loss measures it in training
        norm = model(probe, probe_targets, cfg.loss)[1].logit_norm.float().mean()
        regime.initial({"train/logit_rms": norm / math.sqrt(tokens.vocab)})
    ddp = DDP(model) if world > 1 and not cfg.fsdp and cfg.tp == 1 else model
    sampler = torch.Generator().manual_seed(cfg.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16" and not cfg.fsdp)
    lo, hi = dp_rank * (micro // dp), (dp_rank + 1) * (micro // dp)  # (the tensor-parallel ranks share rows)
    factors = []

    def train_step(step, _):
        f = lr_factor(step, cfg)
        factors.append(f)
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * f
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        stat_sums = torch.zeros(5, device=device)
        for k in range(cfg.grad_accum):
            x, y = tokens.batch("train", micro, cfg.context, sampler)  # the global micro-batch
            x, y = x[lo:hi].to(device), y[lo:hi].to(device)
            sync = k == cfg.grad_accum - 1 or world == 1
            ctx = ddp.no_sync() if (ddp is not model and not sync) else _nullcontext()
            with ctx:
                with autocast:
                    loss, stats = _loss(ddp, model, x, y, cfg.loss)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
            stat_sums += torch.stack([stats.logit_norm.float().mean(), stats.logit_max.float().mean(),
                                      stats.max_prob.float().mean(), stats.entropy.float().mean(),
                                      stats.correct.float().mean()])
        means = _mean_over_ranks(torch.cat([loss_sum.reshape(1), stat_sums]) / cfg.grad_accum)
        tracker.record_loss(means[0], **dict(zip(("logit_norm", "logit_max", "max_prob", "entropy", "accuracy"),
                                                  means[1:])), logit_rms=means[1] / math.sqrt(tokens.vocab))
        if cfg.clip > 0:  # (tensor-parallel: parameters on two meshes and plain ones together)
            (clip_grad_norm if cfg.tp > 1 else torch.nn.utils.clip_grad_norm_)(model.parameters(), cfg.clip)
        opt.step()
        return means[0]

    def history_row(step, m):
        return {"step": step, "lr_factor": factors[-1] if factors else None,
                **{k: v for k, v in m.items() if k.startswith(("train/", "final_hidden/"))
                   or k.endswith(("/change_rms", "/eff_rms", "/prop_rms"))}}

    start = time.perf_counter()
    history, step, diverged_at, stopped = loop.run(
        range(cfg.steps), cfg.steps, train_step, tracker, track_every=cfg.track_every,
        diverge_loss=cfg.diverge_loss, device=device, history_row=history_row, progress=progress, regime=regime,
        stop_catastrophic=cfg.stop_catastrophic, track_first=cfg.track_first)
    last = tracker.metrics() if tracker.measurements else {}  # (every rank: a collective)
    tracker.close()
    result = {"config": asdict(cfg), "task": "gpt", "status": "diverged" if diverged_at is not None else "ok",
              "diverged_step": diverged_at, "steps": step, "device": str(device), "processes": world,
              "seconds": time.perf_counter() - start, "history": history, "last_measurement": last,
              "score_name": "minus validation cross-entropy", "chance_score": -math.log(tokens.vocab)}
    if diverged_at is None:
        result["val_ce"] = evaluate(model, tokens, cfg, device)
        result["train_loss"] = history[-1]["train/loss"] if history else None
        result["score"] = -result["val_ce"]
        result["final_metrics"] = dict(history[-1]) if history else {}
        if not math.isfinite(result["val_ce"]):
            result["status"], result["diverged_step"] = "diverged", step
            regime.diverged(step, "the validation loss is not finite")
    result.update(regime_fields(regime, stopped, step, cfg.steps))
    return json_safe(result)


def _mesh(cfg, world, device):
    """The (dp, tp) device mesh of a tensor-parallel run (None without --tp): ``tp`` ranks
    split each layer, the ``world / tp`` groups of them split the batch (FSDP2 over dp)."""
    if cfg.tp == 1:
        return None
    if world == 1:
        raise RuntimeError("--tp splits the model over the processes of a torch.distributed job: run it under "
                           "torchrun (torchrun --nproc_per_node=N -m spkern.experiments.train.gpt --tp N ...)")
    if world % cfg.tp:
        raise ValueError(f"tp ({cfg.tp}) must divide the number of processes ({world})")
    if world > cfg.tp and not cfg.fsdp:
        raise ValueError(f"--tp {cfg.tp} on {world} processes: the other {world // cfg.tp}-way split is data "
                         f"parallel over FSDP2: add --fsdp (or run {cfg.tp} processes)")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world // cfg.tp, cfg.tp), mesh_dim_names=("dp", "tp"))


def clip_grad_norm(params, max_norm: float):
    """``torch.nn.utils.clip_grad_norm_`` for parameters placed any way (plain, FSDP2's and
    tensor parallelism's DTensors on different meshes, together): the gradients' total
    norm from spkern.multi_tensor_norms (the whole tensors' sums), then the same scaling."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = spkern.multi_tensor_norms(grads)[:, 0].double().sum().sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for g in grads:
            spkern.distributed.local(g).mul_(coef.to(g.dtype))
    return total


def shard(model, bfloat16=False, mesh=None):
    """FSDP2 on the GPT: ``fully_shard`` on each block, then on the root (embeddings, final
    LayerNorm, head); with ``bfloat16``, parameters gathered in bfloat16 for the forward
    and backward and gradients reduced in float32. ``mesh``: the data-parallel mesh of a
    tensor-parallel run (the default: every process)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("--fsdp shards the model over the processes of a torch.distributed job: run it under "
                           "torchrun (torchrun --nproc_per_node=N -m spkern.experiments.train.gpt --fsdp ...)")
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bfloat16
              else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=policy, mesh=mesh)
    fully_shard(model, mp_policy=policy, mesh=mesh)
    return model


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _loss(ddp, model, x, y, kind):
    return ddp(x, y, kind)  # GPT.forward with targets: the head's fused loss, inside DDP


def main(argv=None):
    """One run from the command line (``torchrun`` for several processes)."""
    parser = argparse.ArgumentParser(prog="python -m spkern.experiments.train.gpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_options(parser, GPTRunConfig, GPT_HELP, choices={"loss": LOSSES, "optim": ("sgd", "adam"),
                                                              "dtype": DTYPES}, swept=())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="write the result as JSON here (rank 0)")
    args = parser.parse_args(argv)
    cfg = GPTRunConfig(**{f.name: getattr(args, f.name) for f in fields(GPTRunConfig)})
    try:
        cfg.check()
    except ValueError as e:
        raise SystemExit(f"spkern.experiments.train.gpt: {e}") from None
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with torchrun(device) as device:
        result = train(cfg, device=device)
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(result)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(f"{result['status']}: val_ce {result.get('val_ce')}, {result['steps']} steps, "
              f"{result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
