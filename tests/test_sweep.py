"""MLP training runs, sweeps (resume, divergence) and the report, end to end at tiny size."""

import json
import math
import os

import pytest
import torch

from spkern.experiments import cli, report, sweep
from spkern.experiments.data import load
from spkern.experiments.train.mlp import RunConfig, train


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


@pytest.mark.parametrize("argv, match", [
    (["--lrs", "1e-2:inf:3"], "--lrs"),
    (["--lrs", "1e-320:1e308:3"], "--lrs"),
    (["--lrs", "nan,1"], "--lrs"),
    (["--diverge-loss", "-1"], "--diverge-loss"),
    (["--diverge-loss", "nan"], "--diverge-loss"),
    (["--diverge-loss", "inf"], "--diverge-loss"),
    (["--momentum", "-1"], "--momentum"),
    (["--momentum", "nan"], "--momentum"),
    (["--stable-threshold", "nan"], "--stable-threshold"),
    (["--seeds", "1,2"], "--seeds is the number of seeds"),
    (["--seeds", "0"], "--seeds"),
])
def test_bad_options_are_one_line_and_status_2(argv, match, tmp_path, capsys):
    args = ["sweep", "mlp", "--widths", "16", "--epochs", "1", "--out", str(tmp_path / "x"), "--no-progress"] + argv
    try:
        code = cli.run(args)
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and match in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "x" / "results.jsonl")


