"""Run by tests/test_vocab_parallel.py under ``torch.distributed.run`` with 2 gloo processes:
the vocabulary-parallel losses on logits sharded over the classes (a DTensor), against the
same call on the whole logits in this process (spkern's unsharded loss) and against plain
torch in float64. Every rank computes every case; rank 0 writes, per case, the largest
relative difference of the loss, the statistics and the gradient, and the errors the bad
placements raised."""

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import spkern

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import available_backends, end_process_group  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def rel(got, want, scale=None):
    """Largest |got - want| relative to want's largest magnitude, or to ``scale`` (NaN
    where they agree)."""
    got, want = got.double(), want.double()
    same_nan = torch.isnan(got) == torch.isnan(want)
    if not bool(same_nan.all()):
        return float("inf")
    ok = ~torch.isnan(want)
    if not bool(ok.any()):
        return 0.0
    d = (got[ok] - want[ok]).abs().max().detach()
    return float(d / (want[ok].abs().max() if scale is None else torch.as_tensor(scale)).clamp(min=1e-30))


def torch_reference(x, y, weight, kind, ignore_index, reduction, eps, z, cap):
    """The loss and the statistics in float64 with plain torch, on the whole logits."""
    x = x.double().detach().requires_grad_()
    xc = cap * torch.tanh(x / cap) if cap else x
    C = x.shape[1]
    if kind == "ce":
        w = weight.double() if weight is not None else None
        t = y.double() if y.is_floating_point() else y
        loss = F.cross_entropy(xc, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
        if z:
            lse = torch.logsumexp(xc, 1)
            zl = z * lse**2
            if not y.is_floating_point():
                zl = torch.where(y != ignore_index, zl, 0.0)
            if reduction == "none":
                loss = loss + zl
            else:
                n = ((y != ignore_index).sum() if weight is None else weight.double()[y[y != ignore_index]].sum()) \
                    if not y.is_floating_point() else torch.tensor(float(len(y)))
                loss = loss + (zl.sum() / n if reduction == "mean" else zl.sum())
    else:
        valid = y != ignore_index
        pred = x if kind == "mse_logits" else torch.softmax(x, 1)
        sq = ((pred - F.one_hot(torch.where(valid, y, 0), C).double()) ** 2).sum(1)
        sq = torch.where(valid, sq, 0.0)
        loss = {"none": sq, "sum": sq.sum(), "mean": sq.sum() / (valid.sum() * C)}[reduction]
    (grad,) = torch.autograd.grad(loss.sum(), x)
    p = torch.softmax(xc, 1)
    am = x.argmax(1)
    correct = (y.gather(1, am[:, None])[:, 0] == y.max(1).values) if y.is_floating_point() else (am == y)
    stats = torch.stack([torch.logsumexp(xc, 1), x.norm(dim=1), x.max(1).values, p.max(1).values,
                         torch.special.entr(p).sum(1), correct.double()])
    return loss.detach(), stats, grad


def call(kind, x, y, weight, ignore_index, reduction, eps, z, cap):
    if kind == "ce":
        return spkern.cross_entropy(x, y, weight, ignore_index=ignore_index, reduction=reduction,
                                    label_smoothing=eps, z_loss=z, softcap=cap, return_stats=True)
    return spkern.mse_onehot_loss(x, y, on=kind[4:], reduction=reduction, ignore_index=ignore_index,
                                  return_stats=True)


CASES = {  # name: (kind, classes, target kind, weight, ignore rows, reduction, eps, z, softcap, scale)
    "ce": ("ce", 37, "index", False, False, "mean", 0.0, 0.0, None, 3.0),
    "ce ignore sum": ("ce", 37, "index", False, True, "sum", 0.0, 0.0, None, 3.0),
    "ce weight ignore none": ("ce", 37, "index", True, True, "none", 0.0, 0.0, None, 3.0),
    "ce smoothing weight": ("ce", 37, "index", True, True, "mean", 0.1, 0.0, None, 3.0),
    "ce z softcap": ("ce", 37, "index", False, True, "mean", 0.0, 1e-3, 5.0, 10.0),
    "ce every option": ("ce", 37, "index", True, True, "mean", 0.2, 1e-2, 4.0, 5.0),
    "ce large logits": ("ce", 37, "index", False, False, "mean", 0.0, 0.0, None, 300.0),
    "ce even split": ("ce", 64, "index", False, True, "mean", 0.0, 0.0, None, 3.0),
    "ce probs": ("ce", 37, "probs", False, False, "mean", 0.0, 0.0, None, 3.0),
    "ce probs weight smoothing softcap": ("ce", 37, "probs", True, False, "sum", 0.1, 1e-3, 4.0, 3.0),
    "ce probs whole": ("ce", 37, "probs whole", False, False, "mean", 0.0, 0.0, None, 3.0),
    "ce zero logits (ties)": ("ce", 37, "index", False, False, "mean", 0.0, 0.0, None, 0.0),
    "mse logits": ("mse_logits", 37, "index", False, True, "mean", 0.0, 0.0, None, 1.0),
    "mse logits sum": ("mse_logits", 37, "index", False, False, "sum", 0.0, 0.0, None, 1.0),
    "mse probs sum": ("mse_probs", 37, "index", False, True, "sum", 0.0, 0.0, None, 3.0),
    "mse probs none": ("mse_probs", 37, "index", False, False, "none", 0.0, 0.0, None, 3.0),
}


def one_case(mesh, name, dtype):
    kind, C, tkind, has_w, ignore, reduction, eps, z, cap, scale = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    M = 6
    x = (torch.randn(M, C, generator=g) * scale).to(dtype)
    if tkind == "index":
        y = torch.randint(0, C, (M,), generator=g)
        y[0] = C - 1  # a target in the last slice
        y[1] = 0
        if name.startswith("ce zero"):
            y[2] = C // 2 + 1  # (every slice's first class ties)
        if ignore:
            y[3] = -100
    else:
        y = torch.softmax(torch.randn(M, C, generator=g), 1).to(dtype)
    w = torch.rand(C, generator=g) + 0.5 if has_w else None
    xd = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
    target = distribute_tensor(y, mesh, [Shard(1)]) if tkind == "probs" else y
    loss, stats = call(kind, xd, target, w, -100, reduction, eps, z, cap)
    loss.sum().backward()
    grad = xd.grad.full_tensor()
    x1 = x.clone().requires_grad_()
    loss1, stats1 = call(kind, x1, y, w, -100, reduction, eps, z, cap)
    loss1.sum().backward()
    ref_loss, ref_stats, ref_grad = torch_reference(x, y, w, kind, -100, reduction, eps, z, cap)
    out = {"is plain tensor": type(loss) is torch.Tensor}
    for what, got, one, ref in (("loss", loss, loss1, ref_loss), ("grad", grad, x1.grad, ref_grad)):
        out[what] = rel(got, one)
        out[what + " vs float64"] = rel(got, ref)
    for i, field in enumerate(spkern.LogitStats._fields):
        s, s1 = getattr(stats, field), getattr(stats1, field)
        # (the entropy is lse minus a sum of the same size: its rounding is the lse's)
        scale = ref_stats[0].abs().max() if field == "entropy" else None
        out[field] = rel(s.double(), s1.double(), scale)
        out[field + " vs float64"] = rel(s.double(), ref_stats[i], scale)
    return out


def head_case(mesh):
    """A ColwiseParallel head (use_local_output=False): (batch, seq, hidden) -> logits
    sharded over the vocabulary, flattened to rows, through the loss and back into the
    head's sharded weight and bias; inside torch's loss_parallel() as well."""
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    torch.manual_seed(1)
    head = torch.nn.Linear(16, 29)
    head1 = torch.nn.Linear(16, 29)
    head1.load_state_dict(head.state_dict())
    parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
    h = torch.randn(2, 5, 16)
    y = torch.randint(0, 29, (2, 5))
    out = {}
    for ctx in ("plain", "loss_parallel"):
        head.zero_grad()
        head1.zero_grad()
        logits = head(h)
        with (loss_parallel() if ctx == "loss_parallel" else torch.enable_grad()):
            loss, stats = spkern.cross_entropy(logits.flatten(0, 1), y.flatten(), return_stats=True)
            loss.backward()
        loss1, stats1 = spkern.cross_entropy(head1(h).flatten(0, 1), y.flatten(), return_stats=True)
        loss1.backward()
        out[ctx] = {"placements": str(logits.placements), "loss": rel(loss, loss1),
                    "logit_norm": rel(stats.logit_norm, stats1.logit_norm),
                    "weight grad": rel(head.weight.grad.full_tensor(), head1.weight.grad),
                    "bias grad": rel(head.bias.grad.full_tensor(), head1.bias.grad)}
    # (batch, classes, positions) logits sharded on the class dimension
    x = torch.randn(3, 11, 4)
    t = torch.randint(0, 11, (3, 4))
    xd = distribute_tensor(x, mesh, [Shard(1)])
    loss, stats = spkern.cross_entropy(xd, t, reduction="none", return_stats=True)
    loss1, stats1 = spkern.cross_entropy(x, t, reduction="none", return_stats=True)
    out["3-d"] = {"loss": rel(loss, loss1), "entropy": rel(stats.entropy, stats1.entropy),
                  "shape": list(loss.shape) == list(loss1.shape)}
    return out


LINEAR_CASES = {  # name: (kind, reduction, options, dtype, chunk_size, bias)
    "ce": ("ce", "mean", {}, torch.float32, None, True),
    "ce chunks of 3": ("ce", "mean", {}, torch.float32, 3, True),
    "ce none (gradients in backward)": ("ce", "none", {}, torch.float32, 4, True),
    "ce every option": ("ce", "mean", dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0), torch.float32, 5, False),
    "ce class weights sum": ("ce", "sum", dict(class_weight=True), torch.float32, None, True),
    "ce bfloat16": ("ce", "mean", {}, torch.bfloat16, 4, True),
    "mse probs sum": ("mse_probs", "sum", {}, torch.float32, 4, True),
    "mse logits": ("mse_logits", "mean", {}, torch.float32, None, False),
}


