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
    assert set(one) == {"probe/spkern", "first/spkern", "batch/spkern", "probe/torch", "batch/torch"}
    compared = 0
    for mode, want in one.items():
        assert got[mode].keys() == want.keys(), mode
        assert {"0/eff_rms", "0/eff_row_l2", "2/prop_rms", "2/input_row_l2", "2/eff_align", "2/delta_w_op",
                "4/eff_rms", "logits/rms", "train/loss"} <= want.keys()
        for k, v in want.items():
            g = got[mode][k]
            assert (math.isnan(v) and math.isnan(g)) or _close(g, v, 1e-4, 1e-6), (mode, k, g, v)
            compared += 1
    assert compared >= 400
