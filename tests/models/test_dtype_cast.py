"""A model built under the float32 default and cast with ``.double()`` computes in full float64.

Constant buffers (Clebsch-Gordan and ACE coupling tensors, radial frequencies, spherical-harmonic
coefficients) are computed in float64 at construction; after the cast they must hold those exact
values, not float32-rounded ones (~1e-8 relative off, which breaks float64 equivariance tests).
Reference: the same module built under the float64 default, with the cast module's parameters.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from e3nn import o3
from torch import nn

from molnets.ace import AtomicBasis, ProductBasis
from molnets.layers.pair_atomic_basis import PairAtomicBasis
from molnets.testing import random_graph, random_orthogonal, transform

from test_all_models import CUTOFF, MODELS, SPECIES


def _build(factory: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        return factory()
    finally:
        torch.set_default_dtype(default)


def _cast_and_reference(factory: Callable[[], nn.Module]):
    """(built in float32 then .double(), built in float64 with the same parameters)."""
    cast = _build(factory, torch.float32).double()
    reference = _build(factory, torch.float64)
    params = dict(cast.named_parameters())
    assert params and params.keys() == dict(reference.named_parameters()).keys()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(params[name])
    # every floating buffer equal to the float64 build's (same names: same state-dict keys)
    buffers = dict(cast.named_buffers())
    assert buffers.keys() == dict(reference.named_buffers()).keys()
    for name, b in reference.named_buffers():
        assert buffers[name].dtype == b.dtype, name
        torch.testing.assert_close(buffers[name], b, rtol=1e-15, atol=0.0, msg=lambda m, n=name: f"{n}: {m}")
    assert cast.state_dict().keys() == reference.state_dict().keys()
    return cast, reference


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_double_after_float32_build(name):
    cast, reference = _cast_and_reference(MODELS[name])
    graph = random_graph(8, cutoff=CUTOFF, species=SPECIES, seed=5, periodic=True, density=0.06)
    with torch.no_grad():
        energies = cast(graph)  # [N]
        assert energies.dtype == torch.float64
        torch.testing.assert_close(energies, reference(graph), rtol=1e-12, atol=1e-12)
        # invariance of E_i to a rotation and to a rotation-inversion, in float64 precision
        for inversion in (False, True):
            Q = random_orthogonal(7, inversion=inversion, dtype=torch.float64)  # det +1, then -1
            torch.testing.assert_close(cast(transform(graph, Q)), energies, rtol=1e-11, atol=1e-11)


IRREPS_H, IRREPS_SH = o3.Irreps("3x0e + 3x1o + 3x2e"), o3.Irreps.spherical_harmonics(3)
IRREPS_A = o3.Irreps("3x0e + 3x1o + 3x2e + 3x3o")


def _atomic_basis() -> AtomicBasis:
    return AtomicBasis(IRREPS_H, IRREPS_SH, IRREPS_A, num_basis=4, avg_num_neighbors=3.0, radial_hidden=(8,))


def _inputs(num_nodes: int = 5, num_edges: int = 12):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(num_nodes, IRREPS_H.dim, generator=g, dtype=torch.float64)
    edge_sh = torch.randn(num_edges, IRREPS_SH.dim, generator=g, dtype=torch.float64)
    edge_radial = torch.randn(num_edges, 4, generator=g, dtype=torch.float64)
    senders = torch.randint(0, num_nodes, (num_edges,), generator=g)
    receivers = torch.randint(0, num_nodes, (num_edges,), generator=g)
    return h, edge_sh, edge_radial, senders, receivers


def test_atomic_basis_double_after_float32_build():
    cast, reference = _cast_and_reference(_atomic_basis)
    A = cast(*_inputs())  # [N, C, M]
    assert A.dtype == torch.float64 and A.abs().max() > 1e-3
    torch.testing.assert_close(A, reference(*_inputs()), rtol=1e-12, atol=1e-12)


def test_pair_atomic_basis_double_after_float32_build():
    cast, reference = _cast_and_reference(lambda: PairAtomicBasis(_atomic_basis()))
    h, edge_sh, edge_radial, senders, receivers = _inputs(num_edges=12)
    # edges come in pairs (first half, second half) sharing one radial row
    args = (h, edge_sh, edge_radial[:6], senders, receivers)
    A = cast(*args)  # [N, C, M]
    torch.testing.assert_close(A, reference(*args), rtol=1e-12, atol=1e-12)
    # and equal to the atomic basis it wraps, both in float64
    expected = cast.basis(h, edge_sh, torch.cat([edge_radial[:6], edge_radial[:6]]), senders, receivers)
    torch.testing.assert_close(A, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("correlation", [1, 2, 3])
def test_product_basis_double_after_float32_build(correlation):
    irreps_out = o3.Irreps("3x0e + 3x1o")
    cast, reference = _cast_and_reference(
        lambda: ProductBasis(IRREPS_A, irreps_out, correlation=correlation, num_species=2)
    )
    g = torch.Generator().manual_seed(4)
    A = torch.randn(6, 3, IRREPS_A.dim // 3, generator=g, dtype=torch.float64)  # [N, C, M]
    species = torch.tensor([0, 1, 1, 0, 1, 0])
    B = cast(A, species)  # [N, O]
    assert B.dtype == torch.float64 and B.abs().max() > 1e-3
    torch.testing.assert_close(B, reference(A, species), rtol=1e-12, atol=1e-12)
