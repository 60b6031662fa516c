"""One build for every x86-64 CPU: the CPU kernels compiled once per instruction set into the
one extension, the widest the CPU runs chosen at load, a narrower one forced at run time
(SPKERN_CPU_ISA, spkern.cpu_isa.use), one the CPU cannot run refused by name. (Every test of
the cpu backend also runs on each other copy this CPU runs: conftest's CPU_ISAS.)"""

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import spkern
from spkern import cpu_isa, registry

X86 = platform.machine().lower() in ("x86_64", "amd64")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_setup", os.path.join(ROOT, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    return setup


def test_every_instruction_set_is_built_in_and_the_widest_this_cpu_runs_is_used():
    assert cpu_isa.compiled() == (["default", "avx2", "avx512"] if X86 else ["default"])
    assert cpu_isa.supported()[0] == "default"
    assert cpu_isa.current() == cpu_isa.supported()[-1]
    assert "widest" in cpu_isa.reason()
    # what this CPU lacks agrees with the kernel's own flags (where Linux reports them)
    if os.path.exists("/proc/cpuinfo"):
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
        for v in cpu_isa.variants():
            assert v["missing"] == [f for f in v["needs"] if f not in flags], v


def test_setup_compiles_each_copy_for_the_features_it_is_checked_for():
    setup = _setup_module()
    assert setup.isas() == cpu_isa.compiled()
    for v in cpu_isa.variants():
        flags = setup.ISA_FLAGS[v["isa"]]
        assert f"-DCPU_CAPABILITY={v['isa'].upper()}" in flags
        assert all(f"-m{f}" in flags for f in v["needs"]), v  # each feature its flags enable is checked
        assert {f[2:] for f in flags if f.startswith("-m")} == set(v["needs"]), v


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 and objdump")
def test_code_outside_the_wide_copies_uses_no_avx():
    # Inline functions of torch's and the standard headers are compiled into every copy and
    # the linker keeps one of each: setup.py links the portable objects first, so the one kept
    # is portable; the bindings, the dispatch and the portable kernels must never run an AVX
    # instruction (on a CPU without AVX that is the illegal instruction this build exists to avoid)
    so = registry.compiled().__file__
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", so], capture_output=True, text=True,
                             check=True).stdout
    wide = re.compile(r"::AVX2::|::AVX512::|4AVX2|6AVX512")  # (demangled, or a name objdump left mangled)
    function, seen, offenders = None, {"AVX2": 0, "AVX512": 0}, {}
    for line in listing.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            function = head.group(1)
            continue
        if function is None:
            continue
        parts = line.split("\t")
        mnemonic = parts[1].split()[0] if len(parts) > 1 and parts[1].split() else ""
        avx = mnemonic.startswith("v") or "%ymm" in line or "%zmm" in line
        if wide.search(function):
            if "%ymm" in line or "%zmm" in line:
                seen["AVX512" if "AVX512" in function else "AVX2"] += 1
        elif avx:
            offenders.setdefault(function, line.strip())
    assert not offenders, list(offenders.items())[:10]
    assert seen["AVX2"] > 100 and seen["AVX512"] > 100, seen  # (the wide copies are what they say)


def _loss_and_grad(x, t):
    x = x.detach().requires_grad_(True)
    loss, stats = spkern.cross_entropy(x, t, return_stats=True, label_smoothing=0.05)
    loss.backward()
    return loss.detach(), stats, x.grad


def test_each_copy_this_cpu_runs_is_used_when_asked_and_agrees_with_torch():
    x = torch.randn(37, 1003)  # (not a multiple of any vector width)
    t = torch.randint(0, 1003, (37,))
    x64 = x.double().requires_grad_(True)
    want = F.cross_entropy(x64, t, label_smoothing=0.05)
    want_grad, = torch.autograd.grad(want, x64)
    before = cpu_isa.current()
    for isa in cpu_isa.supported():
        with cpu_isa.use(isa):
            assert cpu_isa.current() == isa and cpu_isa.reason() == f"spkern.cpu_isa.use({isa!r})"
            with spkern.use_backend("cpu"):
                loss, stats, grad = _loss_and_grad(x, t)
        torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-8)
        assert cpu_isa.current() == before  # (the block's end restores it)
    # without a block it stays
    forced = cpu_isa.use("default")
    try:
        assert cpu_isa.current() == "default"
    finally:
        forced.__exit__(None, None, None)
    assert cpu_isa.current() == before and "widest" in cpu_isa.reason()


def test_a_copy_this_cpu_cannot_run_or_that_is_not_built_is_refused_by_name():
    before = cpu_isa.current()
    lacking = [v for v in cpu_isa.variants() if v["missing"]]
    for v in lacking:  # (on this project's AVX2 machines: avx512)
        with pytest.raises(ValueError, match=f"the {v['isa']} CPU kernels need {', '.join(v['missing'])}"):
            cpu_isa.use(v["isa"])
    with pytest.raises(ValueError, match=r"no sse4 CPU kernels in this build of spkern._C \(it has default"):
        cpu_isa.use("sse4")
    with pytest.raises(TypeError, match="isa must be a string"):
        cpu_isa.use(2)
    assert cpu_isa.current() == before  # a refused request changes nothing
    with spkern.use_backend("cpu"):
        spkern.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 4]))


def _run(code, env):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    return proc.returncode, proc.stdout, proc.stderr


def test_the_environment_forces_a_narrower_copy_at_load():
    rc, out, err = _run("import spkern, torch\n"
                        "from spkern import cpu_isa\n"
                        "spkern.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 4]))\n"
                        "print(cpu_isa.current(), '|', cpu_isa.reason())\n", {"SPKERN_CPU_ISA": "default"})
    assert rc == 0, err[-2000:]
    assert out.strip() == "default | SPKERN_CPU_ISA=default"


@pytest.mark.parametrize("asked", ["avx512", "sse4"])
def test_an_impossible_request_in_the_environment_is_a_clear_error(asked):
    lacking = {v["isa"]: v["missing"] for v in cpu_isa.variants() if v["missing"]}
    if asked == "avx512" and asked not in lacking:
        pytest.skip("this CPU runs the avx512 kernels")
    rc, out, err = _run("import spkern, torch\n"
                        "spkern.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 4]))\n", {"SPKERN_CPU_ISA": asked})
    assert rc == 1 and "Illegal instruction" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ValueError: SPKERN_CPU_ISA='{asked}': "), last
    assert (f"need {', '.join(lacking[asked])}" if asked in lacking else "no sse4 CPU kernels") in last
    assert f"this CPU runs {', '.join(cpu_isa.supported())}" in last
    # spkern info still reports, with the reason
    rc, out, err = _run("from spkern import info; print(info.text())", {"SPKERN_CPU_ISA": asked})
    assert rc == 0, err[-2000:]
    assert f"SPKERN_CPU_ISA='{asked}'" in out and "ops: not listed" in out


def test_info_says_what_is_built_in_and_what_runs_and_why():
    from spkern import info

    text = info.text()
    assert f"CPU kernels for {', '.join(cpu_isa.compiled())}" in text
    assert re.search(rf"CPU kernels in use +{cpu_isa.current()}: the widest built in that this CPU runs", text)
    assert "torch's CPU kernels" in text
    with cpu_isa.use("default"):
        assert re.search(r"CPU kernels in use +default: spkern.cpu_isa.use\('default'\)", info.text())
