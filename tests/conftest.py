import contextlib

import pytest
import torch

import spkern
from spkern import registry


def available_backends():
    """Backends that can run on this machine's CPU tensors (Triton through its interpreter)."""
    probe = torch.empty(0)
    return [name for name in ("reference", "cpu", "triton")
            if registry.reason("cross_entropy", name, probe) is None]


BACKENDS = available_backends()


def other_cpu_isas():
    """The copies of the C++ CPU kernels this CPU runs besides the one spkern picks (on an
    AVX-512 machine default and avx2, on an AVX2 one default): each runs every test of the
    cpu backend again, through the run-time switch, as ``cpu:<isa>``."""
    from spkern import cpu_isa

    if "cpu" not in BACKENDS:
        return []
    return [f"cpu:{isa}" for isa in cpu_isa.supported() if isa != cpu_isa.current()]


CPU_ISAS = other_cpu_isas()


@contextlib.contextmanager
def backend_used(name):
    """``spkern.use_backend`` for a name of BACKENDS or CPU_ISAS."""
    backend, _, isa = name.partition(":")
    with spkern.use_backend(backend), (spkern.cpu_isa.use(isa) if isa else contextlib.nullcontext()):
        yield backend


@pytest.fixture(params=BACKENDS + CPU_ISAS)
def backend(request):
    with backend_used(request.param) as name:
        yield name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(items):
    # The Triton interpreter runs each launch in Python: a test marked slow_on_triton is slow
    # only with the triton backend, and only that variant is marked slow.
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("slow_on_triton") and params.get("backend") == "triton":
            item.add_marker(pytest.mark.slow)


def end_process_group(wait=False):
    """The end of a torchrun worker: its process group destroyed (after a barrier with
    ``wait``: every rank done before any tears down), then a garbage collection: gloo's
    threads hold finished work until the group object is freed, and freed by the
    interpreter's last collection they need the GIL from a dying thread (an abort at exit)."""
    import gc

    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        gc.collect()


def run_worlds(worker, folder, worlds=(2, 1), timeout=600):
    """Runs ``worker OUT`` under ``torch.distributed.run`` with each number of processes of
    ``worlds`` (1: a plain process), each writing its JSON to OUT; {world: what it wrote}."""
    import json
    import os
    import socket
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {}
    for world in worlds:
        out = os.path.join(str(folder), f"{world}.json")
        launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={port}"]
                  if world > 1 else [sys.executable])
        proc = subprocess.run(launch + [worker, out], capture_output=True, text=True, env=env, timeout=timeout)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        with open(out) as f:
            runs[world] = json.load(f)
    return runs


def assert_same_logged(got, want, rel=1e-4, abs=1e-7):
    """Two runs' logged measurements {step: {key: value}} are the same (NaN equals NaN);
    returns how many values were compared."""
    import math

    assert list(got) == list(want)
    compared = 0
    for step, values in want.items():
        assert got[step].keys() == values.keys(), step
        for k, v in values.items():
            g = got[step][k]
            assert (math.isnan(v) and math.isnan(g)) or math.isclose(g, v, rel_tol=rel, abs_tol=abs), (step, k, g, v)
            compared += 1
    return compared
