"""The benchmark harness (input rotation, timing record) and `spkern bench`'s argument handling."""

import json
import os
import subprocess
import sys

import pytest
import torch

from spkern.experiments import cli

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import harness  # noqa: E402
import suite  # noqa: E402


def test_rotation_holds_twice_the_cache():
    made = []
    r = harness.Rotation(lambda i: made.append(i) or i, 300, "cpu", cache=1000, budget=10**9)
    assert len(r) == 7 and made == list(range(7)) and r.cold  # 7 x 300 >= 2 x 1000 > 6 x 300
    assert r.info() == dict(rotated_sets=7, rotated_mb=2100 / 2**20, cache_mb=1000 / 2**20, cold=True)


def test_rotation_within_budget_says_it_is_not_cold():
    r = harness.Rotation(lambda i: i, 300, "cpu", cache=1000, budget=1000)
    assert len(r) == 3 and not r.cold
    r = harness.Rotation(lambda i: i, 10, "cpu", cache=1000, budget=10**9, max_sets=5)
    assert len(r) == 5 and not r.cold
    r = harness.Rotation(lambda i: i, 5000, "cpu", cache=1000, budget=10)  # one set even over budget
    assert len(r) == 1 and r.cold
    with pytest.raises(ValueError, match="set_bytes"):
        harness.Rotation(lambda i: i, 0, "cpu")


def test_measure_cycles_through_the_sets_and_resets_them():
    rotation = harness.Rotation(lambda i: {"id": i, "grad": None}, 100, "cpu", cache=200, budget=10**9)
    assert len(rotation) == 4
    seen, resets = [], []

    def step(s):
        assert s["grad"] is None  # reset before the call
        s["grad"] = torch.ones(3)
        seen.append(s["id"])

    def reset(s):
        resets.append(s["id"])
        s["grad"] = None

    r = harness.measure(step, "cpu", repeats=6, warmup=2, before_each=reset, rotation=rotation)
    assert seen == [0, 1, 2, 3, 0, 1, 2, 3]
    assert resets == [i for i in seen for _ in range(2)]  # before and after each call
    assert all(s["grad"] is None for s in rotation.sets)  # nothing left held by the sets
    assert r["rotated_sets"] == 4 and r["cold"] and r["min_ms"] <= r["median_ms"] <= r["max_ms"]


def test_measure_without_rotation_calls_step_plainly():
    calls = []
    r = harness.measure(lambda: calls.append(1), "cpu", repeats=3, warmup=1)
    assert len(calls) == 4 and "rotated_sets" not in r


def test_cache_bytes_is_the_sysfs_value_or_zero():
    assert harness.cache_bytes("cpu") >= 0


def test_from_cache_marks_rows_that_may_not_come_from_memory():
    cache = 100 * 2**20
    row = dict(median_ms=10.0, cold=True, case="x", impl="spkern")
    assert not suite.from_cache("ce", row, 1e9, cache)
    assert suite.from_cache("ce", {**row, "cold": False}, 1e9, cache)
    warm = dict(median_ms=1.0, case="operator norm", impl="spkern spectral_norm cold", width=1024, cold=True)
    assert suite.from_cache("norms", warm, 1e9, cache)  # 4 MB swept 101 times within one call
    assert not suite.from_cache("norms", {**warm, "width": 8192}, 1e9, cache)
    old = dict(median_ms=10.0, case="x", impl="spkern")  # measured before inputs rotated: its traffic
    assert suite.from_cache("ce", old, 1e9, cache) and not suite.from_cache("ce", old, 1e11, cache)
    assert not suite.from_cache("ce", row, None, cache) and not suite.from_cache("ce", {**row, "cold": False}, 1e9, 0)


@pytest.mark.slow
def test_cross_entropy_benchmark_rotates_its_inputs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_cross_entropy.py"), "--shapes", "64x1000",
                           "--impls", "torch eager,spkern", "--repeats", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("cross_entropy_cpu_float32_*.json")
    saved = json.loads(path.read_text())
    assert [r["impl"] for r in saved["results"]] == ["torch eager", "spkern"]
    for r in saved["results"]:
        assert r["rotated_sets"] >= 1 and r["median_ms"] > 0
        assert r["cold"] == (r["rotated_mb"] >= 2 * r["cache_mb"])
    assert saved["torch"] == torch.__version__ and "commit" in saved and saved["repeats"] == 2


