"""Brute-force neighbor list: every pair, every periodic image that can be in range.

The readable specification and the test oracle of the other backends. O(N^2) per structure.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from ._geometry import System, complete_cell, reduce_cell, unwrapped_far_atoms


def reference_neighbor_list(system: System, cutoff: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """All (i, j, S) with |x[j] - x[i] + S @ cell| < cutoff, except i == j at S = 0.

    Returns receivers [E], senders [E], shifts [E, 3] (long), distances [E].
    """
    positions, original_cell, pbc, batch, _ = system
    # Search in a reduced basis of the same lattice (short vectors, so few images), then map the
    # shifts back: S @ reduced = (S @ transform) @ cell.
    cell, transform = reduce_cell(original_cell, pbc)                  # [B, 3, 3] x2
    basis = complete_cell(cell, pbc)                                   # [B, 3, 3]
    out = []
    for g in range(cell.shape[0]):
        atoms = (batch == g).nonzero().flatten()                       # [n]
        x = positions[atoms]                                           # [n, 3]
        # Fractional coordinates along the lattice vectors, periodic ones wrapped into [0, 1):
        # x = x_wrapped + a @ cell with integer a, so a pair of wrapped atoms at shift S' is the
        # pair of original atoms at shift S = S' + a_i - a_j.
        inverse = torch.linalg.inv(basis[g])                           # [3, 3]
        frac = x @ inverse                                             # [n, 3]
        a = torch.where(pbc[g], torch.floor(frac), torch.zeros_like(frac))  # [n, 3]
        # An atom 2^52 cells or more away stays unwrapped if it is isolated (it then pairs only
        # with its own images); otherwise a ValueError.
        atom_pbc = pbc[g].expand_as(a)
        far = unwrapped_far_atoms(frac, a, atom_pbc, torch.zeros_like(atoms), cutoff, atoms)  # [n]
        a = torch.where(far.unsqueeze(1), torch.zeros_like(a), a)     # [n, 3]
        wrapped = x - a @ cell[g]                                      # [n, 3]
        # A pair within the cutoff has |frac_j - frac_i + S'_k| * plane_spacing_k < cutoff along
        # every periodic direction k, and |frac_j - frac_i| <= 1 after wrapping.
        spacing = 1.0 / inverse.norm(dim=0)                            # [3]  distance between lattice planes
        ranges = []
        for k in range(3):
            if not bool(pbc[g, k]):
                ranges.append(torch.zeros(1, dtype=torch.long))
                continue
            reach = math.ceil(1 + cutoff / float(spacing[k]))
            ranges.append(torch.arange(-reach, reach + 1))
        images = torch.cartesian_prod(*ranges).reshape(-1, 3).to(positions.device)  # [P, 3]
        image_offsets = images.to(positions.dtype) @ cell[g]                         # [P, 3]
        # vectors[p, i, j] = wrapped[j] - wrapped[i] + S'_p @ cell
        vectors = wrapped[None, None, :, :] - wrapped[None, :, None, :] + image_offsets[:, None, None, :]  # [P, n, n, 3]
        distances = vectors.norm(dim=-1)                                              # [P, n, n]
        in_range = distances < cutoff
        is_self = (images == 0).all(dim=1)[:, None, None] & torch.eye(len(atoms), dtype=torch.bool, device=x.device)
        p, i, j = (in_range & ~is_self).nonzero(as_tuple=True)
        a = a.to(torch.long)
        shifts = ((images[p] + a[i] - a[j]).unsqueeze(-1) * transform[g]).sum(-2)     # [e, 3]
        out.append((atoms[i], atoms[j], shifts, distances[p, i, j]))
    if not out:
        empty = torch.zeros(0, dtype=torch.long, device=positions.device)
        return empty, empty, empty.reshape(0, 3), positions.new_zeros(0)
    receivers, senders, shifts, distances = (torch.cat(parts) for parts in zip(*out))
    return receivers, senders, shifts, distances
