"""Wigner-3j: equality with e3nn (sign and normalisation), orthogonality, selection rules."""

import itertools

import pytest
import torch
from e3nn import o3

from molnets.layers.clebsch_gordan import wigner_3j

LMAX = 6
TRIPLES = [
    (l1, l2, l3)
    for l1, l2, l3 in itertools.product(range(LMAX + 1), repeat=3)
    if abs(l1 - l2) <= l3 <= l1 + l2
]


def test_equals_e3nn_all_triples_up_to_6():
    for l1, l2, l3 in TRIPLES:
        ours = wigner_3j(l1, l2, l3, dtype=torch.float64)
        ref = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
        assert ours.shape == (2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1)
        assert (ours - ref).abs().max() <= 1e-12, (l1, l2, l3)


def test_odd_sum_is_not_zero():
    # the real 3j of e3nn does not vanish for odd l1 + l2 + l3: (1, 1, 1) is the cross product
    C = wigner_3j(1, 1, 1, dtype=torch.float64)
    x, y = torch.randn(2, 3, dtype=torch.float64)
    assert torch.allclose(torch.einsum("a,b,abc->c", x, y, C), torch.linalg.cross(x, y) / 6**0.5)


@pytest.mark.parametrize("l1,l2,l3", [(3, 4, 5), (8, 8, 8), (7, 8, 2), (8, 1, 8), (0, 8, 8)])
def test_rotation_invariance_beyond_e3nn_range(l1, l2, l3, float64_default):
    torch.manual_seed(0)
    C = wigner_3j(l1, l2, l3, dtype=torch.float64)
    alpha, beta, gamma = torch.rand(3, dtype=torch.float64) * 6.28
    D1, D2, D3 = (o3.wigner_D(l, alpha, beta, gamma) for l in (l1, l2, l3))
    rotated = torch.einsum("abc,ai,bj,ck->ijk", C, D1, D2, D3)
    assert (rotated - C).abs().max() <= 1e-12
    assert abs(C.norm() - 1) <= 1e-14


@pytest.mark.parametrize("l1,l2", [(0, 0), (1, 2), (3, 3), (2, 5), (6, 6)])
def test_orthogonality_relations(l1, l2):
    d1, d2 = 2 * l1 + 1, 2 * l2 + 1
    eye = torch.eye(d1 * d2, dtype=torch.float64)
    completeness = torch.zeros(d1 * d2, d1 * d2, dtype=torch.float64)
    for l3 in range(abs(l1 - l2), l1 + l2 + 1):
        C = wigner_3j(l1, l2, l3, dtype=torch.float64).reshape(d1 * d2, 2 * l3 + 1)
        # columns are orthogonal with squared norm 1 / (2 l3 + 1)
        gram = C.T @ C
        assert (gram - torch.eye(2 * l3 + 1, dtype=torch.float64) / (2 * l3 + 1)).abs().max() <= 1e-14
        completeness += (2 * l3 + 1) * C @ C.T
        for l3b in range(abs(l1 - l2), l1 + l2 + 1):
            if l3b != l3:
                Cb = wigner_3j(l1, l2, l3b, dtype=torch.float64).reshape(d1 * d2, 2 * l3b + 1)
                assert (C.T @ Cb).abs().max() <= 1e-14
    # sum over l3, m3 of (2 l3 + 1) C C = identity on (m1, m2)
    assert (completeness - eye).abs().max() <= 1e-13


def test_selection_rule_triangle():
    for l1, l2, l3 in itertools.product(range(5), repeat=3):
        C = wigner_3j(l1, l2, l3, dtype=torch.float64)
        if abs(l1 - l2) <= l3 <= l1 + l2:
            assert C.abs().max() > 0.01
        else:
            assert C.abs().max() == 0


def test_permutation_symmetry():
    for l1, l2, l3 in [(1, 2, 3), (2, 2, 3), (3, 4, 2), (5, 2, 4)]:
        C = wigner_3j(l1, l2, l3, dtype=torch.float64)
        swapped = wigner_3j(l2, l1, l3, dtype=torch.float64).transpose(0, 1)
        assert (swapped - (-1) ** (l1 + l2 + l3) * C).abs().max() <= 1e-15
        cyclic = wigner_3j(l2, l3, l1, dtype=torch.float64).permute(2, 0, 1)
        assert (cyclic - C).abs().max() <= 1e-15


def test_dtype_device_and_cache_is_not_aliased():
    C = wigner_3j(2, 2, 2, dtype=torch.float32)
    assert C.dtype == torch.float32
    C.zero_()
    assert wigner_3j(2, 2, 2, dtype=torch.float32).abs().max() > 0