@pytest.mark.parametrize("argv, message", [
    (["bench", "nope"], "invalid choice"),
    (["bench", "ce", "--device", "tpu"], "invalid choice"),
])
def test_bench_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_results_go_under_the_current_directory(tmp_path, monkeypatch):
    import bench_cross_entropy

    assert suite.parser().parse_args([]).out == os.path.join("runs", "bench")
    assert harness.parser(bench_cross_entropy.__doc__).parse_args([]).out == os.path.join("runs", "bench")
    monkeypatch.chdir(tmp_path)
    bench_cross_entropy.main(["--shapes", "8x16", "--impls", "spkern", "--repeats", "1"])
    assert [p.name for p in (tmp_path / "runs" / "bench").iterdir()], "no result under ./runs/bench"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_bench_refuses_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "ce", "--device", "cuda"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_benchmark_script_refuses_bad_shapes(capsys):
    import bench_cross_entropy

    with pytest.raises(SystemExit) as e:
        bench_cross_entropy.main(["--shapes", "64x0"])
    assert e.value.code == 2 and "--shapes" in capsys.readouterr().err


def test_tracker_benchmark_interleaved():
    import bench_tracker

    out = bench_tracker.interleaved(32, 8, "cpu", 2, cycle=2)
    assert list(out) == bench_tracker.IMPLS
    for impl, r in out.items():
        if "skipped" in r:
            assert impl == "torch-module-monitor"
            continue
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["peak_extra_mb"] is None
        assert r["paired_overhead"] > -1 and (impl != "no tracking" or r["paired_overhead"] == 0)
        assert r["vs_floor"] > 0 and (impl != bench_tracker.FLOOR or r["vs_floor"] == 1)


def test_tracker_benchmark_batch_option(tmp_path, capsys):
    import bench_tracker

    assert bench_tracker.main(["--widths", "16", "--batch", "12", "--repeats", "1", "--interleave", "--impls",
                               f"spkern Tracker,{bench_tracker.FLOOR}", "--out", str(tmp_path)]) == 0
    assert "x the floor" in capsys.readouterr().out
    saved = json.loads(next(tmp_path.glob("tracker_cpu_interleaved_*.json")).read_text())
    assert {(r["batch"], r["probe_rows"]) for r in saved["results"]} == {(12, 12)}
    with pytest.raises(SystemExit):
        bench_tracker.main(["--batch", "0"])


@pytest.mark.slow
def test_tracker_benchmark_on_the_gpt_and_a_subset(tmp_path, capsys):
    import bench_tracker

    impls = ["no tracking", "spkern Tracker probe=batch", "spkern Tracker probe=16"]
    out = bench_tracker.interleaved(32, 8, "cpu", 1, impls=impls, cycle=2, model_kind="gpt")
    assert list(out) == impls and "skipped" in out["spkern Tracker probe=16"]
    assert out["spkern Tracker probe=batch"]["median_ms"] > 0
    assert bench_tracker.main(["--quick", "--widths", "16", "--repeats", "1", "--impls", "spkern loss and optimizer only",
                               "--out", str(tmp_path)]) == 0
    assert "spkern loss and optimizer only" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_tracker.main(["--impls", "nothing like it"])


def _fake_wheel(folder, dist, module, version):
    # a minimal wheel pip installs offline: the module and its dist-info
    import zipfile

    info = f"{dist}-{version}.dist-info"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.parametrize("with_wheels", [True, False])
