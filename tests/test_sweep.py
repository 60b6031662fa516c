"""MLP training runs, sweeps (resume, divergence) and the report, end to end at tiny size."""

import json
import os

import pytest
import torch

from spkern import cli, report, sweep
from spkern.data import load
from spkern.train.mlp import RunConfig, train


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def test_a_run_learns_and_tracks(digits):
    r = train(RunConfig(width=32, lr=0.3, epochs=3, track_every=5), digits, device="cpu")
    assert r["status"] == "ok" and r["diverged_step"] is None
    assert r["train_acc"] > 0.8 and r["steps"] == 3 * 23
    h = r["history"][-1]
    for k in ("train/loss", "logits/rms", "layers.1/change_rms", "layers.1/eff_rms", "layers.1/prop_rms"):
        assert h[k] is not None and h[k] >= 0, k
    assert "layers.2.weight/update_rms" in r["final_metrics"]
    json.dumps(r)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_divergence_is_recorded(digits, loss):
    r = train(RunConfig(width=32, lr=1e4, loss=loss, epochs=2, track_every=5), digits, device="cpu")
    assert r["status"] == "diverged" and 0 <= r["diverged_step"] < 10 and "train_acc" not in r


def test_bfloat16_autocast_and_adam(digits):
    r = train(RunConfig(width=32, lr=1e-2, optim="adam", param="mup", dtype="bfloat16", epochs=1), digits,
              device="cpu")
    assert r["status"] == "ok" and r["train_acc"] > 0.5


def test_sweep_resumes_after_interruption(tmp_path, digits):
    base = RunConfig(width=16, epochs=1, track_every=5)
    configs = sweep.grid(base, lr=[0.1, 0.3, 1e4], width=[16, 32])
    calls = []

    def flaky(cfg, data, device=None, progress=None):
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the fourth run
        calls.append(cfg)
        return train(cfg, data, device=device, progress=progress)

    with pytest.raises(KeyboardInterrupt):
        sweep.run(configs, str(tmp_path), digits, device="cpu", progress=False, train_fn=flaky)
    assert len(sweep.read_results(str(tmp_path))) == 3
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"config": {"width": 16, "lr"')  # a line torn by the kill
    counts = sweep.run(configs, str(tmp_path), digits, device="cpu", progress=False)
    assert counts["skipped"] == 3 and counts["ok"] + counts["diverged"] == 3
    rows = sweep.read_results(str(tmp_path))
    assert len(rows) == 6 and sum(r["status"] == "diverged" for r in rows) == 2


def test_cli_sweep_writes_every_figure(tmp_path):
    out = str(tmp_path / "sweep")
    rc = cli.main(["sweep", "mlp", "--widths", "16,32,64", "--lrs", "0.03:3:3", "--loss", "ce,mse", "--seeds", "1",
                   "--epochs", "1", "--depth", "1", "--track-every", "5", "--out", out, "--no-progress"])
    assert rc == 0
    for name in ("report.md", "accuracy_vs_lr.png", "loss_vs_lr.png", "lr_exponents.png", "logit_rms.png",
                 "feature_learning.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    md = open(os.path.join(out, "report.md")).read()
    assert "CE SGD sp" in md and "MSE SGD sp" in md and "Fitted learning-rate exponents" in md
    assert cli.main(["report", out]) == 0


def test_fit_exponent():
    slope, ci, n = report.fit_exponent([64, 128, 256, 512], [1.0, 0.5 ** 0.5, 0.5, 0.5 ** 1.5])
    assert abs(slope + 0.5) < 1e-9 and ci < 1e-6 and n == 4
    assert report.fit_exponent([64], [1.0])[0] is None
    assert report.fit_exponent([64, 128], [1.0, None])[0] is None


@pytest.mark.parametrize("argv, match", [
    (["sweep", "mlp", "--lrs", "abc"], "--lrs"),
    (["sweep", "mlp", "--widths", "0,4"], "--widths"),
    (["sweep", "mlp", "--loss", "hinge"], "--loss: unknown value 'hinge'"),
    (["sweep", "mlp", "--param", "xyz"], "--param"),
    (["sweep", "mlp", "--data", "mnist"], "root"),
    (["sweep", "mlp", "--epochs", "0"], "--epochs"),
    (["report", "/nonexistent/sweep"], "no results"),
])
def test_bad_arguments(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        cli.main(argv + (["--out", str(tmp_path / "x"), "--no-progress"] if argv[0] == "sweep" else []))


def test_cuda_requested_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        cli.main(["sweep", "mlp", "--device", "cuda", "--out", str(tmp_path)])


def test_parse_lrs():
    v = sweep.parse_lrs("1e-3:10:5")
    assert len(v) == 5 and abs(v[0] - 1e-3) < 1e-15 and abs(v[-1] - 10) < 1e-12
    assert sweep.parse_lrs("0.1,1") == [0.1, 1.0]
    with pytest.raises(ValueError):
        sweep.parse_lrs("-1:1:3")
