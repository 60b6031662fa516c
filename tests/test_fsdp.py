"""Sharded training (FSDP2): 2 gloo processes with the model sharded by ``fully_shard``
against one process on the plain model and the same global batch. The optimizer steps
and their norms, multi_tensor_norms, spectral_norm, the tracker in each probe mode
(tests/fsdp_worker.py) and the GPT trainer with --fsdp."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _port():
    with socket.socket() as s:  # a free port, not a fixed one another job may hold
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, world):
    launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master_port={_port()}"] if world > 1 else [sys.executable])
    proc = subprocess.run(launch + args, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[:3000] + "\n...\n" + proc.stderr[-1500:]


def _flat(x, at=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _flat(v, f"{at}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _flat(v, f"{at}[{i}]")
    else:
        yield at, x


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    result = {}
    for world in (2, 1):
        path = str(out / f"{world}.json")
        _launch([os.path.join(HERE, "fsdp_worker.py"), path], world)
        result[world] = json.loads(open(path).read())
    return result


@pytest.mark.slow
def test_sharded_numbers_equal_one_process(runs):
    # every number the worker measured (parameters after 3 steps, norms, drift, update
    # operator norms, multi_tensor_norms rows, operator norms, every tracker metric) is
    # the one process's on the unsharded model, to float32 rounding
    two, one = runs[2], runs[1]
    assert two["world"] == 2 and one["world"] == 1
    a, b = dict(_flat(two)), dict(_flat(one))
    compared = 0
    for k, v in b.items():
        if k == "/world" or "vs_torch" in k:
            continue
        assert k in a, k
        same = (math.isnan(a[k]) and math.isnan(v)) or math.isclose(a[k], v, rel_tol=1e-4, abs_tol=1e-6)
        assert same, (k, a[k], v)  # (NaN: an alignment of an input that never moves, 0/0)
        compared += 1
    assert compared > 1500


@pytest.mark.slow
def test_sharded_step_is_torchs_and_covers_every_parameter(runs):
    optim = runs[2]["optim"]
    for name in ("sgd", "adamw"):
        assert optim[name]["vs_torch"] < 1e-6, name  # the fused step on the shards = torch.optim on DTensors
        norms = optim[name]["norms"]
        # 8 sharded parameters (one with an empty shard on rank 1), a replicated and a plain one
        assert len(norms) == 10 and {"rep", "plain", "6.weight"} <= norms.keys()
        assert all(v["drift_fro"] > 0 and v["update_fro"] > 0 for v in norms.values())
    tracked = runs[2]["tracker"]
    assert set(tracked) == {"probe/spkern", "first/spkern", "batch/spkern", "probe/torch", "probe/spkern/conv1d",
                            "batch/spkern/conv1d", "probe/spkern/lora", "batch/spkern/lora"}
    for key in ("probe/spkern/conv1d", "batch/spkern/conv1d"):  # HF's Conv1D, sharded
        assert tracked[key]["0/eff_rms"] > 0 and tracked[key]["0/delta_w_op"] > 0
    for key in ("probe/spkern/lora", "batch/spkern/lora"):  # a Linear with an adapter (its own forward), sharded
        assert tracked[key]["0/eff_rms"] > 0 and "0/delta_w_op" not in tracked[key]
    for m in (v for k, v in tracked.items() if not k.endswith(("conv1d", "lora"))):
        assert {"2/eff_rms", "2/prop_rms", "2/delta_w_op", "2/eff_row_l2", "2.weight/drift_rms",
                "4.weight/update_rms", "logits/max_abs", "train/accuracy"} <= m.keys()


@pytest.mark.slow
def test_sharded_operator_norms(runs):
    norms = runs[2]["norms"]
    exact = norms["spectral_exact"]
    for dim in (0, 1):  # rows: A^T A; columns: A A^T; warm-started on a changed matrix
        cold, rms_op, warm = norms[f"spectral_shard{dim}"]
        assert math.isclose(cold, exact[0], rel_tol=1e-4) and math.isclose(warm, exact[1], rel_tol=1e-4)
        assert math.isclose(rms_op, cold * math.sqrt(9 / 13), rel_tol=1e-6)


@pytest.mark.slow
def test_sharded_bad_input_is_named(runs):
    errors = runs[2]["errors"]
    assert "parameter 'w'" in errors["optim_partial"] and "Partial" in errors["optim_partial"]
    assert errors["spectral_partial"].startswith("matrix has placement")
    assert errors["update_op_deep"].startswith("parameter 'deep' has placement (S(2))")
    assert "dimension 0" in errors["update_op_deep"]
    assert errors["norms_unlike"].startswith("b[0] must be a DTensor placed as a[0]")
    assert errors["spectral_minus_unlike"].startswith("minus must be a DTensor placed as matrix")


@pytest.mark.slow
def test_gpt_fsdp_equals_one_process(tmp_path):
    args = ["-m", "spkern.experiments.train.gpt", "--width", "32", "--depth", "2", "--steps", "4",
            "--track-every", "2", "--batch-size", "8", "--context", "16", "--grad-accum", "2", "--eval-batches", "2"]
    _launch(args + ["--fsdp", "--out", str(tmp_path / "fsdp.json")], 2)
    _launch(args + ["--out", str(tmp_path / "one.json")], 1)
    _launch(args + ["--fsdp", "--dtype", "bfloat16", "--out", str(tmp_path / "bf16.json")], 2)
    a, b, h = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("fsdp", "one", "bf16"))
    assert a["processes"] == 2 and a["config"]["fsdp"] and b["processes"] == 1
    assert math.isclose(a["val_ce"], b["val_ce"], rel_tol=1e-5)
    assert (a["regime"], a["regime_step"], a["regime_evidence"]) == (b["regime"], b["regime_step"],
                                                                     b["regime_evidence"])
    ma, mb = a["last_measurement"], b["last_measurement"]
    assert ma.keys() == mb.keys() and len(mb) > 150  # every tracked statistic
    for k, v in mb.items():
        assert math.isclose(ma[k], v, rel_tol=1e-4, abs_tol=1e-6), (k, ma[k], v)
    # bfloat16 through FSDP2's mixed-precision policy: the same run, to bfloat16 rounding
    assert h["status"] == "ok" and math.isclose(h["val_ce"], b["val_ce"], rel_tol=2e-2)


@pytest.mark.slow
def test_sweep_gpt_fsdp_under_torchrun(tmp_path):
    # the sweep passes --fsdp through; every rank trains each run, rank 0 alone writes
    out = tmp_path / "sweep"
    args = ["-m", "spkern.experiments.cli", "sweep", "gpt", "--fsdp", "--widths", "32", "--lrs", "1e-2",
            "--loss", "ce", "--steps", "2", "--track-every", "1", "--context", "16", "--batch-size", "4",
            "--depth", "1", "--eval-batches", "1", "--out", str(out), "--no-progress", "--no-report"]
    _launch(args, 2)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["config"]["fsdp"] and r["processes"] == 2 and r["status"] == "ok"
    _launch(args, 2)  # resumed: the run is there already, on every rank
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