def test_gpu_run_dry_run_exercises_every_stage(tmp_path, with_wheels):
    # the GPU run's plumbing on CPU: every stage runs under its cap, logs and stages.tsv land
    # in the results folder as each finishes; the peers install from their wheels, or are skipped
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    if with_wheels:
        _fake_wheel(wheels, "liger_kernel", "liger_kernel", "0.0.1")
    out = tmp_path / "out"
    r = subprocess.run(["bash", os.path.join(root, "bench", "gpu_run.sh"), "--dry-run", str(out)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHON": sys.executable, "PEER_WHEELS": str(wheels)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()[1:]]
    names = [row[0] for row in rows]
    assert names[:4] == ["device", "peers", "build", "gpu_tests"] and len(names) == 10
    ran = [row for row in rows if with_wheels or row[0] != "peers"]
    assert all(row[1] == "ok" for row in ran), rows
    assert all((out / f"{row[0]}.log").exists() for row in ran)
    found = (out / "gpu_tests.log").read_text()
    if with_wheels:
        assert "'liger-kernel': '0.0.1'" in found
    else:
        assert rows[1][1].startswith("skipped") and "liger-kernel" not in found


@pytest.mark.slow
def test_bench_sharded_runs_ddp_fsdp_and_tp(tmp_path, capsys):
    # the plumbing: three torchrun jobs (DDP, FSDP2, TP), one row each, memory halved by
    # sharding and by splitting the layers; the vocabulary-parallel loss's timing
    import bench_sharded

    assert bench_sharded.main(["--quick", "--models", "mlp", "--widths", "64", "--repeats", "1",
                               "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| mlp | 64 | ddp |" in out and "| mlp | 64 | fsdp |" in out and "FSDP2 memory 0.50x" in out
    assert "| mlp | 64 | tp |" in out and "TP memory 0.50x" in out
    assert "vocabulary-parallel cross-entropy, 512 rows x 8192 classes over 2 ranks" in out
    saved = json.loads(next(tmp_path.glob("sharded_cpu_*.json")).read_text())
    assert {r["parallel"] for r in saved["results"]} == {"ddp", "fsdp", "tp"}
    assert saved["losses"][0]["all_gather_bytes_sent_per_rank"] == 7 * 512 * 4
    with pytest.raises(SystemExit):
        bench_sharded.main(["--models", "cnn"])


@pytest.mark.slow
def test_bench_vocab_parallel_quick(tmp_path, capsys):
    # the plumbing: three arms in fresh processes, the fused linear loss's peak memory per
    # rank below torch's (which makes the logits, their softmax and their gradient)
    import bench_vocab_parallel

    assert bench_vocab_parallel.main(["--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert "| spkern-tp | 2 |" in capsys.readouterr().out
    saved = json.loads(next(tmp_path.glob("vocab_parallel_cpu_*.json")).read_text())
    by = {r["arm"]: r for r in saved["results"]}
    assert set(by) == {"torch", "spkern", "spkern-tp"}
    assert max(by["spkern-tp"]["peak_extra_bytes_per_rank"]) < by["torch"]["peak_extra_bytes"]


def test_bench_op_norm_quick(tmp_path, capsys):
    import bench_op_norm

    assert bench_op_norm.main(["--quick", "--widths", "64", "--repeats", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 64 | 3% | power 1 |" in out and "| 64 | 10% | lanczos 1, tol 0.001 |" in out
    saved = json.loads(next(tmp_path.glob("op_norm_cpu_*.json")).read_text())
    assert len(saved["results"]) == 10 and all(r["worst_error"] <= 1e-5 for r in saved["results"])
    assert {r["drift"] for r in saved["results"]} == {0.03, 0.1}
    with pytest.raises(SystemExit):
        bench_op_norm.main(["--drifts", "2"])


def test_cross_entropy_stats_cost_quick(tmp_path, capsys):
    import bench_cross_entropy

    assert bench_cross_entropy.main(["--stats-cost", "--shapes", "64x300", "--repeats", "2", "--out", str(tmp_path)]) == 0
    assert "statistics cost" in capsys.readouterr().out
    saved = json.loads(next(tmp_path.glob("cross_entropy_stats_cost_cpu_*.json")).read_text())
    (r,) = saved["results"]
    assert r["rounds"] == 2 and r["spkern_median_ms"] > 0 and r["stats_vs_eager"] > 0
    with pytest.raises(SystemExit):
        bench_cross_entropy.main(["--stats-cost", "--loss", "mse"])


def test_linear_cross_entropy_interleaved_quick(tmp_path, capsys):
    import bench_linear_cross_entropy

    assert bench_linear_cross_entropy.main(["--interleave", "--shapes", "64x16x300", "--repeats", "2",
                                            "--out", str(tmp_path)]) == 0
    assert "vs floor" in capsys.readouterr().out
    saved = json.loads(next(tmp_path.glob("linear_cross_entropy_cpu_float32_interleaved_*.json")).read_text())
    by = {r["impl"]: r for r in saved["results"]}
    assert set(by) == {"three matmuls", "spkern", "spkern +stats"} and by["three matmuls"]["vs_floor"] == 1
    assert all(r["median_ms"] > 0 and r["rounds"] == 2 for r in by.values())
