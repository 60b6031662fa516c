"""The package as a newcomer meets it: ``import spkern`` reaches every public name and
submodule, imports torch only when something needs it, and the ``spkern`` command answers
``--help`` at once, in plain text, with the defaults shown."""

import subprocess
import sys

import pytest

import spkern


def _run(code):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_import_spkern_reaches_every_public_name_and_submodule():
    for name in spkern.__all__:
        assert getattr(spkern, name) is not None, name
    for name in ("optim", "functional", "hf", "monitor", "features", "norms", "experiments", "registry", "coord"):
        assert getattr(spkern, name).__name__ == f"spkern.{name}", name
    assert callable(spkern.cross_entropy)  # (the function, though a submodule has its name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        spkern.nope
    # in a fresh interpreter: nothing imported until used, then everything reachable
    out = _run("import sys, spkern\n"
               "print('torch' in sys.modules)\n"
               "spkern.hf, spkern.functional, spkern.Tracker\n"
               "import spkern._C\n"  # (the extension, alone: it needs torch's libraries, loaded first)
               "print('torch' in sys.modules)")
    assert out.split() == ["False", "True"]


def test_the_command_answers_help_at_once():
    out = _run("import sys\n"
               "from spkern.experiments import cli\n"
               "try:\n"
               "    cli.main(['--help'])\n"
               "except SystemExit:\n"
               "    pass\n"
               "print('torch imported:', 'torch' in sys.modules)")
    assert "torch imported: False" in out  # (its options are built for the command asked for only)
    assert "``" not in out and "spkern demo" in out
    demo = subprocess.run([sys.executable, "-m", "spkern", "demo", "--help"], capture_output=True, text=True,
                          timeout=300).stdout
    assert "(default: 64,128,256,512,1024,2048)" in demo and "(default: 10)" in demo
    bad = subprocess.run([sys.executable, "-m", "spkern", "bench", "--bogus"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
