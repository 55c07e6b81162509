"""torch-cluster backend: ``radius_graph`` for non-periodic structures (optional extra ``cluster``)."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._geometry import System


def cluster_neighbor_list(system: System, cutoff: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """torch_cluster.radius_graph without truncation: ``max_num_neighbors`` is the largest
    structure's atom count, so no neighbor is ever dropped (torch-cluster's default is 32).

    Returns receivers [E], senders [E], shifts [E, 3] (all zero), distances [E].
    """
    try:
        from torch_cluster import radius_graph
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            'backend="cluster" needs torch-cluster: pip install --no-build-isolation "molnets[cluster]"'
        ) from error

    positions, cell, pbc, batch, _ = system
    if bool(pbc.any()):
        raise ValueError('backend="cluster" has no periodic images: use it only for non-periodic systems')
    num_atoms = positions.shape[0]
    if num_atoms == 0:
        empty = torch.zeros(0, dtype=torch.long, device=positions.device)
        return empty, empty, empty.reshape(0, 3), positions.new_zeros(0)
    largest = int(torch.bincount(batch).max())
    order = torch.argsort(batch, stable=True)  # radius_graph needs atoms grouped by structure
    edge_index = radius_graph(
        positions[order], r=cutoff, batch=batch[order], loop=False, max_num_neighbors=largest
    )
    sources, targets = edge_index.unbind(0)  # torch-cluster's "source_to_target" flow: sources send
    senders, receivers = order[sources], order[targets]
    distances = (positions[senders] - positions[receivers]).norm(dim=-1)
    keep = distances < cutoff  # radius_graph counts pairs at exactly the cutoff; the convention is "<"
    receivers, senders, distances = receivers[keep], senders[keep], distances[keep]
    shifts = torch.zeros((receivers.shape[0], 3), dtype=torch.long, device=positions.device)
    return receivers, senders, shifts, distances
