"""The names shared with the kernels are defined once per language and agree."""

import pytest
import torch

import spkern
from spkern import registry
from spkern.constants import NORM_COLUMNS, PAIR_COLUMNS, Kind, Sum


def test_python_and_cpp_agree():
    C = registry.compiled()
    if C is None:
        pytest.skip("spkern._C not built")
    cpp = C.constants()
    for k in Kind:
        assert cpp[k.name] == int(k), k
    for s in Sum:
        assert cpp[s.name] == int(s), s
    assert cpp["NORM_COLUMNS"] == len(NORM_COLUMNS) and cpp["PAIR_COLUMNS"] == len(PAIR_COLUMNS)


def test_the_triton_kernels_take_the_python_values():
    kernels = registry.triton_kernels("cross_entropy")
    if kernels is None:
        pytest.skip("triton not installed")
    assert [int(getattr(kernels, k.name).value) for k in Kind] == [int(k) for k in Kind]
    features = registry.triton_kernels("features")
    assert [int(getattr(features, s.name).value) for s in Sum] == [int(s) for s in Sum]
    norms = registry.triton_kernels("norms")
    assert [int(getattr(norms, s.name).value) for s in list(Sum)[:4]] == [0, 1, 2, 3]


def test_both_results_share_one_order_and_read_by_name(backend):
    a, b = torch.randn(3, 7), torch.randn(3, 7)
    norms = spkern.multi_tensor_norms([a], [b])[0]
    pair = spkern.pair_stats(a, b)
    assert spkern.features.PAIR_COLUMNS[:4] == spkern.norms.NORM_COLUMNS
    for s in list(Sum)[:4]:
        torch.testing.assert_close(norms[s].double(), pair[s], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pair[Sum.DIFF_SQ], (a - b).double().square().sum(), rtol=1e-5, atol=0)