def linear_case(mesh, name):
    """The head's weight (and bias) sharded over the vocabulary, the hidden states whole
    on every rank: loss, statistics and the gradients of the input, of the weight's and
    the bias's rows, against the unsharded fused loss and plain torch in float64."""
    kind, reduction, options, dtype, chunk, has_bias = LINEAR_CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    N, D, V = 11, 8, 29
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.7).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if has_bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[0], y[1], y[2] = V - 1, 0, -100
    options = dict(options)
    if options.pop("class_weight", False):
        options["class_weight"] = torch.rand(V, generator=g) + 0.5

    def run(h, w, b):
        if kind == "ce":
            return spkern.linear_cross_entropy(h, w, y, b, reduction=reduction, return_stats=True, chunk_size=chunk,
                                               **options)
        return spkern.linear_mse_onehot_loss(h, w, y, b, on=kind[4:], reduction=reduction, return_stats=True,
                                             chunk_size=chunk)

    hs = h.clone().requires_grad_()
    ws = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    bs = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_() if has_bias else None
    loss, stats = run(hs, ws, bs)
    loss.sum().backward()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    b1 = b.clone().requires_grad_() if has_bias else None
    loss1, stats1 = run(h1, w1, b1)
    loss1.sum().backward()
    # float64, plain torch
    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    b2 = b.double().requires_grad_() if has_bias else None
    logits = F.linear(h2, w2, b2)
    cw = options.get("class_weight")
    ref_loss, ref_stats, _ = torch_reference(logits, y, cw, kind, -100, reduction, options.get("label_smoothing", 0.0),
                                             options.get("z_loss", 0.0), options.get("softcap"))
    # (the gradients through the head, from the reference loss on the float64 logits)
    ref_loss2 = torch_reference_loss(logits, y, cw, kind, reduction, options)
    ref_loss2.sum().backward()
    out = {"loss": rel(loss, loss1), "loss vs float64": rel(loss, ref_loss)}
    for what, got, one, ref in (("d input", hs.grad, h1.grad, h2.grad),
                                ("d weight", ws.grad.full_tensor(), w1.grad, w2.grad),
                                ("d bias", bs.grad.full_tensor() if has_bias else None, b1.grad if has_bias else None,
                                 b2.grad if has_bias else None)):
        if got is not None:
            out[what] = rel(got, one)
            out[what + " vs float64"] = rel(got, ref)
    for i, field in enumerate(spkern.LogitStats._fields):
        scale = ref_stats[0].abs().max() if field == "entropy" else None
        out[field] = rel(getattr(stats, field).double(), getattr(stats1, field).double(), scale)
        out[field + " vs float64"] = rel(getattr(stats, field).double(), ref_stats[i], scale)
    out["dtype"] = str(dtype)[6:]
    return out


