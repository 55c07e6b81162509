"""Brute-force neighbor list: every pair, every periodic image that can be in range.

The readable specification and the test oracle of the other backends. O(N^2) per structure.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from ._geometry import System, complete_cell


def reference_neighbor_list(system: System, cutoff: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """All (i, j, S) with |x[j] - x[i] + S @ cell| < cutoff, except i == j at S = 0.

    Returns receivers [E], senders [E], shifts [E, 3] (long), distances [E].
    """
    positions, cell, pbc, batch = system
    basis = complete_cell(cell, pbc)                                   # [B, 3, 3]
    out = []
    for g in range(cell.shape[0]):
        atoms = (batch == g).nonzero().flatten()                       # [n]
        x = positions[atoms]                                           # [n, 3]
        # Fractional coordinates along the lattice vectors; the pair (i, j) needs shifts S_k with
        # |frac_j - frac_i + S_k| * plane_spacing_k < cutoff along every periodic direction k.
        frac = x @ torch.linalg.inv(basis[g])                          # [n, 3]
        spacing = 1.0 / torch.linalg.inv(basis[g]).norm(dim=0)         # [3]  distance between lattice planes
        ranges = []
        for k in range(3):
            if not bool(pbc[g, k]) or len(atoms) == 0:
                ranges.append(torch.zeros(1, dtype=torch.long))
                continue
            spread = float(frac[:, k].max() - frac[:, k].min())
            reach = math.ceil(spread + cutoff / float(spacing[k])) + 1
            ranges.append(torch.arange(-reach, reach + 1))
        shifts = torch.cartesian_prod(*ranges).reshape(-1, 3).to(positions.device)  # [P, 3]
        image_offsets = shifts.to(positions.dtype) @ cell[g]                          # [P, 3]
        # vectors[p, i, j] = x[j] - x[i] + S_p @ cell
        vectors = x[None, None, :, :] - x[None, :, None, :] + image_offsets[:, None, None, :]  # [P, n, n, 3]
        distances = vectors.norm(dim=-1)                                              # [P, n, n]
        in_range = distances < cutoff
        is_self = (shifts == 0).all(dim=1)[:, None, None] & torch.eye(len(atoms), dtype=torch.bool, device=x.device)
        p, i, j = (in_range & ~is_self).nonzero(as_tuple=True)
        out.append((atoms[i], atoms[j], shifts[p], distances[p, i, j]))
    if not out:
        empty = torch.zeros(0, dtype=torch.long, device=positions.device)
        return empty, empty, empty.reshape(0, 3), positions.new_zeros(0)
    receivers, senders, shifts, distances = (torch.cat(parts) for parts in zip(*out))
    return receivers, senders, shifts, distances
