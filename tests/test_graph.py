"""AtomicGraph: edge geometry and its gradients, ASE round trips, batching and splitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from molnets.graph import AtomicGraph, batch_graphs, edge_vectors, edge_vectors_backward, split_graphs


def structures():
    copper = bulk("Cu", "fcc", a=3.61) * (2, 1, 1)
    copper.rattle(0.05, seed=1)
    slab = Atoms("H3", positions=[[0.1, 0.2, 0.0], [1.3, 0.4, 1.0], [0.5, 1.7, -0.8]],
                 cell=[[2.6, 0.0, 0.0], [1.1, 2.4, 0.0], [0.0, 0.0, 0.0]], pbc=[True, True, False])
    water = molecule("H2O")
    water.positions += 1e3
    return [copper, slab, water]


def test_edge_vectors_match_ase():
    for atoms in structures():
        graph = AtomicGraph.from_ase(atoms, 3.0, dtype=torch.float64)
        i, j, S, D = ase_neighbor_list("ijSD", atoms, 3.0)
        expected = {(a, b, tuple(s)): d for a, b, s, d in zip(i.tolist(), j.tolist(), S.tolist(), D)}
        vectors = edge_vectors(graph)
        assert graph.num_edges == len(expected)
        for e, key in enumerate(zip(graph.receivers.tolist(), graph.senders.tolist(), map(tuple, graph.shifts.tolist()))):
            np.testing.assert_allclose(vectors[e].numpy(), expected[key], atol=1e-10)


def test_edge_vectors_gradcheck_positions_and_cell():
    graph = AtomicGraph.from_ase(structures()[:2], 3.0, dtype=torch.float64)
    weights = torch.randn(graph.num_edges, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def energy(positions, cell):
        vectors = edge_vectors(graph._replace(positions=positions, cell=cell))
        return (vectors * weights).sum(-1) + vectors.norm(dim=-1) ** 2

    positions = graph.positions.clone().requires_grad_(True)
    cell = graph.cell.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(energy, (positions, cell))
    # The cell gradient is nonzero only through the shifts: d r_e / d cell = S_e (outer) e_y.
    (grad_cell,) = torch.autograd.grad(edge_vectors(graph._replace(cell=cell))[:, 0].sum(), cell)
    expected = torch.zeros_like(grad_cell)
    expected.index_add_(0, graph.batch[graph.receivers], graph.shifts.double()[:, :, None] * torch.tensor([1.0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(grad_cell, expected)


def test_edge_vectors_backward_is_the_adjoint_of_edge_vectors():
    """edge_vectors_backward (for kernels with a hand-written backward) equals autograd's
    gradients of positions and cell, for a batch of molecules and periodic cells."""
    graph = AtomicGraph.from_ase(structures(), 3.0, dtype=torch.float64)
    grad = torch.randn(graph.num_edges, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    positions = graph.positions.clone().requires_grad_(True)
    cell = graph.cell.clone().requires_grad_(True)
    expected = torch.autograd.grad(edge_vectors(graph._replace(positions=positions, cell=cell)), (positions, cell), grad)
    got = edge_vectors_backward(graph, grad)
    assert graph.cell.abs().sum() > 0 and graph.shifts.abs().sum() > 0  # images are in the test
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-13, rtol=1e-13)
    assert edge_vectors_backward(graph, grad, cell=False)[1] is None
    assert edge_vectors_backward(graph, grad, positions=False)[0] is None


def test_from_ase_to_ase_round_trip():
    atoms_list = structures()
    back = AtomicGraph.from_ase(atoms_list, 3.0, dtype=torch.float64).to_ase()
    assert len(back) == len(atoms_list)
    for before, after in zip(atoms_list, back):
        np.testing.assert_array_equal(before.numbers, after.numbers)
        np.testing.assert_array_equal(before.positions, after.positions)
        np.testing.assert_array_equal(before.cell[:], after.cell[:])
        np.testing.assert_array_equal(before.pbc, after.pbc)


def _edge_set(graph: AtomicGraph):
    return set(zip(graph.receivers.tolist(), graph.senders.tolist(), map(tuple, graph.shifts.tolist())))


def test_from_ase_list_equals_batched_singles_and_split_round_trip():
    atoms_list = structures()
    batched = AtomicGraph.from_ase(atoms_list, 3.0, dtype=torch.float64)
    singles = [AtomicGraph.from_ase(a, 3.0, dtype=torch.float64) for a in atoms_list]
    joined = batch_graphs(singles)
    for name in ("positions", "atomic_numbers", "cell", "pbc", "batch"):
        torch.testing.assert_close(getattr(batched, name), getattr(joined, name))
    assert _edge_set(batched) == _edge_set(joined)
    assert batched.num_graphs == 3 and batched.batch.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    for part, single in zip(split_graphs(joined), singles):
        for name, value in part._asdict().items():
            assert torch.equal(value, getattr(single, name)), name
    torch.testing.assert_close(edge_vectors(joined), torch.cat([edge_vectors(g) for g in singles]))


def test_to_dtype_casts_only_floats():
    graph = AtomicGraph.from_ase(structures(), 3.0, dtype=torch.float64)
    single = graph.to(dtype=torch.float32)
    assert single.positions.dtype == single.cell.dtype == torch.float32
    for name in ("atomic_numbers", "batch", "receivers", "senders", "shifts"):
        assert getattr(single, name).dtype == torch.long
    assert single.pbc.dtype == torch.bool
    torch.testing.assert_close(single.positions.double(), graph.positions, atol=1e-4, rtol=0)
    assert graph.to(torch.device("cpu")).positions.dtype == torch.float64
    assert AtomicGraph.from_ase(structures()[0], 3.0).positions.dtype == torch.get_default_dtype()
    assert graph.to(torch.float32).positions.dtype == torch.float32  # a dtype first, as Tensor.to takes it
    assert graph.to("cpu", torch.float32).cell.dtype == torch.float32
    with pytest.raises(ValueError, match="float32 or float64, got torch.float16"):
        graph.to(dtype=torch.float16)


def test_batching_graphs_of_two_dtypes_raises():
    single, double = (AtomicGraph.from_ase(structures()[0], 3.0, dtype=dtype) for dtype in (torch.float32, torch.float64))
    with pytest.raises(ValueError, match="one dtype and device"):  # not a silent promotion to float64
        batch_graphs([single, double])
    assert batch_graphs([double, double]).positions.dtype == torch.float64


def test_from_ase_empty_list_raises():
    with pytest.raises(ValueError, match="at least one"):
        AtomicGraph.from_ase([], 3.0)


def test_positions_and_atomic_numbers_of_the_wrong_kind_raise():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], [-0.6, 0.9, 0.0]], dtype=torch.float64)
    for positions, kind in ((x.tolist(), "list"), (x.half(), "float16"), (x.long(), "int64")):
        with pytest.raises(ValueError, match=f"positions must be a float32 or float64 tensor.*{kind}"):
            AtomicGraph.from_positions(positions, [6, 8, 1], 3.0)
    with pytest.raises(ValueError, match="whole numbers"):  # not truncated to 6
        AtomicGraph.from_positions(x, torch.tensor([6.7, 8.0, 1.0]), 3.0)
    graph = AtomicGraph.from_positions(x, torch.tensor([6.0, 8.0, 1.0]), 3.0)
    assert graph.atomic_numbers.dtype == torch.long and graph.atomic_numbers.tolist() == [6, 8, 1]


def test_empty_structures_raise():
    """A structure without atoms is an error naming it: alone, in a list of ase.Atoms, or a
    structure of a batch (cell [B, 3, 3]) that no atom belongs to."""
    import ase

    water = ase.Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    with pytest.raises(ValueError, match="empty"):
        AtomicGraph.from_ase(ase.Atoms(), 3.0)
    with pytest.raises(ValueError, match=r"structure\(s\) \[1\] of the batch are empty"):
        AtomicGraph.from_ase([water, ase.Atoms(), water], 3.0)
    positions = torch.tensor(water.positions)
    with pytest.raises(ValueError, match=r"structure\(s\) \[0, 2\] of the batch are empty"):
        AtomicGraph.from_positions(positions, torch.tensor([8, 1, 1]), 3.0, cell=torch.zeros(3, 3, 3),
                                   batch=torch.ones(3, dtype=torch.long))


def test_half_edge_graph_keeps_the_last_list_and_compares_it_by_value(monkeypatch):
    """The last edge list's half is kept (per thread) and returned for an equal list, new
    tensors with the same values included; a list changed in place after the call, or a
    different one, is split and checked anew (an asymmetric one still raises); a list longer
    than KEEP_MAX_EDGES is not kept."""
    from molnets import graph as graph_module
    from molnets.graph import half_edge_graph

    graph = AtomicGraph.from_ase(molecule("CH3CH2OH"), 4.0, dtype=torch.float64)
    graph = graph._replace(receivers=graph.receivers.clone(), senders=graph.senders.clone())
    first = half_edge_graph(graph)
    again = half_edge_graph(graph._replace(receivers=graph.receivers.clone(), shifts=graph.shifts.clone()))
    assert all(a is b for a, b in zip(first, again))  # equal values: the kept half
    other = AtomicGraph.from_ase(molecule("CH4"), 4.0, dtype=torch.float64)
    fresh = half_edge_graph(other)
    assert fresh.receivers is not first.receivers and fresh.receivers.shape == (other.num_edges // 2,)
    torch.testing.assert_close(edge_vectors(fresh).norm(dim=1).sort().values,
                               edge_vectors(other).norm(dim=1).sort().values[::2])
    half_edge_graph(graph)
    e = int(torch.nonzero(graph.receivers > graph.senders)[0])
    graph.senders[e] = graph.receivers[e]  # in place, after the call: no longer symmetric
    with pytest.raises(ValueError, match="symmetric"):
        half_edge_graph(graph)
    kept_edges = graph_module._LAST_HALF.edges[0]
    assert all(a is not b for a, b in zip(kept_edges, (graph.receivers, graph.senders, graph.shifts)))  # copies
    graph_module._LAST_HALF.edges = None
    monkeypatch.setattr(graph_module, "KEEP_MAX_EDGES", other.num_edges - 1)  # longer lists are not kept
    torch.testing.assert_close(half_edge_graph(other).receivers, fresh.receivers)
    assert graph_module._LAST_HALF.edges is None
