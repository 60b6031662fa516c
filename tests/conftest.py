import pytest
import torch

import spkern
from spkern import _backend


def available_backends():
    """Backends that can run on this machine's CPU tensors (Triton through its interpreter)."""
    probe = torch.empty(0)
    return [name for name in ("reference", "cpu", "triton")
            if _backend.unavailable_reason(name, probe, "cross_entropy") is None]


BACKENDS = available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    with spkern.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
