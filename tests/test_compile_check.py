"""spkern compile-check: every Triton kernel compiled for real GPUs without one."""

import importlib
import subprocess
import sys

import pytest

from spkern import compile_check


def test_every_kernel_has_its_configurations():
    # each @triton.jit kernel a launcher calls (the *_kernel functions) is compiled
    for module in compile_check.MODULES:
        kernels = importlib.import_module(f"spkern.kernels.{module}")
        launched = {n for n, v in vars(kernels).items() if n.startswith("_") and n.endswith("_kernel")
                    and v.fn.__module__ == kernels.__name__}  # (defined there, not imported)
        configured = {fn.__name__ for fn, *_ in kernels.compile_configs()}
        assert launched == configured, module


def test_what_fails_the_check():
    ok = dict(kernel="k", config="c", arch="sm_90", registers=64, spill_bytes=0, shared_bytes=1024, seconds=1.0)
    assert compile_check.problems(ok) == ""
    assert compile_check.problems({**ok, "error": "CompilationError: x"}) == "compile error"
    assert compile_check.problems({**ok, "spill_bytes": 8}) == "spills"
    assert compile_check.problems({**ok, "arch": "sm_80", "shared_bytes": 200 * 1024}) == "shared memory over the limit"
    assert compile_check.problems({**ok, "shared_bytes": 200 * 1024}) == ""  # fits sm_90's 227 KB
    assert "| k | c | sm_90 |" in compile_check.table([ok])


@pytest.mark.slow
def test_compile_check_quick_passes():
    r = subprocess.run([sys.executable, "-m", "spkern", "compile-check", "--quick", "--arch", "sm_90"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("_cross_entropy_fwd_kernel", "_pair_stats_kernel", "_paired_linear_kernel", "_chunk_kernel",
                 "_reduce_kernel", "_sgd_kernel", "_adamw_kernel"):
        assert name in r.stdout, name
    assert "0 failing" in r.stdout


def test_bad_arch_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "spkern", "compile-check", "--arch", "ampere"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--arch" in r.stderr
