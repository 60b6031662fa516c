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


@pytest.fixture(params=BACKENDS)
def backend(request):
    with spkern.use_backend(request.param):
        yield request.param


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
