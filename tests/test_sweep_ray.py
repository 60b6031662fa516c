"""Sweeps on a local Ray cluster of 2 workers give the serial sweep's results run for run
(spkern.experiments.engines, sweep.run's scheduler): the adaptive grid's decisions, every run
that decides them, their losses, scores, divergence steps and tracked statistics; a worker
killed mid-run is retried and its run recorded once; a killed driver loses at most the runs in
flight and a resumed sweep finishes the same set of runs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from spkern.experiments import cli, engines, sweep  # noqa: E402
from spkern.experiments.train.mlp import RunConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sweep_tasks  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs whose workers import tests/sweep_tasks.py."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = HERE + (os.pathsep + old if old else "")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old


def _configs(losses=("ce", "mse"), widths=(16, 32, 64, 128), seeds=(0, 1), lrs="1e-3:10:14"):
    return sweep.grid(RunConfig(epochs=1), loss=list(losses), width=list(widths), seed=list(seeds),
                      lr=sweep.parse_lrs(lrs))


def _by_config(out, drop=("seconds",)):
    rows = sweep.read_results(str(out))
    by = {}
    for r in rows:
        key = json.dumps(r["config"], sort_keys=True)
        assert key not in by, f"recorded twice: {key}"
        by[key] = {k: v for k, v in r.items() if k not in drop}
    return by


@pytest.mark.parametrize("adaptive", [sweep.Adaptive(), None], ids=["adaptive", "full"])
def test_the_grid_on_two_workers_is_the_serial_one(cluster, tmp_path, adaptive):
    configs = _configs() if adaptive else _configs(widths=(16, 32), lrs="1e-3:10:8")  # (a full grid: 64 runs)
    serial = sweep.run(configs, str(tmp_path / "serial"), None, progress=False, train_fn=sweep_tasks.landscape,
                       adaptive=adaptive)
    engine = engines.RayEngine(workers=2)
    assert engine.slots == 2 and engine.threads == 1
    parallel = sweep.run(configs, str(tmp_path / "ray"), None, progress=False, train_fn=sweep_tasks.landscape,
                         adaptive=adaptive, engine=engine)
    assert _by_config(tmp_path / "ray") == _by_config(tmp_path / "serial")
    for k in ("ok", "diverged", "left_out", "skipped"):
        assert parallel[k] == serial[k], k
    assert serial["speculative"] == 0
    if adaptive is None:
        assert parallel["speculative"] == 0
    # the reports agree: every width's optimal and maximal stable rate
    from spkern.experiments import report

    def chosen(out):
        return {e: {w: (v["opt_lr"], v["max_stable_lr"]) for w, v in report.summarize(rows).items()}
                for e, rows in report.experiments(sweep.read_results(str(out))).items()}
    assert chosen(tmp_path / "ray") == chosen(tmp_path / "serial")


def _same_threads_serial(configs, out, data, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (what each of the 2 workers has: float sums then round alike)
    try:
        return sweep.run(configs, out, data, device="cpu", progress=False, **kw)
    finally:
        torch.set_num_threads(threads)


def test_an_mlp_sweep_on_two_workers_is_the_serial_one_run_for_run(cluster, tmp_path):
    from spkern.experiments.data import load

    digits = load("digits")
    configs = sweep.grid(RunConfig(epochs=1, depth=1, track_every=5), loss=["ce", "mse"], width=[16, 32],
                         seed=[0], lr=[0.03, 0.3, 3.0, 30.0])
    _same_threads_serial(configs, str(tmp_path / "serial"), digits, adaptive=sweep.Adaptive(below=1, above=1))
    sweep.run(configs, str(tmp_path / "ray"), digits, device="cpu", progress=False, engine=engines.RayEngine(workers=2),
              adaptive=sweep.Adaptive(below=1, above=1))
    got, want = _by_config(tmp_path / "ray"), _by_config(tmp_path / "serial")
    assert got.keys() == want.keys() and len(got) >= 6
    for key in want:  # final losses, scores, divergence steps, every tracked statistic: the same numbers
        assert got[key] == want[key], key
    assert any(r["history"] and "layers.0/eff_rms" in r["history"][-1] for r in got.values())


def test_a_gpt_sweep_on_two_workers_is_the_serial_one_run_for_run(cluster, tmp_path):
    from spkern.experiments.text import load_tokens
    from spkern.experiments.train.gpt import GPTRunConfig

    tokens = load_tokens("pydoc")
    base = GPTRunConfig(width=32, head_dim=16, depth=1, context=16, batch_size=4, steps=6, track_every=3, warmup=2,
                        eval_batches=2)
    configs = sweep.grid(base, width=[16, 32], seed=[0, 1], lr=[1e-3, 1e-1])
    _same_threads_serial(configs, str(tmp_path / "serial"), tokens)
    sweep.run(configs, str(tmp_path / "ray"), tokens, device="cpu", progress=False, engine=engines.RayEngine(workers=2))
    got, want = _by_config(tmp_path / "ray"), _by_config(tmp_path / "serial")
    assert got.keys() == want.keys() and len(got) == 8
    for key in want:
        assert got[key] == want[key], key


def test_a_worker_killed_mid_run_is_retried_and_its_run_recorded_once(cluster, tmp_path):
    configs = _configs(losses=("ce",), widths=(16, 32), seeds=(0,))
    marks = tmp_path / "marks"
    marks.mkdir()
    sweep.run(configs, str(tmp_path / "serial"), None, progress=False, train_fn=sweep_tasks.landscape,
              adaptive=sweep.Adaptive())
    sweep.run(configs, str(tmp_path / "ray"), str(marks), progress=False, train_fn=sweep_tasks.dies_once,
              adaptive=sweep.Adaptive(), engine=engines.RayEngine(workers=2))
    assert len(os.listdir(marks)) >= 3  # (workers did die: one per run at width 16)
    assert _by_config(tmp_path / "ray") == _by_config(tmp_path / "serial")


DRIVER = """
import sys
sys.path.insert(0, {here!r})
import ray, sweep_tasks
from spkern.experiments import engines, sweep
from test_sweep_ray import _configs
ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
sweep.run(_configs(), {out!r}, 0.3, progress=False, train_fn=sweep_tasks.landscape, adaptive=sweep.Adaptive(),
          engine=engines.RayEngine(workers=2))
