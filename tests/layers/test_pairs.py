"""half_edges: one directed edge of each pair of a symmetric neighbor list."""

import ase.build
import pytest
import torch

from molnets.graph import AtomicGraph
from molnets.layers.pairs import half_edges


@pytest.mark.parametrize("periodic", [False, True])
def test_half_edges_picks_one_direction_of_every_pair(periodic):
    atoms = ase.build.bulk("Cu", "fcc", a=3.6) if periodic else ase.build.molecule("CH3CH2OH")
    graph = AtomicGraph.from_ase(atoms, 4.0, dtype=torch.float64)  # Cu: 1 atom, many images
    pairs = half_edges(graph.receivers, graph.senders, graph.shifts)
    assert pairs.shape == (graph.num_edges // 2,)
    edges = {(int(i), int(j), tuple(s.tolist())) for i, j, s in zip(graph.receivers, graph.senders, graph.shifts)}
    kept = [(int(graph.receivers[e]), int(graph.senders[e]), tuple(graph.shifts[e].tolist())) for e in pairs]
    reverse = {(j, i, tuple(-x for x in s)) for i, j, s in kept}
    # Every edge is either kept or the reverse of a kept one, never both.
    assert set(kept) | reverse == edges and not set(kept) & reverse
    with pytest.raises(ValueError, match="symmetric"):  # one edge missing
        half_edges(graph.receivers[1:], graph.senders[1:], graph.shifts[1:])


@pytest.mark.parametrize("periodic", [False, True])
def test_half_edges_rejects_a_list_with_a_reverse_edge_replaced(periodic):
    """Same number of edges in each direction, but one edge's reverse is a different edge."""
    atoms = ase.build.bulk("Cu", "fcc", a=3.6) * (2, 1, 1) if periodic else ase.build.molecule("CH3CH2OH")
    graph = AtomicGraph.from_ase(atoms, 4.0, dtype=torch.float64)
    half_edges(graph.receivers, graph.senders, graph.shifts)  # symmetric: passes
    e = int(torch.nonzero(graph.receivers > graph.senders)[0])  # a reversed direction
    for receivers, senders, shifts in [
        (graph.receivers, graph.senders.clone().index_fill_(0, torch.tensor([e]), int(graph.receivers[e])), graph.shifts),
        (graph.receivers, graph.senders, graph.shifts.clone().index_fill_(0, torch.tensor([e]), 7)),
    ]:
        with pytest.raises(ValueError, match="symmetric"):
            half_edges(receivers, senders, shifts)

