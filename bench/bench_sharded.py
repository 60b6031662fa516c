"""Sharded-training benchmark: FSDP2 and tensor parallelism against DDP on 2 processes (gloo
on CPU, NCCL on a GPU machine): per-rank memory of the parameters, the tracker's W_0 and
the optimizer state, and the tracker's overhead over the untracked step, under each; and
the vocabulary-parallel losses' cost against the unsharded loss.

    python bench/bench_sharded.py                      # MLP widths 1024, 2048 and the GPT
    python bench/bench_sharded.py --quick              # MLP width 256, 3 rounds
    python bench/bench_sharded.py --models mlp --widths 4096

It starts ``torch.distributed.run --nproc_per_node=2`` on itself once per parallelism
(DDP, FSDP2, TP; ``--parallel``). Models: the MLP of bench/bench_tracker.py (784 -> width x 3 -> 10, no
biases, global batch 128: 64 rows per rank) and its GPT (depth 2, context 64, vocabulary
8192, width --gpt-width, global batch 4), with spkern.optim.SGD (momentum 0.9) and
spkern's fused loss. FSDP2: ``fully_shard`` on every Linear layer (the GPT: every block)
and on the root. TP: the MLP's Linear layers alternately ``ColwiseParallel`` and
``RowwiseParallel``, the GPT as ``--tp`` splits it (spkern.experiments.gpt.tensor_parallel:
heads, MLP units, the vocabulary of the fused head loss); every TP rank trains on the whole
global batch (DDP and FSDP2 ranks on half of it).

Losses (TP only): ``spkern.cross_entropy`` on logits sharded over the vocabulary (each rank
its half of every row: 8 x 512 rows, vocabulary 32768, float32, forward and backward;
``--quick``: 512 rows, 8192)
against the same call on the whole logits in one rank, interleaved; the bytes each rank
sends in the one all-gather per call.

Memory: the bytes of the rank's own tensors, counted (not the process's resident size,
which the allocator and the libraries blur): parameters (the local shards under FSDP2,
whole under DDP), the tracker's W_0 (kept sharded like the parameters) and the momentum
buffers. Overhead: the untracked and the tracked step (spkern.Tracker every step, a
fixed probe of each rank's 64 rows; the GPT: 2 sequences per rank) on two copies of the
model, timed in alternation (cycles of 5 steps, median over the rounds of each round's
tracked time against the untracked time of the same round), as ``bench_tracker
--interleave`` does. Rank 0's clock; every step ends in the processes' collectives.
"""

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

MLP_BATCH = 128
GPT_VOCAB, GPT_CONTEXT, GPT_BATCH, GPT_DEPTH = 8192, 64, 4, 2


def _build(kind, width, device, parallel, world, rank):
    """(model as trained, the module the tracker and optimizer see, step inputs, loss)."""
    import torch
    from torch import nn

    import spkern

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "gpt":
        from spkern.experiments.gpt import GPT, GPTConfig

        model = GPT(GPTConfig(vocab=GPT_VOCAB, width=width, depth=GPT_DEPTH, context=GPT_CONTEXT)).to(device)
        x = torch.randint(0, GPT_VOCAB, (GPT_BATCH, GPT_CONTEXT), generator=g)
        y = torch.randint(0, GPT_VOCAB, (GPT_BATCH, GPT_CONTEXT), generator=g)
        units = list(model.blocks)

        def loss(net, x, y):
            return net(x, y, "ce")  # the fused head loss, inside the (wrapped) model's forward
    else:
        dims = [784] + [width] * 3 + [10]
        layers = []
        for i in range(4):
            layers += [nn.Linear(dims[i], dims[i + 1], bias=False)] + ([nn.ReLU()] if i < 3 else [])
        model = nn.Sequential(*layers).to(device)
        x = torch.randn(MLP_BATCH, 784, generator=g)
        y = torch.randint(0, 10, (MLP_BATCH,), generator=g)
        units = [m for m in model if isinstance(m, nn.Linear)]

        def loss(net, x, y):
            return spkern.cross_entropy(net(x), y, return_stats=True)
    if parallel != "tp":  # (tensor-parallel ranks share the rows)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    x, y = x.to(device), y.to(device)
    net = model
    if parallel == "tp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(torch.device(device).type, (world,))
        if kind == "gpt":
            from spkern.experiments.gpt import tensor_parallel

            tensor_parallel(model, mesh)
        else:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            linear = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
            parallelize_module(model, mesh, {str(i): ColwiseParallel() if k % 2 == 0 else RowwiseParallel()
                                             for k, i in enumerate(linear)})
    elif parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for u in units:
            fully_shard(u)
        fully_shard(model)
    else:
        net = nn.parallel.DistributedDataParallel(model)
    return model, net, x, y, loss


