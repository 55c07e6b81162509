"""vesin backend: the C++ cell list of the ``vesin`` package, on the CPU, one structure at a time."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from ._geometry import System, reduce_cell


def vesin_neighbor_list(system: System, cutoff: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """vesin's full list with "ijSd"; structures of a batch are computed one after the other.

    Returns receivers [E], senders [E], shifts [E, 3] (long), distances [E].
    """
    from vesin import NeighborList

    positions, cell, pbc, batch = system
    device = positions.device
    # vesin's search box grows with the skew of the cell: give it a reduced basis of the same
    # lattice and map the shifts back (S @ reduced = (S @ transform) @ cell).
    cell, transform = reduce_cell(cell.detach().to("cpu", torch.float64), pbc.cpu())
    transforms = None if bool((transform == torch.eye(3, dtype=torch.long)).all()) else transform.numpy()
    calculator = NeighborList(cutoff=cutoff, full_list=True)
    points = positions.detach().to("cpu", torch.float64).numpy()          # [N, 3]
    boxes = cell.detach().to("cpu", torch.float64).numpy()                # [B, 3, 3]
    periodic = pbc.cpu().numpy()                                          # [B, 3]
    if cell.shape[0] == 1:
        groups = [np.arange(points.shape[0])]
    else:
        order = torch.argsort(batch, stable=True).cpu()
        counts = torch.bincount(batch, minlength=cell.shape[0]).cpu()
        groups = [g.numpy() for g in torch.split(order, counts.tolist())]
    parts = []
    for g, atoms in enumerate(groups):
        if len(atoms) == 0:
            continue
        x = points if len(groups) == 1 else points[atoms]
        # copy=False: vesin's buffers are reused by the next call, so each is copied exactly once
        # below (the index conversions and the shift transform make new arrays).
        i, j, S, d = calculator.compute(x, boxes[g], periodic[g].tolist(), quantities="ijSd", copy=False)
        S = S.astype(np.int64) if transforms is None else S.astype(np.int64) @ transforms[g]
        if len(groups) > 1:
            i, j = atoms[i], atoms[j]
        else:
            i, j = i.astype(np.int64), j.astype(np.int64)
        parts.append((i, j, S, d.copy()))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty.reshape(0, 3), positions.new_zeros(0)
    i, j, S, d = parts[0] if len(parts) == 1 else (np.concatenate(p) for p in zip(*parts))
    return (
        torch.from_numpy(i).to(device),
        torch.from_numpy(j).to(device),
        torch.from_numpy(S).to(device),
        torch.from_numpy(d).to(device, positions.dtype),
    )