"""


def test_a_killed_driver_loses_at_most_the_runs_in_flight_and_a_resumed_sweep_finishes_the_same(cluster, tmp_path):
    configs = _configs()
    sweep.run(configs, str(tmp_path / "serial"), None, progress=False, train_fn=sweep_tasks.landscape,
              adaptive=sweep.Adaptive())
    out = tmp_path / "killed"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(here=HERE, address=cluster, out=str(out))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (results.exists() and results.read_text().count("\n") >= 6):
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        time.sleep(0.05)
    # a second sweep on the same folder is refused while the driver writes there
    with pytest.raises(sweep.SweepLocked):
        sweep.run(configs, str(out), None, progress=False, train_fn=sweep_tasks.landscape)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    before = _by_config(out)
    want = _by_config(tmp_path / "serial")
    assert 6 <= len(before) < len(want) and all(before[k] == want[k] for k in before)  # each one the serial run's
    counts = sweep.run(configs, str(out), 0.0, progress=False, train_fn=sweep_tasks.landscape,
                       adaptive=sweep.Adaptive(), engine=engines.RayEngine(workers=2))
    assert counts["skipped"] == len(before)
    assert _by_config(out) == want


def test_the_cli_runs_the_demo_sweep_on_ray_workers(cluster, tmp_path, capsys):
    out = str(tmp_path / "demo")
    rc = cli.main(["sweep", "mlp", "--widths", "16,32", "--lrs", "1e-2:1e2:5", "--loss", "ce", "--seeds", "1",
                   "--epochs", "1", "--depth", "1", "--grid", "adaptive", "--out", out, "--no-progress",
                   "--engine", "ray", "--workers", "2"])
    assert rc == 0 and os.path.getsize(os.path.join(out, "report.md")) > 0
    text = capsys.readouterr().out
    assert "ray: 2 runs at once, 1 core(s) each" in text


@pytest.mark.parametrize("argv,match", [
    (["--workers", "2"], "--workers only with --engine ray"),
    (["--engine", "ray", "--workers", "0"], "workers must be a positive number"),
    (["--engine", "ray", "--ahead", "-1"], "--ahead must be >= 0"),
])
def test_engine_options_are_checked(cluster, tmp_path, capsys, argv, match):
    rc = cli.run(["sweep", "mlp", "--widths", "16", "--lrs", "0.1", "--loss", "ce", "--seeds", "1", "--epochs", "1",
                  "--out", str(tmp_path / "x"), "--no-progress", "--no-report"] + argv)
    assert rc == 2 and match in capsys.readouterr().err


def test_gpus_asked_of_a_cluster_without_them_are_refused(cluster):
    with pytest.raises(ValueError, match=r"gpus_per_run=1, but the Ray cluster has 0 GPUs"):
        engines.RayEngine(gpus_per_run=1)
    assert ray.is_initialized()  # (a cluster it did not start is left running)
    with pytest.raises(ValueError, match="workers must be a positive number"):
        engines.RayEngine(workers=0)
