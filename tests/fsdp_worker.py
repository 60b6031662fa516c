"""Run by tests/test_fsdp.py under ``torch.distributed.run`` (2 gloo processes, the model
sharded with FSDP2's ``fully_shard``) and alone (one process, the plain model, the whole
batch): the optimizer steps and their norms, multi_tensor_norms, spectral_norm and the
tracker in each probe mode, on the same global batch. Rank 0 writes what it measured as
JSON; the test compares the two files."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import spkern
from spkern.distributed import is_dtensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import end_process_group  # noqa: E402

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))


def mlp():
    # the last layer has one output row: with 2 ranks, one of them holds an empty shard
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 7), nn.ReLU(), nn.Linear(7, 5),
                         nn.ReLU(), nn.Linear(5, 1))


def shard(model):
    if WORLD > 1:
        from torch.distributed.fsdp import fully_shard

        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
    return model


def share(t):
    return t.chunk(WORLD)[RANK]


def whole(t):
    return t.full_tensor() if is_dtensor(t) else t


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 10, generator=g), torch.randn(16, 1, generator=g), torch.randn(8, 10, generator=g)


def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def optimizers():
    """Each spkern optimizer on the sharded MLP, with a replicated and a plain parameter in
    its group; against torch.optim on a twin. Norms, drift and update operator norms."""
    out = {}
    x, y, _ = data()
    for name, make in (
            ("sgd", lambda ps, ours: (spkern.optim.SGD if ours else torch.optim.SGD)(
                ps, lr=0.1, momentum=0.9, weight_decay=0.01, **({"track_drift": True} if ours else {}))),
            ("adamw", lambda ps, ours: (spkern.optim.AdamW if ours else torch.optim.AdamW)(
                ps, lr=0.02, weight_decay=0.1, **({"track_drift": True, "drift_dtype": torch.bfloat16}
                                                  if ours else {})))):
        model, twin = shard(mlp()), shard(mlp())
        g = torch.Generator().manual_seed(5)
        extra = {}  # a replicated DTensor and a plain parameter beside the shards, in the same group
        for tag, m in (("ours", model), ("twin", twin)):
            rep = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
            plain = nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(7)))
            if WORLD > 1:
                from torch.distributed.tensor import Replicate, distribute_tensor

                rep = distribute_tensor(rep, mesh(), [Replicate()])
            extra[tag] = (nn.Parameter(rep), plain)
        named = list(model.named_parameters()) + [("rep", extra["ours"][0]), ("plain", extra["ours"][1])]
        opt = make(named, True)
        ref = make(list(twin.parameters()) + list(extra["twin"]), False)
        for _ in range(3):
            grads = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]  # the same on every rank
            for m, o, (rep, plain) in ((model, opt, extra["ours"]), (twin, ref, extra["twin"])):
                o.zero_grad()
                ((m(share(x)) - share(y)) ** 2).mean().backward()
                rep.grad = (grads[0] if WORLD == 1 else
                            torch.distributed.tensor.distribute_tensor(grads[0], rep.device_mesh, rep.placements))
                plain.grad = grads[1].clone()
                o.step()
        mine = [whole(p.detach()) for _, p in named]
        theirs = [whole(p.detach()) for p in list(twin.parameters()) + list(extra["twin"])]
        out[name] = {
            "vs_torch": max((a - b).abs().max().item() for a, b in zip(mine, theirs)),
            "params": [p.tolist() for p in mine],
            "norms": opt.norm_stats_floats(),
            "update_op": {n: opt.update_spectral_norm(n).op.item() for n in ("0.weight", "2.weight", "6.weight")},
        }
    return out


def norms():
    """multi_tensor_norms and spectral_norm of sharded tensors (rows and columns), warm."""
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(13, 9, generator=g))
    v, _ = torch.linalg.qr(torch.randn(9, 9, generator=g))
    m = u @ torch.diag(torch.tensor([3.0, 1.5, 1, 0.8, 0.5, 0.4, 0.3, 0.2, 0.1])) @ v.t()
    m0 = torch.randn(13, 9, generator=g) * 0.01
    tensors = [m, torch.randn(7, generator=g), torch.randn(1, 3, generator=g)]
    inits = [t + 0.1 * torch.randn(t.shape, generator=g) for t in tensors]
    out = {}
    if WORLD > 1:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        dm = mesh()
        placements = [[Shard(0)], [Replicate()], [Shard(0)]]  # (1, 3) on 2 ranks: one empty shard
        tensors = [distribute_tensor(t, dm, p) for t, p in zip(tensors, placements)]
        inits = [distribute_tensor(t, dm, p) for t, p in zip(inits, placements)]
    out["multi_tensor_norms"] = spkern.multi_tensor_norms(tensors, inits).tolist()
    for dim in (0, 1):
        a, b = m, m0
        if WORLD > 1:
            a, b = (distribute_tensor(t, dm, [Shard(dim)]) for t in (m, m0))
        cold = spkern.spectral_norm(a, minus=b)
        a2 = a * 1.01  # a slowly changing matrix: warm start from the last state
        warm = spkern.spectral_norm(a2, cold.state, minus=b)
        out[f"spectral_shard{dim}"] = [cold.op.item(), cold.rms_op.item(), warm.op.item()]
    out["spectral_exact"] = [torch.linalg.matrix_norm(m - m0, 2).item(), torch.linalg.matrix_norm(1.01 * m - m0, 2).item()]
    return out


def trackers():
    """The tracker on the sharded MLP, each probe mode, with spkern's SGD and torch's."""
    out = {}
    x, y, probe = data()
    y = (y > 0).long().squeeze(1)
    for mode, optim in (("probe", "spkern"), ("first", "spkern"), ("batch", "spkern"), ("probe", "torch"),
                        ("probe", "conv1d"), ("batch", "conv1d"), ("probe", "lora"), ("batch", "lora")):
        label = f"{mode}/spkern/{optim}" if optim in ("conv1d", "lora") else f"{mode}/{optim}"
        if optim == "conv1d":  # HF's Conv1D (weight (in, out), a bias) sharded: the layer maps under FSDP2
            from test_tracker_layers import Conv1D

            torch.manual_seed(0)
            model = shard(nn.Sequential(Conv1D(24, 10), nn.Tanh(), nn.Linear(24, 5)))
            optim = "spkern"
        elif optim == "lora":  # a Linear with an adapter, measured through its own forward, sharded
            from test_tracker_trust import _LoRA

            torch.manual_seed(0)
            model = shard(nn.Sequential(_LoRA(), nn.Tanh(), nn.Linear(16, 5)))
            optim = "spkern"
        else:
            model = shard(mlp()[:5])  # ends with Linear(7, 5): five classes
        opt = (spkern.optim.SGD(model.named_parameters(), lr=0.5, momentum=0.9) if optim == "spkern"
               else torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
        given = {"probe": share(probe), "first": None, "batch": "batch"}[mode]
        tracker = spkern.Tracker(model, opt, probe=given, probe_rows=16, row_l2=True)
        for _ in range(3):
            opt.zero_grad()
            loss, stats = spkern.cross_entropy(model(share(x)), share(y), return_stats=True)
            loss.backward()
            tracker.record_loss(loss, stats)
            opt.step()
        out[label] = tracker.metrics()
        tracker.close()
    return out


def bad_inputs():
    """What spkern refuses on sharded tensors, with its message."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    dm = mesh()
    out = {}

    def message(fn):
        try:
            fn()
        except (ValueError, TypeError) as e:
            return str(e)
        return None

    partial = nn.Parameter(DTensor.from_local(torch.randn(4, 3), dm, [Partial()]))
    partial.grad = DTensor.from_local(torch.randn(4, 3), dm, [Partial()])
    out["optim_partial"] = message(lambda: spkern.optim.SGD([("w", partial)], lr=0.1).step())
    out["spectral_partial"] = message(lambda: spkern.spectral_norm(partial))
    deep = nn.Parameter(DTensor.from_local(torch.randn(4, 3, 2), dm, [Shard(2)]))
    deep.grad = DTensor.from_local(torch.randn(4, 3, 2), dm, [Shard(2)])
    opt = spkern.optim.SGD([("deep", deep)], lr=0.1)
    opt.step()  # an elementwise step takes any sharding
    out["update_op_deep"] = message(lambda: opt.update_spectral_norm("deep"))  # (operator norms: rows, columns)
    rows = DTensor.from_local(torch.randn(4, 3), dm, [Shard(0)])
    out["norms_unlike"] = message(lambda: spkern.multi_tensor_norms([rows], [torch.randn(8, 3)]))
    out["spectral_minus_unlike"] = message(lambda: spkern.spectral_norm(rows, minus=torch.randn(8, 3)))
    return out


def main(path):
    if WORLD > 1:
        dist.init_process_group("gloo")
    result = {"world": WORLD, "optim": optimizers(), "norms": norms(), "tracker": trackers()}
    if WORLD > 1:
        result["errors"] = bad_inputs()
    if RANK == 0:
        with open(path, "w") as f:
            json.dump(result, f)
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
