"""Tensor parallelism: spkern.optim, multi_tensor_norms and spectral_norm on the placements
of ColwiseParallel / RowwiseParallel layers (Shard(0), Shard(1), Replicate, plain) with 2
gloo processes, and on a 2-D mesh (FSDP2 x TP, 4 processes), and the tracker on such
models, against one process on the plain model and the same global batch
(tests/tp_worker.py)."""

import math
import os

import pytest

from conftest import run_worlds

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # (2 processes: 8 s on the 2-core VM; 4 processes: 14 s)
    return run_worlds(os.path.join(HERE, "tp_worker.py"), tmp_path_factory.mktemp("tp"), worlds=(2, 4, 1))


def _close(a, b, rel=1e-5, abs=1e-6):
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs)


@pytest.mark.parametrize("world", [2, 4])
def test_placements_are_the_tensor_parallel_ones(runs, world):
    got = runs[world]["optim"]["sgd"]["placements"]
    if world == 2:
        assert got == {"0.weight": "(Shard(dim=0),)", "0.bias": "(Shard(dim=0),)", "2.weight": "(Shard(dim=1),)",
                       "2.bias": "(Replicate(),)", "4.weight": "plain", "4.bias": "plain"}
    else:  # FSDP2 over dp on top of TP: a dimension sharded twice, and rows x columns
        assert got["0.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
        assert got["2.weight"] == "(Shard(dim=0), Shard(dim=1))"
        assert got["2.bias"] == "(Shard(dim=0), Replicate())"
        assert got["4.weight"] == "(Shard(dim=0),)"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_optimizer_step_norms_and_update_operator_norms(runs, world, optim):
    got, one = runs[world]["optim"][optim], runs[1]["optim"][optim]
    assert got["vs_torch"] < 1e-6  # the step is torch.optim's on the same parallel model
    # and the parameters are one process's (AdamW divides each gradient by its own scale: where
    # a gradient is tiny, the batch split over dp ranks rounds it differently, up to 6e-6 of
    # the 0.06 that 3 steps of lr 0.02 can move a weight)
    tol = 2e-5 if optim == "adamw" else 1e-6
    for name, p in one["params"].items():
        flat_got = sum(got["params"][name], []) if isinstance(p[0], list) else got["params"][name]
        flat_one = sum(p, []) if isinstance(p[0], list) else p
        assert all(_close(a, b, 1e-5, tol) for a, b in zip(flat_got, flat_one)), name
    assert got["norms"].keys() == one["norms"].keys()
    for name, values in one["norms"].items():  # update, weight, gradient norms and drift: whole tensors'
        for key, v in values.items():
            assert _close(got["norms"][name][key], v, 1e-5, 1e-7), (name, key, got["norms"][name][key], v)
    for name, v in one["update_op"].items():  # by rows (Shard(0)), by columns (Shard(1)), both, plain
        assert _close(got["update_op"][name], v, 1e-5), (name, got["update_op"][name], v)
        assert _close(got["update_op"][name], got["update_op_exact"][name], 1e-5), name


@pytest.mark.parametrize("world", [2, 4])
def test_multi_tensor_norms_and_spectral_norm(runs, world):
    got, one = runs[world]["norms"], runs[1]["norms"]
    for row_got, row_one in zip(got["multi_tensor_norms"], one["multi_tensor_norms"]):
        assert all(_close(a, b, 1e-6, 1e-7) for a, b in zip(row_got, row_one)), (row_got, row_one)
    for name in ("0.weight", "2.weight", "4.weight"):
        assert _close(got[name]["cold"], got[name]["exact"], 1e-5), (name, got[name])
        assert _close(got[name]["cold"], one[name]["cold"], 1e-5) and _close(got[name]["warm"], one[name]["warm"], 1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_tracker_on_tensor_parallel_models_equals_one_process(runs, world):
    # every metric (activations, inputs, effective and propagating updates with their row
    # norms, alignments, operator norms, the parameters' norms and drift, logits, the
    # training loss) in each probe mode, spkern's SGD and torch's: one process measuring
    # the plain MLP on the whole probe / batch
    got, one = runs[world]["tracker"], runs[1]["tracker"]
    assert set(one) == {"probe/spkern", "first/spkern", "batch/spkern", "probe/torch", "batch/torch",
                        "probe/spkern/rowwise_out", "batch/spkern/rowwise_out"}
    compared = 0
    for mode, want in one.items():
        assert got[mode].keys() == want.keys(), mode
        assert {"0/eff_rms", "2/prop_rms", "2/eff_align", "2/delta_w_op", "logits/rms", "train/loss"} <= want.keys()
        if "rowwise" not in mode:
            assert {"0/eff_row_l2", "2/input_row_l2", "4/eff_rms"} <= want.keys()
        for k, v in want.items():
            g = got[mode][k]
            assert (math.isnan(v) and math.isnan(g)) or _close(g, v, 1e-4, 1e-6), (mode, k, g, v)
            compared += 1
    assert compared >= 500


def test_tracker_on_tensor_parallel_llama_equals_one_process(runs):
    # transformers' Llama split as its tensor-parallel plan does, 2 processes: every metric
    # (each layer's rcc, alignments, operator norms; parameters; logits; loss) as one process
    got, want = runs[2]["llama"], runs[1]["llama"]
    assert got.keys() == want.keys()
    assert {"model.layers.0.self_attn.q_proj/eff_rms", "model.layers.1.self_attn.o_proj/prop_rms",
            "model.layers.1.mlp.down_proj/eff_align", "model.layers.0.mlp.gate_proj/delta_w_op",
            "model.layers.0.self_attn.k_proj.weight/drift_rms", "logits/rms"} <= want.keys()
    for k, v in want.items():
        assert (math.isnan(v) and math.isnan(got[k])) or _close(got[k], v, 1e-4, 1e-6), (k, got[k], v)
    assert len(want) > 150


def _gpt(tmp_path, name, world, extra=()):
    import json
    import socket
    import subprocess
    import sys

    args = ["-m", "spkern.experiments.train.gpt", "--width", "64", "--depth", "2", "--steps", "4", "--track-every",
            "2", "--batch-size", "8", "--context", "16", "--grad-accum", "2", "--eval-batches", "2",
            "--out", str(tmp_path / f"{name}.json"), *extra]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={port}"]
              if world > 1 else [sys.executable])
    proc = subprocess.run(launch + args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        return proc.stdout + proc.stderr
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def gpt_one(tmp_path_factory):
    return _gpt(tmp_path_factory.mktemp("gpt1"), "one", 1)


def _same_run(got, want):
    assert isinstance(got, dict), got[-3000:]
    assert got["status"] == "ok" and got["processes"] > 1
    assert math.isclose(got["val_ce"], want["val_ce"], rel_tol=1e-5)
    assert (got["regime"], got["regime_step"]) == (want["regime"], want["regime_step"])
    ma, mb = got["last_measurement"], want["last_measurement"]
    assert ma.keys() == mb.keys() and len(mb) > 150  # every tracked statistic
    for k, v in mb.items():
        assert (math.isnan(v) and math.isnan(ma[k])) or _close(ma[k], v, 1e-4, 1e-6), (k, ma[k], v)


def test_gpt_tensor_parallel_equals_one_process(tmp_path, gpt_one):
    # --tp 2: heads, MLP and the vocabulary split over 2 processes (7 s on the 2-core VM)
    got = _gpt(tmp_path, "tp", 2, ["--tp", "2"])
    _same_run(got, gpt_one)
    assert got["config"]["tp"] == 2


@pytest.mark.slow
def test_gpt_fsdp_by_tensor_parallel_equals_one_process(tmp_path, gpt_one):
    # --tp 2 --fsdp on 4 processes: a 2 x 2 mesh, each dp rank its half of every batch (16 s)
    _same_run(_gpt(tmp_path, "tp_fsdp", 4, ["--tp", "2", "--fsdp"]), gpt_one)


@pytest.mark.slow
def test_gpt_tensor_parallel_bfloat16_and_the_sweep(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    one = _gpt(tmp_path, "one_bf16", 1, ["--dtype", "bfloat16"])
    got = _gpt(tmp_path, "tp_bf16", 2, ["--tp", "2", "--dtype", "bfloat16"])
    assert isinstance(got, dict), got[-3000:]
    assert got["status"] == "ok" and math.isclose(got["val_ce"], one["val_ce"], rel_tol=2e-3)
    # spkern sweep gpt passes --tp through; every rank trains each run, rank 0 writes
    out = tmp_path / "sweep"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "-m", "spkern.experiments.cli", "sweep", "gpt", "--tp", "2",
                           "--widths", "64", "--lrs", "1e-2", "--loss", "ce", "--steps", "2", "--track-every", "1",
                           "--context", "16", "--batch-size", "4", "--depth", "1", "--eval-batches", "1", "--out",
                           str(out), "--no-progress", "--no-report"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["config"]["tp"] == 2 and r["processes"] == 2 and r["status"] == "ok"


def test_gpt_tensor_parallel_bad_setups_are_named(tmp_path):
    # one process, or more processes than --tp without --fsdp, or heads that do not split
    assert "run it under torchrun" in _gpt(tmp_path, "alone", 1, ["--tp", "2"])
    msg = _gpt(tmp_path, "heads", 2, ["--tp", "2", "--head-dim", "64"])  # one head of 64
    assert "the number of heads (width / head_dim), 1, to be a multiple of 2" in msg


def test_gpt_tensor_parallel_mesh_checks():
    import torch

    from spkern.experiments.train.gpt import GPTRunConfig, _mesh

    cfg = GPTRunConfig(tp=2)
    with pytest.raises(ValueError, match=r"--tp 2 on 4 processes: .* add --fsdp"):
        _mesh(cfg, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"tp \(2\) must divide the number of processes \(3\)"):
        _mesh(cfg, 3, torch.device("cpu"))
    assert _mesh(GPTRunConfig(), 4, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="tp must be a positive int"):
        GPTRunConfig(tp=0).check()
