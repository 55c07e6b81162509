"""vesin backend: the C++ cell list of the ``vesin`` package, on the CPU, one structure at a time."""

from __future__ import annotations

import threading
from typing import Dict, Tuple

import numpy as np
import torch
from torch import Tensor
from vesin import NeighborList

from ._geometry import CPU, System, reduce_cell


_LOCAL = threading.local()
_MAX_CALCULATORS = 4  # cutoffs kept per thread


def _calculator(cutoff: float):
    """The vesin ``NeighborList`` of this thread for ``cutoff``, kept between calls.

    vesin reuses a calculator's output buffers from one call to the next; a fresh calculator
    allocates and grows them again (about +25% time at 16384 atoms). One per thread, because the
    ``copy=False`` views of these buffers are valid only until the same calculator's next call;
    every array handed out of :func:`vesin_neighbor_list` is a copy. The cost is that the buffers
    of the largest list computed stay allocated.

    vesin (from 0.6) runs on as many threads as torch (``torch.set_num_threads``), like the rest
    of molnets' CPU work, instead of taking every core whatever the caller asked for.
    """
    cache: Dict[float, NeighborList] = _LOCAL.__dict__.setdefault("calculators", {})
    calculator = cache.get(cutoff)
    if calculator is None:
        if len(cache) >= _MAX_CALCULATORS:
            cache.clear()
        calculator = cache[cutoff] = NeighborList(cutoff=cutoff, full_list=True)
    calculator.n_threads = torch.get_num_threads()  # read at each compute; unused before vesin 0.6
    return calculator


def vesin_neighbor_list(system: System, cutoff: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """vesin's full list with "PSd"; structures of a batch are computed one after the other.

    Returns receivers [E], senders [E], shifts [E, 3] (long), distances [E].
    """
    positions, _, _, batch, host = system
    device = positions.device
    boxes, periodic, transforms = host.cell, host.pbc, None                       # [B, 3, 3], [B, 3]
    # vesin's search box grows with the skew of the cell: give it a reduced basis of the same
    # lattice and map the shifts back (S @ reduced = (S @ transform) @ cell). validate() has
    # already found out whether the (common) cell is reduced.
    if not host.reduced:
        reduced, transform = reduce_cell(torch.from_numpy(boxes), torch.from_numpy(periodic))
        boxes, transforms = reduced.numpy(), transform.numpy()
    calculator = _calculator(cutoff)
    if host.positions is not None and host.positions.dtype == np.float64:
        points = host.positions                                                   # [N, 3]
    else:
        points = positions.detach().to(CPU, torch.float64).numpy()                # [N, 3]
    if boxes.shape[0] == 1:
        groups = [None]
    else:
        order = torch.argsort(batch, stable=True).cpu()
        counts = torch.bincount(batch, minlength=boxes.shape[0]).cpu()
        groups = [g.numpy() for g in torch.split(order, counts.tolist())]
    parts = []
    for g, atoms in enumerate(groups):
        if atoms is not None and len(atoms) == 0:
            continue
        x = points if atoms is None else points[atoms]
        # copy=False: views of vesin's buffers, which the next call reuses, so each is copied
        # exactly once below, straight into its final dtype (uint64 -> int64, int32 -> int64).
        # vesin returns d already as a fresh array (its float conversion copies); it is copied
        # only if it is not.
        pairs, S, d = calculator.compute(x, boxes[g], periodic[g], quantities="PSd", copy=False)
        ij = pairs.T.astype(np.int64, order="C")                                  # [2, e] one pass
        i, j = ij if atoms is None else atoms[ij]                                 # [e] x2, contiguous
        S = S.astype(np.int64) if transforms is None else S.astype(np.int64) @ transforms[g]  # [e, 3]
        parts.append((i, j, S, d if d.flags.owndata else d.copy()))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty.reshape(0, 3), positions.new_zeros(0)
    arrays = parts[0] if len(parts) == 1 else (np.concatenate(p) for p in zip(*parts))
    outputs = tuple(torch.from_numpy(a) for a in arrays)
    if device == CPU and positions.dtype == torch.float64:  # the common case: no more copies
        return outputs
    receivers, senders, shifts, distances = outputs
    return receivers.to(device), senders.to(device), shifts.to(device), distances.to(device, positions.dtype)
