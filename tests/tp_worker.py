"""Run by tests/test_tensor_parallel.py under ``torch.distributed.run``: with 2 processes the
MLP tensor-parallel (its first layer ``ColwiseParallel``: weight and bias ``Shard(0)``, its
second ``RowwiseParallel``: weight ``Shard(1)``, bias replicated, its last layer plain);
with 4 processes the same on a 2-D mesh (dp 2 x tp 2: tensor-parallel, then FSDP2's
``fully_shard`` over dp, each dp rank training on its half of the batch); alone (one
process, the plain MLP, the whole batch). spkern.optim's steps, norms, drift and update
operator norms, multi_tensor_norms and spectral_norm of every placement, and the tracker in
each probe mode, on the same global batch. Rank 0 writes what it measured as JSON; the test compares the files."""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import spkern
from spkern.distributed import is_dtensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import end_process_group  # noqa: E402

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))
DP = 2 if WORLD == 4 else 1
_MESH = None


def mesh():
    global _MESH
    if _MESH is None and WORLD > 1:
        from torch.distributed.device_mesh import init_device_mesh

        _MESH = init_device_mesh("cpu", (DP, WORLD // DP), mesh_dim_names=("dp", "tp"))
    return _MESH


def mlp():
    torch.manual_seed(0)  # (the last layer's 5 rows: uneven FSDP2 shards)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 14), nn.ReLU(), nn.Linear(14, 5))


def parallel(model):
    """Layers 0 and 2 split over tp (ColwiseParallel, RowwiseParallel); with 4 processes
    every Linear layer and the root sharded over dp by FSDP2."""
    if WORLD == 1:
        return model
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parallelize_module(model, mesh()["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    if DP > 1:
        from torch.distributed.fsdp import fully_shard

        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh()["dp"])
        fully_shard(model, mesh=mesh()["dp"])
    return model


def share(t):
    """The rows of the global batch this rank trains on (its dp coordinate's half)."""
    if DP == 1:
        return t
    return t.chunk(DP)[mesh()["dp"].get_local_rank()]


def whole(t):
    return t.full_tensor() if is_dtensor(t) else t


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 10, generator=g), torch.randint(0, 5, (16,), generator=g)


def placements(model):
    return {n: str(getattr(p, "placements", "plain")) for n, p in model.named_parameters()}


def optimizers():
    """spkern's SGD and AdamW on the parallel MLP against torch.optim on a parallel twin:
    parameters after three steps, norms and drift, and each matrix's update operator norm
    (by rows, by columns, plain), against the exact one from the parameters' change."""
    out = {}
    x, y = data()
    for name, make in (
            ("sgd", lambda ps, ours: (spkern.optim.SGD if ours else torch.optim.SGD)(
                ps, lr=0.1, momentum=0.9, weight_decay=0.01, **({"track_drift": True} if ours else {}))),
            ("adamw", lambda ps, ours: (spkern.optim.AdamW if ours else torch.optim.AdamW)(
                ps, lr=0.02, weight_decay=0.1, **({"track_drift": True} if ours else {})))):
        model, twin = parallel(mlp()), parallel(mlp())
        opt, ref = make(list(model.named_parameters()), True), make(list(twin.parameters()), False)
        for _ in range(3):
            before = {n: whole(p.detach()).clone() for n, p in model.named_parameters()}
            for m, o in ((model, opt), (twin, ref)):
                o.zero_grad()
                F.cross_entropy(m(share(x)), share(y)).backward()
                o.step()
        mine = {n: whole(p.detach()) for n, p in model.named_parameters()}
        theirs = {n: whole(p.detach()) for n, p in twin.named_parameters()}
        weights = [n for n in mine if n.endswith("weight")]
        out[name] = {
            "placements": placements(model),
            "vs_torch": max((mine[n] - theirs[n]).abs().max().item() for n in mine),
            "params": {n: p.tolist() for n, p in mine.items()},
            "norms": opt.norm_stats_floats(),
            "update_op": {n: opt.update_spectral_norm(n, iters=30).op.item() for n in weights},
            "update_op_exact": {n: torch.linalg.matrix_norm(mine[n] - before[n], 2).item() for n in weights},
        }
    return out


def norms():
    """multi_tensor_norms of the parallel MLP's parameters against perturbed copies placed
    alike, and spectral_norm of each weight (minus its copy), cold and warm."""
    model = parallel(mlp())
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(2)
    others = {}
    for n, p in named.items():
        w = whole(p.detach()) + 0.1 * torch.randn(p.shape, generator=g)
        if is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor

            w = distribute_tensor(w, p.device_mesh, p.placements)
        others[n] = w
    out = {"multi_tensor_norms": spkern.multi_tensor_norms([p.detach() for p in named.values()],
                                                           list(others.values())).tolist()}
    for n, p in named.items():
        if n.endswith("weight"):
            cold = spkern.spectral_norm(p.detach(), minus=others[n], iters=30)
            warm = spkern.spectral_norm(p.detach() * 1.01, cold.state, minus=others[n], iters=5)
            exact = torch.linalg.matrix_norm(whole(p.detach()) - whole(others[n]), 2).item()
            out[n] = {"cold": cold.op.item(), "warm": warm.op.item(), "exact": exact}
    return out


def tracked(model, opt, tracker, x, y, steps):
    """``steps`` training steps on the rank's rows of (x, y) with ``tracker`` attached: its
    metrics after them (every rank: a collective)."""
    for _ in range(steps):
        opt.zero_grad()
        loss, stats = spkern.cross_entropy(model(share(x)), share(y), return_stats=True)
        loss.backward()
        tracker.record_loss(loss, stats)
        opt.step()
    out = tracker.metrics()
    tracker.close()
    return out


def trackers():
    """The tracker on the parallel MLP in each probe mode, with spkern's SGD and torch's:
    every metric, against one process on the plain MLP (each dp rank measures its share of
    the probe or of the batch; the tensor-parallel ranks of a dp rank share its rows). The
    last layer's output is the model's logits (reported under logits/)."""
    out = {}
    x, y = data()
    probe = torch.randn(8, 10, generator=torch.Generator().manual_seed(3))
    for mode, optim in (("probe", "spkern"), ("first", "spkern"), ("batch", "spkern"), ("probe", "torch"),
                        ("batch", "torch")):
        model = parallel(mlp())
        opt = (spkern.optim.SGD(model.named_parameters(), lr=0.5, momentum=0.9) if optim == "spkern"
               else torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
        given = {"probe": share(probe), "first": None, "batch": "batch"}[mode]
        tracker = spkern.Tracker(model, opt, probe=given, probe_rows=16, row_l2=True)
        out[f"{mode}/{optim}"] = tracked(model, opt, tracker, x, y, 3)
    # the model's output straight from a RowwiseParallel layer (TP returns it while its
    # all-reduce may still be in flight): logits/ and the layer's output measured
    for mode in ("probe", "batch"):
        torch.manual_seed(0)
        model = parallel(nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 5)))
        opt = spkern.optim.SGD(model.named_parameters(), lr=0.5, momentum=0.9)
        tracker = spkern.Tracker(model, opt, probe=share(probe) if mode == "probe" else "batch", probe_rows=16)
        out[f"{mode}/spkern/rowwise_out"] = tracked(model, opt, tracker, x, y, 2)
    return out


def llama():
    """The tracker on transformers' Llama split as its tensor-parallel plan splits it (q, k,
    v, gate and up projections ColwiseParallel, o and down projections RowwiseParallel:
    each rank 2 of the 4 query heads and 1 of the 2 key/value heads), 2 processes only."""
    import transformers
    from transformers import LlamaConfig

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32))
    if WORLD == 2:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan = {}
        for i in range(2):
            at = f"model.layers.{i}."
            plan.update({at + f"self_attn.{n}_proj": ColwiseParallel() for n in "qkv"})
            plan.update({at + "self_attn.o_proj": RowwiseParallel(), at + "mlp.gate_proj": ColwiseParallel(),
                         at + "mlp.up_proj": ColwiseParallel(), at + "mlp.down_proj": RowwiseParallel()})
        parallelize_module(model, mesh()["tp"], plan)
    g = torch.Generator().manual_seed(4)
    ids, probe = torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    opt = spkern.optim.SGD(model.named_parameters(), lr=0.5, momentum=0.9)
    tracker = spkern.Tracker(model, opt, probe=probe)
    for _ in range(3):
        opt.zero_grad()
        logits = model(input_ids=ids).logits
        loss, stats = spkern.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), return_stats=True)
        loss.backward()
        tracker.record_loss(loss, stats)
        opt.step()
    out = tracker.metrics()
    for name, layer in tracker.layers.items():  # (the exact operator norms, for comparison)
        if name.endswith("down_proj"):
            w, w0 = (whole(t.detach()) for t in (layer.module.weight, tracker.reference.weight0(layer)))
            out[f"exact/{name}"] = torch.linalg.matrix_norm((w - w0).double(), 2).item()
    tracker.close()
    return out


def main(path):
    if WORLD > 1:
        dist.init_process_group("gloo")
    result = {"world": WORLD, "optim": optimizers(), "norms": norms(), "tracker": trackers()}
    if WORLD <= 2:
        result["llama"] = llama()
    if RANK == 0:
        with open(path, "w") as f:
            json.dump(result, f)
    end_process_group(wait=True)


if __name__ == "__main__":
    main(sys.argv[1])
