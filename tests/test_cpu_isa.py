"""The extension's instruction set, recorded at build time and checked before the extension
is loaded: on a CPU that lacks it spkern says so and runs without it (no SIGILL)."""

import json
import os
import subprocess
import sys

import pytest

from spkern import cpu_isa, registry

AVX2_ONLY = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c".split())
AVX512 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def test_the_build_recorded_what_it_compiled():
    C = registry.compiled()
    assert C is not None
    assert cpu_isa.built_isa() == C.compiled_isa()


def test_setup_builds_for_the_recorded_instruction_sets():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_setup", os.path.join(os.path.dirname(cpu_isa.__file__), "..",
                                                                          "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    assert set(setup.ISA_FLAGS) == set(cpu_isa.NEEDS)
    for isa, needs in cpu_isa.NEEDS.items():  # each feature a build needs is one its flags enable
        flags = " ".join(setup.ISA_FLAGS[isa])
        assert all(f"-m{f}" in flags for f in needs), isa


@pytest.mark.parametrize("isa,flags,runs", [("avx512", AVX2_ONLY, False), ("avx512", AVX512, True),
                                            ("avx2", AVX2_ONLY, True), ("avx2", frozenset({"sse2"}), False),
                                            ("default", frozenset(), True), (None, AVX2_ONLY, True)])
def test_cannot_run_names_what_is_missing(isa, flags, runs):
    why = cpu_isa.cannot_run(isa, flags)
    assert (why is None) == runs
    if not runs:
        assert f"built for {isa}" in why and "illegal instruction" in why
        assert f"SPKERN_CPU_ISA={cpu_isa.best_here(flags)}" in why
        assert "avx512f" in why if isa == "avx512" else "avx2" in why


def test_an_extension_this_cpu_cannot_run_is_not_loaded(tmp_path):
    # a process that sees this CPU as AVX2-only and the extension as built for AVX-512: it
    # never imports spkern._C, warns once why, and the losses run on the reference backend
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, warnings\n"
        "import torch\n"
        "from spkern import cpu_isa\n"
        f"cpu_isa.cpu_flags = lambda: frozenset({sorted(AVX2_ONLY)!r})\n"
        "cpu_isa.built_isa = lambda: 'avx512'\n"
        "import spkern\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    loss = spkern.cross_entropy(torch.randn(4, 7), torch.tensor([0, 1, 2, 6]))\n"
        "assert 'spkern._C' not in sys.modules, 'the extension was imported'\n"
        "messages = [str(w.message) for w in caught]\n"
        "assert any('built for avx512, which this CPU cannot run' in m for m in messages), messages\n"
        "assert spkern.registry.resolve('cross_entropy', torch.randn(2, 3)) is not None\n"
        "print('ok', float(loss))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok ")


def test_info_says_what_was_built_and_what_this_cpu_runs():
    from spkern import info

    text = info.text()
    assert "this CPU runs" in text and "torch's choice" in text
    assert f"CPU kernels for {cpu_isa.built_isa()}" in text


def test_the_record_is_package_data(tmp_path):
    # (a wheel carries it: setup.py names it as the package's data)
    setup_py = open(os.path.join(os.path.dirname(cpu_isa.__file__), "..", "setup.py")).read()
    assert 'package_data={"spkern": ["_build_info.json"]}' in setup_py
    assert json.load(open(cpu_isa.BUILD_INFO))["cpu_isa"] in cpu_isa.NEEDS
