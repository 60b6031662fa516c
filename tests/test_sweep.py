"""MLP training runs, sweeps (resume, divergence) and the report, end to end at tiny size."""

import json
import math
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


def _landscape(cfg, data=None, device=None, progress=None):
    """A stand-in for a training run: the score peaks at lr = 8 / width (and stays high up
    to the edge of stability at 16 / width), every run above that diverges."""
    from dataclasses import asdict

    edge, best = 16.0 / cfg.width, 8.0 / cfg.width
    r = {"config": asdict(cfg), "n_classes": 10, "chance_score": 0.1, "seconds": 0.0, "history": []}
    if cfg.lr > edge * 1.0001:
        return {**r, "status": "diverged", "diverged_step": 3}
    distance = abs(math.log(cfg.lr / best))
    return {**r, "status": "ok", "diverged_step": None, "score": max(0.1, 1.0 - 0.2 * distance) - 1e-3 * cfg.seed,
            "train_loss": 0.1 + distance}


def _grid_configs(lrs="1e-3:10:14"):
    return sweep.grid(RunConfig(epochs=1), loss=["ce"], width=[16, 32, 64, 128], seed=[0, 1],
                      lr=sweep.parse_lrs(lrs))


def _chosen(out):
    s = report.summarize(report.experiments(sweep.read_results(out))[next(iter(
        report.experiments(sweep.read_results(out))))])
    return {w: (v["opt_lr"], v["max_stable_lr"]) for w, v in s.items()}


def test_adaptive_grid_finds_what_the_full_grid_finds(tmp_path):
    configs = _grid_configs()
    full = sweep.run(configs, str(tmp_path / "full"), None, progress=False, train_fn=_landscape)
    adaptive = sweep.run(configs, str(tmp_path / "adaptive"), None, progress=False, train_fn=_landscape,
                         adaptive=sweep.Adaptive())
    assert full["ok"] + full["diverged"] == len(configs)
    ran = adaptive["ok"] + adaptive["diverged"]
    assert ran + adaptive["left_out"] == len(configs) and ran < len(configs) / 2
    assert _chosen(str(tmp_path / "adaptive")) == _chosen(str(tmp_path / "full"))
    # every width: `below` rates under its optimum, `above` unstable rates over its maximal stable one
    rows = sweep.read_results(str(tmp_path / "adaptive"))
    grid = sorted({c.lr for c in configs})
    for width, (opt, top) in _chosen(str(tmp_path / "adaptive")).items():
        run = sorted({r["config"]["lr"] for r in rows if r["config"]["width"] == width})
        assert run[0] == grid[max(0, grid.index(opt) - 3)]
        # (the first width starts at the top of the grid, every later one at the previous optimum)
        assert run[-1] == (grid[-1] if width == 16 else grid[min(len(grid) - 1, grid.index(top) + 2)])
        assert run == grid[grid.index(run[0]):grid.index(run[-1]) + 1]  # no holes
        assert len([r for r in rows if r["config"]["width"] == width]) == 2 * len(run)  # both seeds


def test_search_grid_from_the_middle_and_from_below():
    # scores by index: stable up to 9, best at 6; a start below the optimum walks up to it
    def runs_at(i, seen=[]):
        seen.append(i)
        if i > 9:
            return [{"status": "diverged", "chance_score": 0.1}]
        return [{"status": "ok", "score": 1.0 - 0.1 * abs(i - 6), "train_loss": 1.0, "chance_score": 0.1}]

    for start, expected in ((2, range(2, 12)), (6, range(3, 12)), (15, range(3, 16)), (11, range(3, 13))):
        known = sweep.search_grid(16, start, runs_at)
        assert sorted(known) == list(expected), (start, sorted(known))
        assert sweep.best_of(known) == 6


def test_adaptive_sweep_resumes_with_the_same_decisions(tmp_path):
    configs = _grid_configs()
    reference = tmp_path / "ref"
    sweep.run(configs, str(reference), None, progress=False, train_fn=_landscape, adaptive=sweep.Adaptive())
    calls = []

    def killed_after_five(cfg, data=None, device=None, progress=None):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(cfg)
        return _landscape(cfg)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        sweep.run(configs, str(out), None, progress=False, train_fn=killed_after_five, adaptive=sweep.Adaptive())
    counts = sweep.run(configs, str(out), None, progress=False, train_fn=_landscape, adaptive=sweep.Adaptive())
    assert counts["skipped"] == 5
    key = lambda r: json.dumps(r["config"], sort_keys=True)  # noqa: E731
    assert sorted(map(key, sweep.read_results(str(out)))) == sorted(map(key, sweep.read_results(str(reference))))


def test_cli_adaptive_grid(tmp_path):
    out = str(tmp_path / "sweep")
    rc = cli.main(["sweep", "mlp", "--widths", "16,32", "--lrs", "1e-2:1e3:6", "--loss", "ce", "--seeds", "1",
                   "--epochs", "1", "--depth", "1", "--grid", "adaptive", "--out", out, "--no-progress"])
    assert rc == 0 and os.path.getsize(os.path.join(out, "report.md")) > 0
    with pytest.raises(SystemExit, match="--grid-below"):
        cli.main(["sweep", "mlp", "--grid", "adaptive", "--grid-below", "-1", "--out", out, "--no-progress"])
