"""EquivariantLinear (one block matrix) equals the per-irrep channel mixing it stands for."""

import pytest
import torch
from e3nn import o3

from molnets.layers.equivariant_linear import EquivariantLinear
from molnets.testing import random_orthogonal


def _per_irrep(lin: EquivariantLinear, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
    """y_{w, LM} = Σ_u W_{s, u w} x_{u, LM}, path by path on the e3nn layout (the definition)."""
    N = x.shape[0]
    y = x.new_zeros(N, lin.irreps_out.dim)
    for (i0, i1, mul_in, o0, o1, mul_out, dim), W in zip(lin.paths, lin.weights):
        block = x[:, i0:i1].reshape(N, mul_in, dim)                                  # [N, U, d]
        y[:, o0:o1] += torch.einsum("nud,nuw->nwd", block, W[species]).reshape(N, mul_out * dim)
    return y


@pytest.mark.parametrize("num_species", [1, 3])
@pytest.mark.parametrize("irreps_in,irreps_out", [
    ("4x0e + 3x1o", "4x0e + 3x1o"),
    ("4x0e + 3x1o + 2x0e", "5x0e + 2x1o + 3x2e"),  # two inputs to one output; 2e has no input
    ("2x1o + 3x0e", "4x0e"),
])
def test_block_matrix_equals_the_per_irrep_map_and_is_equivariant(irreps_in, irreps_out, num_species):
    torch.manual_seed(0)
    lin = EquivariantLinear(o3.Irreps(irreps_in), o3.Irreps(irreps_out), num_species=num_species).double()
    N = 6
    x = torch.randn(N, lin.irreps_in.dim, dtype=torch.float64)
    species = torch.randint(0, num_species, (N,))
    y = lin(x, species)
    torch.testing.assert_close(y, _per_irrep(lin, x, species), atol=1e-13, rtol=0)
    assert y.abs().max() > 1e-3
    for inversion in (False, True):
        Q = random_orthogonal(4, inversion=inversion, dtype=torch.float64)
        D_in, D_out = lin.irreps_in.D_from_matrix(Q), lin.irreps_out.D_from_matrix(Q)
        torch.testing.assert_close(lin(x @ D_in.T, species), y @ D_out.T, atol=1e-6, rtol=0)  # e3nn's D: float32


def test_frozen_block_matrix_follows_the_weights():
    torch.manual_seed(1)
    lin = EquivariantLinear(o3.Irreps("3x0e + 2x1o"), o3.Irreps("2x0e + 2x1o"), num_species=2).double()
    x, species = torch.randn(4, 9, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    lin.requires_grad_(False)
    first = lin(x, species)
    with torch.no_grad():
        lin.weights[1].mul_(3.0)  # in place: the kept block matrix must be rebuilt
    torch.testing.assert_close(lin(x, species), _per_irrep(lin, x, species), atol=1e-13, rtol=0)
    assert (lin(x, species) - first).abs().max() > 1e-3
