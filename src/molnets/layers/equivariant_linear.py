"""Equivariant linear maps: channel mixing within each irrep, optionally one map per species.

A linear map between irreps features is equivariant iff it mixes channels of the same irrep
(l, p) only, by Schur's lemma (Thomas et al. 2018, arXiv:1802.08219; Geiger & Smidt 2022,
arXiv:2207.09453, the ``o3.Linear`` of e3nn):

    y_{w, LM} = Σ_u W^{(L)}_{s_i, u w} x_{u, LM} / sqrt(fan_in(L))

MACE uses the species-dependent form (W depends on the element s_i of the atom) as its
self-connection ("skip_tp", Batatia et al. 2022, "MACE", Eq. 13, the residual term
W_{z_i} h_i^{(t)}), and the shared form after the product basis.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
from e3nn import o3
from torch import Tensor, nn

from molnets._frozen import frozen_cached

__all__ = ["EquivariantLinear", "ComponentLinear"]


class EquivariantLinear(nn.Module):
    """Per-irrep channel mixing on flat e3nn features, one weight set per species (S >= 1).

        y_{i, w, LM} = Σ_u W^{(L)}_{s_i, u w} x_{i, u, LM}

    Output irreps with no matching input irrep are zero. With ``num_species=1`` the map is
    shared by all atoms (e3nn's ``o3.Linear`` without biases). Weights ~ N(0, 1/fan_in), so
    unit-variance inputs give unit-variance outputs.

    On the flat e3nn layout (channel-major within each irrep) the map is one block matrix,
    blocks W^{(L)} ⊗ I_{2L+1} for every path, zero elsewhere: ``dense_weight`` builds it
    for all species side by side and the forward is one matrix product (and one gather of each
    atom's own species), a few operations whatever the irreps; the zero blocks cost flops, not
    operations, which is the trade small molecules want. Frozen weights keep the block matrix
    between calls (``molnets._frozen``).

    Args:
        irreps_in: irreps of x, e.g. "64x0e + 64x1o".
        irreps_out: irreps of y, e.g. "64x0e".
        num_species: S, the number of weight sets (species indices 0..S-1).

    Shapes:
        x [N, irreps_in.dim], species [N] (long)  ->  [N, irreps_out.dim]
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, *, num_species: int = 1) -> None:
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        self.num_species = int(num_species)
        in_slices, out_slices = self.irreps_in.slices(), self.irreps_out.slices()
        # (in start, stop, mul_in, out start, stop, mul_out, dim) for every pair with the same irrep
        self.paths: List[Tuple[int, int, int, int, int, int, int]] = []
        fan_in, out_index = {}, []
        for (mul_in, ir_in), s_in in zip(self.irreps_in, in_slices):
            for k, ((mul_out, ir_out), s_out) in enumerate(zip(self.irreps_out, out_slices)):
                if ir_in == ir_out:
                    self.paths.append((s_in.start, s_in.stop, mul_in, s_out.start, s_out.stop, mul_out, ir_in.dim))
                    fan_in[k] = fan_in.get(k, 0) + mul_in
                    out_index.append(k)
        self.weights = nn.ParameterList(
            torch.randn(self.num_species, path[2], path[5]) / math.sqrt(fan_in[k])
            for path, k in zip(self.paths, out_index)
        )  # each [S, U, W]
        self.dims = (self.irreps_in.dim, self.irreps_out.dim)  # plain ints: no Irreps in forward
        self._frozen_dense: Dict[str, Tuple[tuple, Tensor]] = {}  # see dense_weight

    def dense_weight(self) -> Tensor:
        """The map as one matrix, all species side by side: [irreps_in.dim, S irreps_out.dim],
        block (u m, w m') of path W^{(L)} = W^{(L)}_{s, u w} δ_{m m'}."""
        return frozen_cached(self._frozen_dense, "dense", list(self.weights), self._build_dense_weight)

    def _build_dense_weight(self) -> Tensor:
        S, (D_in, D_out) = self.num_species, self.dims
        like = dict(dtype=self.weights[0].dtype, device=self.weights[0].device) if len(self.weights) else {}
        dense = torch.zeros(S, D_in, D_out, **like)  # [S, D_in, D_out]; no paths: all zero
        for (i0, i1, mul_in, o0, o1, mul_out, dim), W in zip(self.paths, self.weights):
            eye = torch.eye(dim, dtype=W.dtype, device=W.device)  # [d, d]
            block = (W[:, :, None, :, None] * eye[:, None, :]).reshape(S, mul_in * dim, mul_out * dim)  # W ⊗ I
            dense[:, i0:i1, o0:o1] += block
        return dense.transpose(0, 1).reshape(D_in, S * D_out)  # [D_in, S D_out]

    def forward(self, x: Tensor, species: Tensor) -> Tensor:
        N, D_out = x.shape[0], self.dims[1]
        y = x @ self.dense_weight().to(x.dtype)  # [N, S D_out]
        if self.num_species > 1:  # static: keep each atom's own species
            y = y.view(N, self.num_species, D_out).gather(1, species.view(N, 1, 1).expand(N, 1, D_out)).view(N, D_out)
        return y  # [N, irreps_out.dim]


class ComponentLinear(nn.Module):
    """Per-irrep channel mixing on the [N, C, M] layout of the ACE block (channels first).

        y_{i, d, lm} = Σ_c W^{(l)}_{c d} x_{i, c, lm},   W ~ N(0, 1/C) at initialization

    The linear map after the atomic basis in MACE (Batatia et al. 2022, Eq. 9, the W_{kk̃l}).

    Args:
        irreps: the one-channel irreps of the M axis, e.g. "0e + 1o + 2e + 3o".
        num_channels: C (in and out).

    Shapes:
        x [N, C, M]  ->  [N, C, M]
    """

    def __init__(self, irreps: o3.Irreps, num_channels: int) -> None:
        super().__init__()
        self.irreps = o3.Irreps(irreps)
        C = int(num_channels)
        self.blocks = [(s.start, s.stop) for s in self.irreps.slices()]  # M rows of each irrep
        self.weight = nn.Parameter(torch.randn(len(self.irreps), C, C) / math.sqrt(C))  # [L, C, D]

    def forward(self, x: Tensor) -> Tensor:
        # one matrix product per irrep on its contiguous rows (no per-m copy of the weights)
        rows = x.permute(2, 0, 1).contiguous()  # [M, N, C]
        out = torch.cat([rows[a:b] @ W for (a, b), W in zip(self.blocks, self.weight.unbind(0))])  # [M, N, D]
        return out.permute(1, 2, 0)  # [N, D, M]