def _local_bytes(tensors):
    from spkern.distributed import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def worker(kind, width, parallel, rounds, cycle, device):
    """Runs in each process of the torchrun job; returns rank 0's measurements."""
    import statistics

    import torch

    import spkern

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    arms = {}
    for arm in ("untracked", "tracked"):
        model, net, x, y, loss_fn = _build(kind, width, device, parallel, world, rank)
        opt = spkern.optim.SGD(model.named_parameters(), lr=0.01, momentum=0.9)
        probe = x[:64] if kind == "mlp" else x[:max(1, GPT_BATCH // world)]  # (each rank's 64 rows / 2 sequences)
        tracker = spkern.Tracker(model, opt, probe=probe) if arm == "tracked" else None

        def step(net=net, opt=opt, tracker=tracker, loss_fn=loss_fn):
            opt.zero_grad()
            loss, stats = loss_fn(net, x, y)
            loss.backward()
            if tracker is not None:
                tracker.record_loss(loss, stats)
            opt.step()
            if tracker is not None:
                tracker.metrics()  # (a collective: every rank reads them, as training does)
        arms[arm] = (step, model, opt, tracker)
    times = harness.interleave({arm: a[0] for arm, a in arms.items()}, rounds, cycle, device,
                               before_cycle=torch.distributed.barrier)
    _, model, opt, tracker = arms["tracked"]
    params = opt.stepped_parameters()  # (the shards; model.parameters() may hold FSDP2's gathered copies)
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    memory = {"params": _local_bytes(params), "w0": _local_bytes(tracker.reference.tensors()),
              "optimizer_state": _local_bytes(state)}
    memory["total"] = sum(memory.values())
    for _, _, _, t in arms.values():
        if t is not None:
            t.close()
    base = times["untracked"]
    return {"model": kind, "width": width, "parallel": parallel, "world": world,
            "untracked_ms": statistics.median(base), "tracked_ms": statistics.median(times["tracked"]),
            "overhead": statistics.median(t / b for t, b in zip(times["tracked"], base)) - 1,
            "rounds": rounds, "cycle": cycle, "memory_bytes_per_rank": memory,
            "param_count": sum(p.numel() for p in params)}


LOSS_SIZES = {False: (8 * 512, 32768), True: (512, 8192)}  # (rows, vocabulary); True: --quick
LABELS = {"ddp": "DDP", "fsdp": "FSDP2", "tp": "TP"}


def loss_worker(rounds, cycle, device, quick=False):
    """The vocabulary-parallel cross-entropy (each rank half of every row's logits) against
    the unsharded call on the whole logits, interleaved; rank 0's clock."""
    import statistics

    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import spkern
    from spkern.vocab_parallel import partials_per_row

    world = torch.distributed.get_world_size()
    rows, vocab = LOSS_SIZES[quick]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, vocab, generator=g) * 2).to(device)
    y = torch.randint(0, vocab, (rows,), generator=g).to(device)
    mesh = init_device_mesh(torch.device(device).type, (world,))
    xs = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
    xw = x.clone().requires_grad_()

    def sharded():
        loss, _ = spkern.cross_entropy(xs, y, return_stats=True)
        loss.backward()
        xs.grad = None

    def whole():
        loss, _ = spkern.cross_entropy(xw, y, return_stats=True)
        loss.backward()
        xw.grad = None
    times = harness.interleave({"sharded": sharded, "whole": whole}, rounds, cycle, device,
                               before_cycle=torch.distributed.barrier)
    return {"rows": rows, "vocab": vocab, "world": world,
            "sharded_ms": statistics.median(times["sharded"]), "whole_ms": statistics.median(times["whole"]),
            "ratio": statistics.median(a / b for a, b in zip(times["sharded"], times["whole"])),
            "all_gather_bytes_sent_per_rank": partials_per_row(0, False, 0.0) * rows * 4,
            "logits_bytes_per_rank": rows * (vocab // world) * 4}


def _worker_main(argv):
    import gc

    import torch

    spec = json.loads(argv[0])
    device = spec["device"]
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        rows = [worker(kind, width, spec["parallel"], spec["rounds"], spec["cycle"], device)
                for kind, width in spec["cases"]]
        if spec["parallel"] == "tp" and spec.get("losses"):
            rows.append(loss_worker(spec["rounds"], spec["cycle"], device, spec.get("quick", False)))
        if torch.distributed.get_rank() == 0:
            with open(spec["out"], "w") as f:
                json.dump(rows, f)
    finally:
        torch.distributed.destroy_process_group()
        gc.collect()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return _worker_main(argv[1:])
    parser = harness.parser(__doc__)
    parser.add_argument("--models", default="mlp,gpt", help="mlp, gpt or both")
    parser.add_argument("--widths", default=None, help="MLP widths (default 1024,2048; --quick 256)")
    parser.add_argument("--gpt-width", type=int, default=256)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--parallel", default="ddp,fsdp,tp", help="of ddp, fsdp, tp (each against ddp)")
    parser.add_argument("--no-losses", dest="losses", action="store_false",
                        help="leave out the vocabulary-parallel loss's timing (under tp)")
    args = harness.parse(parser, argv, None)

    widths = harness.parse_ints(parser, args.widths or ("256" if args.quick else "1024,2048"), "--widths")
    models = [m for m in args.models.split(",") if m]
    if set(models) - {"mlp", "gpt"}:
        parser.error(f"--models: choose from mlp, gpt; got {args.models!r}")
    cases = [("mlp", w) for w in widths] * ("mlp" in models) + [("gpt", args.gpt_width)] * ("gpt" in models)
    rounds = args.repeats or (3 if args.quick else 9)
    info = harness.machine_info(args.device)
    harness.print_header(f"sharded training, {args.nproc} processes", info, args.device)
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    with tempfile.TemporaryDirectory() as tmp:
        kinds = [p for p in args.parallel.split(",") if p]
        if set(kinds) - {"ddp", "fsdp", "tp"} or "ddp" not in kinds:
            parser.error(f"--parallel: a comma list of ddp, fsdp, tp with ddp (the baseline); got {args.parallel!r}")
        for parallel in kinds:
            out = os.path.join(tmp, f"{parallel}.json")
            spec = dict(device=args.device, parallel=parallel, rounds=rounds, cycle=5, cases=cases, out=out,
                        losses=args.losses, quick=args.quick)
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                                   "--master_port", str(harness.free_port()), os.path.abspath(__file__),
                                   "--worker", json.dumps(spec)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"# {parallel}: failed\n{proc.stderr[-3000:]}")
                return 1
            results += json.loads(open(out).read())
    losses = [r for r in results if "sharded_ms" in r]
    results = [r for r in results if "sharded_ms" not in r]
    print("| model | width | parallel | untracked ms | tracked ms | tracker overhead | params + W_0 + state MB/rank |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['width']} | {r['parallel']} | {r['untracked_ms']:.1f} | {r['tracked_ms']:.1f} | "
              f"{r['overhead']:+.0%} | {r['memory_bytes_per_rank']['total'] / 2**20:.1f} |")
    for kind, width in cases:
        by = {r["parallel"]: r for r in results if (r["model"], r["width"]) == (kind, width)}
        for other in (p for p in by if p != "ddp"):
            mem = by[other]["memory_bytes_per_rank"]["total"] / by["ddp"]["memory_bytes_per_rank"]["total"]
            ratio = (1 + by[other]["overhead"]) / (1 + by["ddp"]["overhead"])
            name = LABELS[other]
            print(f"# {kind} {width}: {name} memory {mem:.2f}x DDP's per rank; tracked/untracked step "
                  f"{1 + by[other]['overhead']:.2f}x under {name}, {1 + by['ddp']['overhead']:.2f}x under DDP "
                  f"(ratio {ratio:.2f})")
    for r in losses:
        print(f"# vocabulary-parallel cross-entropy, {r['rows']} rows x {r['vocab']} classes over {r['world']} ranks: "
              f"{r['sharded_ms']:.1f} ms against {r['whole_ms']:.1f} ms for the whole logits in one rank "
              f"({r['ratio']:.2f}x); one all-gather of {r['all_gather_bytes_sent_per_rank'] / 2**10:.0f} KiB sent "
              f"per rank, against {r['logits_bytes_per_rank'] / 2**20:.0f} MiB of logits a rank holds")
    if args.out:
        harness.save(args.out, f"sharded_{args.device}", args.quick, info, results, rounds=rounds,
                     processes=args.nproc, losses=losses)
    return 0


if __name__ == "__main__":
    sys.exit(main())