def torch_reference_loss(logits, y, cw, kind, reduction, options):
    """The loss on float64 logits with plain torch, differentiable (for the head's gradients)."""
    cap = options.get("softcap")
    xc = cap * torch.tanh(logits / cap) if cap else logits
    if kind == "ce":
        loss = F.cross_entropy(xc, y, cw.double() if cw is not None else None, reduction=reduction,
                               label_smoothing=options.get("label_smoothing", 0.0))
        z = options.get("z_loss", 0.0)
        if z:
            valid = y != -100
            zl = torch.where(valid, z * torch.logsumexp(xc, 1) ** 2, 0.0)
            loss = loss + (zl.sum() / valid.sum() if reduction == "mean" else zl if reduction == "none" else zl.sum())
        return loss
    valid = y != -100
    pred = logits if kind == "mse_logits" else torch.softmax(logits, 1)
    sq = torch.where(valid, ((pred - F.one_hot(torch.where(valid, y, 0), logits.shape[1]).double()) ** 2).sum(1), 0.0)
    return {"none": sq, "sum": sq.sum(), "mean": sq.sum() / (valid.sum() * logits.shape[1])}[reduction]


def errors(mesh):
    """The message of each bad call ('' where it did not raise)."""
    x = torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    calls = {
        "rows sharded": lambda: spkern.cross_entropy(distribute_tensor(x, mesh, [Shard(0)]), y),
        "partial": lambda: spkern.cross_entropy(DTensor.from_local(x, mesh, [Partial()]), y),
        "replicated": lambda: spkern.cross_entropy(distribute_tensor(x, mesh, [Replicate()]), y),
        "target sharded": lambda: spkern.cross_entropy(distribute_tensor(x, mesh, [Shard(1)]),
                                                       distribute_tensor(y, mesh, [Shard(0)])),
        "plain input, DTensor target": lambda: spkern.cross_entropy(x, distribute_tensor(y, mesh, [Replicate()])),
        "target out of range": lambda: spkern.cross_entropy(distribute_tensor(x, mesh, [Shard(1)]),
                                                            torch.tensor([0, 1, 2, 3, 4, 10])),
        "weight sharded": lambda: spkern.cross_entropy(distribute_tensor(x, mesh, [Shard(1)]), y,
                                                       distribute_tensor(torch.rand(10), mesh, [Shard(0)])),
    }
    w = torch.randn(10, 4)
    h = torch.randn(6, 4)
    calls.update({
        "linear: weight sharded on columns": lambda: spkern.linear_cross_entropy(
            h, distribute_tensor(w, mesh, [Shard(1)]), y),
        "linear: bias plain": lambda: spkern.linear_cross_entropy(
            h, distribute_tensor(w, mesh, [Shard(0)]), y, torch.zeros(10)),
        "linear: weight plain, input DTensor": lambda: spkern.linear_cross_entropy(
            distribute_tensor(h, mesh, [Replicate()]), w, y),
        "linear: input sharded": lambda: spkern.linear_cross_entropy(
            distribute_tensor(h, mesh, [Shard(0)]), distribute_tensor(w, mesh, [Shard(0)]), y),
    })
    out = {}
    for name, fn in calls.items():
        try:
            fn()
            out[name] = ""
        except (ValueError, IndexError, TypeError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def main(path):
    torch.distributed.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    result = {"world": torch.distributed.get_world_size(), "cases": {}}
    for backend in available_backends():
        for dtype in ((torch.float32, torch.bfloat16) if backend != "reference" else (torch.float64,)):
            with spkern.use_backend(backend):
                for name in CASES:
                    result["cases"][f"{backend} {str(dtype)[6:]} {name}"] = one_case(mesh, name, dtype)
    result["linear"] = {}
    for backend in available_backends():
        with spkern.use_backend(backend):
            for name in LINEAR_CASES:
                if backend == "triton" and LINEAR_CASES[name][3] == torch.float32 and "every" not in name \
                        and name != "ce chunks of 3":
                    continue  # (the interpreter is slow: a few cases on Triton)
                result["linear"][f"{backend} {name}"] = linear_case(mesh, name)
    result["head"] = head_case(mesh)
    result["errors"] = errors(mesh)
    if RANK == 0:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    end_process_group(wait=True)


if __name__ == "__main__":
    main(sys.argv[1])
