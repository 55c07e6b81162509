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
from typing import List, Tuple

import torch
from e3nn import o3
from torch import Tensor, nn

__all__ = ["EquivariantLinear", "ComponentLinear"]


class EquivariantLinear(nn.Module):
    """Per-irrep channel mixing on flat e3nn features, one weight set per species (S >= 1).

        y_{i, w, LM} = Σ_u W^{(L)}_{s_i, u w} x_{i, u, LM}

    Output irreps with no matching input irrep are zero. With ``num_species=1`` the map is
    shared by all atoms (e3nn's ``o3.Linear`` without biases). Weights ~ N(0, 1/fan_in), so
    unit-variance inputs give unit-variance outputs.

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
        in_slices = self.irreps_in.slices()
        # (in start, stop, mul_in, out index, mul_out, dim) for every pair with the same irrep
        self.paths: List[Tuple[int, int, int, int, int, int]] = []
        fan_in = {}
        for (mul_in, ir_in), s_in in zip(self.irreps_in, in_slices):
            for k, (mul_out, ir_out) in enumerate(self.irreps_out):
                if ir_in == ir_out:
                    self.paths.append((s_in.start, s_in.stop, mul_in, k, mul_out, ir_in.dim))
                    fan_in[k] = fan_in.get(k, 0) + mul_in
        self.out_sizes = [(mul, ir.dim) for mul, ir in self.irreps_out]  # plain ints: no Irreps in forward
        self.weights = nn.ParameterList(
            torch.randn(self.num_species, mul_in, mul_out) / math.sqrt(fan_in[k])
            for _, _, mul_in, k, mul_out, _ in self.paths
        )  # each [S, U, W]

    def forward(self, x: Tensor, species: Tensor) -> Tensor:
        N, S = x.shape[0], self.num_species
        blocks: List[List[Tensor]] = [[] for _ in self.out_sizes]
        for (start, stop, mul_in, k, mul_out, dim), W in zip(self.paths, self.weights):
            x_block = x[:, start:stop].reshape(N, mul_in, dim).transpose(1, 2).reshape(N * dim, mul_in)  # [N d, U]
            y = (x_block @ W.transpose(0, 1).reshape(mul_in, S * mul_out)).reshape(N, dim, S, mul_out)  # [N, d, S, W]
            if S > 1:  # static: keep each atom's own species (all species at once is one matmul)
                index = species.reshape(N, 1, 1, 1).expand(N, dim, 1, mul_out)  # [N, d, 1, W]
                y = y.gather(2, index)  # [N, d, 1, W]
            blocks[k].append(y.reshape(N, dim, mul_out).transpose(1, 2).reshape(N, mul_out * dim))  # [N, W d]
        out = [
            sum(parts) if parts else x.new_zeros(N, mul * dim)  # [N, W d]
            for parts, (mul, dim) in zip(blocks, self.out_sizes)
        ]
        return torch.cat(out, dim=1)  # [N, irreps_out.dim]


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