def test_gpt_sweep_refuses_non_finite_options(tmp_path, capsys):
    for argv in (["--weight-decay", "nan"], ["--clip", "-1"], ["--diverge-loss", "inf"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["sweep", "gpt", "--out", str(tmp_path)] + argv)
        assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def test_run_configs_refuse_non_finite_values():
    from spkern.experiments.train.gpt import GPTRunConfig

    for bad in (dict(diverge_loss=math.inf), dict(momentum=math.nan), dict(momentum=-1.0), dict(lr=math.inf)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RunConfig(**bad).check()
    with pytest.raises(ValueError, match="clip"):
        GPTRunConfig(clip=math.nan).check()


def test_out_that_cannot_be_written(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out in (str(a_file), str(a_file / "below")):
        assert cli.run(["sweep", "mlp", "--widths", "16", "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--out" in err and len(err.splitlines()) == 1, err


def test_a_results_line_that_is_not_a_result(tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "results.jsonl").write_text('{"config": {"width": 16, "lr": 0.1}, "status": "ok"}\n[1, 2, 3]\n')
    with pytest.raises(sweep.ResultsError, match="results.jsonl, line 2"):
        sweep.read_results(str(out))
    for argv in (["report", str(out)],
                 ["sweep", "mlp", "--widths", "16", "--epochs", "1", "--out", str(out), "--no-progress"]):
        assert cli.run(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "line 2: not a sweep result" in err and len(err.splitlines()) == 1, err


def test_a_second_sweep_on_the_same_folder_fails_clearly(tmp_path):
    configs = _grid_configs()[:4]
    inner = {}

    def second_sweep_meanwhile(cfg, data=None, device=None, progress=None):
        if not inner:
            with pytest.raises(sweep.SweepLocked, match="another sweep is writing"):
                sweep.run(configs, str(tmp_path), None, progress=False, train_fn=_landscape)
            inner["refused"] = True
        return _landscape(cfg)

    counts = sweep.run(configs, str(tmp_path), None, progress=False, train_fn=second_sweep_meanwhile)
    assert inner["refused"] and counts["ok"] + counts["diverged"] == 4
    assert len(sweep.read_results(str(tmp_path))) == 4
    # the lock is released at the end: a later sweep on the folder runs (and skips every run)
    assert sweep.run(configs, str(tmp_path), None, progress=False, train_fn=_landscape)["skipped"] == 4


def test_a_second_process_is_refused_while_a_sweep_runs(tmp_path):
    import fcntl
    import subprocess
    import sys

    out = tmp_path / "sweep"
    out.mkdir()
    with open(out / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # as a running sweep holds it
        proc = subprocess.run([sys.executable, "-m", "spkern", "sweep", "mlp", "--widths", "16", "--epochs", "1",
                               "--lrs", "0.1", "--seeds", "1", "--loss", "ce", "--out", str(out), "--no-progress"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "another sweep is writing to" in proc.stderr, proc.stderr
    assert not (out / "results.jsonl").exists() or not (out / "results.jsonl").read_text()


def _row(width, lr, status, score, loss=0.5):
    row = {"config": {"width": width, "lr": lr, "seed": 0, "loss": "ce", "optim": "sgd", "param": "sp",
                      "data": "digits"}, "status": status, "n_classes": 10, "chance_score": 0.1, "history": []}
    return {**row, "score": score, "train_acc": score, "train_loss": loss} if status == "ok" else row


def test_report_never_picks_a_diverged_rate(tmp_path):
    # every stable run of width 32 stays near chance, beside a diverged lr: no optimum there
    rows = [_row(16, 0.1, "ok", 0.9), _row(16, 1.0, "ok", 0.95), _row(16, 10.0, "diverged", None),
            _row(32, 0.1, "ok", 0.08), _row(32, 1.0, "ok", 0.09), _row(32, 1e3, "diverged", None),
            _row(64, 0.1, "ok", 0.9), _row(64, 0.3, "ok", 0.95), _row(64, 1.0, "diverged", None),
            _row(128, 0.1, "diverged", None), _row(128, 1.0, "diverged", None)]
    s = report.summarize(report.experiments(rows)[next(iter(report.experiments(rows)))])
    assert s[16]["opt_lr"] == 1.0 and s[64]["opt_lr"] == 0.3
    assert s[32]["opt_lr"] in (0.1, 1.0) and s[32]["opt_lr"] != 1e3  # near chance, but not diverged
    assert s[128]["opt_lr"] is None and s[128]["max_stable_lr"] is None
    out = tmp_path / "sweep"
    out.mkdir()
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    md = open(report.write(str(out))).read()
    assert "| CE SGD sp | 128 | n/a | n/a | none |" in md
    assert "Left out of the fits" in md and "CE SGD sp at width 128" in md
    assert "+49" not in md


def test_run_options_and_their_defaults_come_from_the_run_configs():
    # one source of every default: the options of `spkern sweep mlp|gpt` and of
    # `python -m spkern.experiments.train.gpt` are generated from the run-config dataclasses
    import argparse
    from dataclasses import fields

    from spkern.experiments import cli, options
    from spkern.experiments.train.gpt import GPTRunConfig
    from spkern.experiments.train.mlp import RunConfig

    for add, cls in ((lambda p: cli._add_mlp_options(p, {}), RunConfig), (cli._add_gpt_options, GPTRunConfig)):
        p = argparse.ArgumentParser()
        add(p)
        args = p.parse_args([])
        assert options.config_from(args, cls) == cls()
        for f in fields(cls):
            if f.name not in options.SWEPT_AS_LISTS:
                assert getattr(args, f.name) == f.default, f.name
    p = argparse.ArgumentParser()
    options.config_options(p, GPTRunConfig, options.GPT_HELP, swept=())
    args = p.parse_args(["--no-qk-norm", "--steps", "7"])
    assert GPTRunConfig(**vars(args)) == GPTRunConfig(qk_norm=False, steps=7)


def test_a_run_carries_its_regime_and_a_catastrophic_one_is_stopped_early(digits):
    # width 64 at lr 2.15 on digits: a hidden layer's activations 120x their initial RMS by step 10,
    # and the run that goes on ends at chance accuracy
    stopped = train(RunConfig(width=64, lr=2.15, epochs=2), digits, device="cpu")
    assert stopped["status"] == "diverged" and stopped["stopped_early"] and stopped["regime"] == "catastrophic"
    assert stopped["steps"] == stopped["regime_step"] <= 10 and stopped["steps_not_run"] == 2 * 23 - stopped["steps"]
    assert any("layers.1/act_rms" in e and "catastrophic" in e for e in stopped["regime_evidence"])
    full = train(RunConfig(width=64, lr=2.15, epochs=2, stop_catastrophic=False), digits, device="cpu")
    assert full["steps"] == 46 and not full["stopped_early"] and full["regime"] == "catastrophic"
    assert full["train_acc"] < 0.2
    ok = train(RunConfig(width=32, lr=0.01, epochs=1), digits, device="cpu")
    assert ok["regime"] == "stable" and ok["regime_step"] is None and ok["steps_not_run"] == 0
    nan = train(RunConfig(width=32, lr=1e4, epochs=1), digits, device="cpu")
    assert nan["status"] == "diverged" and nan["regime"] == "catastrophic" and nan["steps"] <= 2
    json.dumps([stopped, full, ok, nan])


def test_the_sweep_counts_the_steps_early_stopping_saved(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "mlp", "--widths", "64", "--lrs", "0.01,2.15", "--loss", "ce", "--seeds", "1",
                     "--epochs", "2", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    stopped = [r for r in sweep.read_results(str(out)) if r["stopped_early"]]
    assert len(stopped) == 1 and stopped[0]["steps_not_run"] > 30
    assert (f"early stopping: 1 catastrophic run(s) stopped before their last step, {stopped[0]['steps_not_run']} "
            "of their scheduled steps not run") in text
    md = (out / "report.md").read_text()
    assert "## Regimes" in md and (out / "regime_map.png").stat().st_size > 0
    assert "| CE SGD sp | 64 |" in md and "| 1 / 0 / 1 |" in md


def _without_labels(row):
    """A result as written before runs carried a regime."""
    for k in ("regime", "regime_step", "regime_reached", "regime_evidence", "stopped_early", "steps_not_run"):
        row.pop(k, None)
    row["config"].pop("stop_catastrophic", None)
    return row


def test_the_report_reads_results_written_before_the_regimes(tmp_path, digits):
    from spkern.experiments.results import regime_of

    runs = [train(RunConfig(width=w, lr=lr, epochs=1), digits, device="cpu")
            for w in (32, 64) for lr in (0.01, 1e4)]
    out = tmp_path / "old"
    out.mkdir()
    with open(out / "results.jsonl", "w") as f:
        for r in runs:
            f.write(json.dumps(_without_labels(dict(r, config=dict(r["config"])))) + "\n")
    assert [regime_of(r) for r in sweep.read_results(str(out))] == ["stable", "catastrophic"] * 2
    md = open(report.write(str(out))).read()
    assert "written before runs carried a regime label" in md and "| CE SGD sp | 32 |" in md


def test_regime_edges_and_the_finding():
    s = {"lrs": [0.1, 0.2, 0.4, 0.8, 1.6], "regimes": ["stable", "stable", "controlled-divergence",
                                                        "controlled-divergence", "catastrophic"]}
    lo, hi = report.boundaries(s)
    assert lo == pytest.approx(math.sqrt(0.08)) and hi == pytest.approx(math.sqrt(0.8 * 1.6))
    assert report.boundaries({"lrs": [0.1, 0.2], "regimes": ["stable", "catastrophic"]}) == pytest.approx(
        (math.sqrt(0.02), math.sqrt(0.02)))
    assert report.boundaries({"lrs": [0.1], "regimes": ["catastrophic"]}) == (None, None)


def test_the_adaptive_grid_goes_down_to_the_stable_regime():
    # every rate from index 3 on is in controlled divergence; the best is index 8 (the top)
    def runs_at(i):
        return [{"status": "ok", "score": 0.5 + 0.05 * i, "train_loss": 1.0, "chance_score": 0.1,
                 "regime": "stable" if i < 3 else "controlled-divergence"}]

    known = sweep.search_grid(9, 8, runs_at, sweep.Adaptive(below=2))
    assert min(known) == 2  # (further than below=2 under the best: down to the first stable rate)
    assert min(sweep.search_grid(9, 8, runs_at, sweep.Adaptive(below=2, regimes=False))) == 6


def test_the_experiments_package_is_layered():
    """results at the bottom (nothing of the package above it), the trainers below the sweep,
    the report beside the sweep, the command line at the top: nothing imports it."""
    import ast
    import pathlib

    root = pathlib.Path(spkern_experiments_dir())

    def imports(path):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        return {m for m in found if m.startswith("spkern.experiments")}

    def name(path):
        return "spkern.experiments." + ".".join(path.relative_to(root).with_suffix("").parts)

    graph = {name(p): imports(p) for p in root.rglob("*.py")}
    above = {"spkern.experiments.results": ("sweep", "report", "cli", "train", "options"),
             "spkern.experiments.sweep": ("report", "cli"), "spkern.experiments.report": ("sweep", "cli"),
             "spkern.experiments.train.mlp": ("sweep", "report", "cli"),
             "spkern.experiments.train.gpt": ("sweep", "report", "cli")}
    for module, banned in above.items():
        bad = [m for m in graph[module] for b in banned if m.startswith(f"spkern.experiments.{b}")]
        assert not bad, (module, bad)
    assert not [m for m, deps in graph.items() if m != "spkern.experiments.cli" and "spkern.experiments.cli" in deps]


def spkern_experiments_dir():
    import spkern.experiments

    return os.path.dirname(spkern.experiments.__file__)
