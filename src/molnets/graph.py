"""``AtomicGraph``: the one data contract of molnets, and the edge geometry computed from it.

Edge convention (the same as ASE's and vesin's ``"ijS"``): edge e goes from the sender
j = ``senders[e]`` to the receiver i = ``receivers[e]``, and its vector is

    r_ij = x[j] - x[i] + S_e @ cell[g(i)],

with S_e = ``shifts[e]`` the integer cell shift. Messages flow j -> i and are summed over
j in N(i). Non-periodic structures have zero shifts (their cell may be zero).
"""

from __future__ import annotations

import threading
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._frozen import same_values, traced
from .layers.pairs import half_edges
from .neighbors import Backend, neighbor_list

__all__ = ["AtomicGraph", "batch_graphs", "split_graphs", "edge_vectors", "edge_vectors_backward", "half_edge_graph"]


class AtomicGraph(NamedTuple):
    """One or many atomic structures with their neighbor list (B structures, N atoms, E edges).

    A typed ``NamedTuple`` of tensors: it passes through ``torch.compile`` and ``torch.export``
    as is, and every model's ``forward`` takes exactly this.

    Fields:
        positions: [N, 3] float, Cartesian positions, Å.
        atomic_numbers: [N] long, Z of each atom.
        cell: [B, 3, 3] float, lattice vectors as rows, Å (zero for molecules).
        pbc: [B, 3] bool, periodicity along each lattice vector.
        batch: [N] long, the structure (0..B-1) each atom belongs to.
        receivers: [E] long, i: the atom whose neighborhood is summed.
        senders: [E] long, j: the neighbor that sends the message.
        shifts: [E, 3] long, integer cell shifts S of each edge.
    """

    positions: Tensor
    atomic_numbers: Tensor
    cell: Tensor
    pbc: Tensor
    batch: Tensor
    receivers: Tensor
    senders: Tensor
    shifts: Tensor

    @property
    def num_graphs(self) -> int:
        """B, from a shape (no host sync)."""
        return self.cell.shape[0]

    @property
    def num_atoms(self) -> int:
        """N."""
        return self.positions.shape[0]

    @property
    def num_edges(self) -> int:
        """E."""
        return self.receivers.shape[0]

    @classmethod
    def from_positions(
        cls,
        positions: Tensor,
        atomic_numbers: Tensor,
        cutoff: float,
        *,
        cell: Optional[Tensor] = None,
        pbc: Optional[Tensor] = None,
        batch: Optional[Tensor] = None,
        backend: Backend = "auto",
    ) -> "AtomicGraph":
        """Build a graph from tensors, computing the neighbor list within ``cutoff`` (Å).

        Shapes:
            positions [N, 3], atomic_numbers [N], cell [3, 3] or [B, 3, 3],
            pbc [3] or [B, 3], batch [N]  ->  AtomicGraph

        Raises:
            ValueError: positions not a float32 or float64 tensor, atomic numbers that are not
                whole numbers, a structure without atoms (N = 0, or a structure of the batch that
                no atom belongs to), besides the neighbor list's checks (NaN positions, a singular
                periodic cell, atoms on top of each other, a cutoff <= 0).
        """
        if not isinstance(positions, Tensor) or positions.dtype not in (torch.float32, torch.float64):
            what = positions.dtype if isinstance(positions, Tensor) else type(positions).__name__
            raise ValueError(f"positions must be a float32 or float64 tensor [N, 3] (Å), got {what}")
        num_atoms = positions.shape[0]
        if num_atoms == 0:
            raise ValueError("the structure is empty (no atoms): a graph needs at least one atom")
        receivers, senders, shifts = neighbor_list(positions, cutoff, cell, pbc, batch, backend=backend)
        if batch is None:
            batch = torch.zeros(num_atoms, dtype=torch.long, device=positions.device)
        if cell is None:
            num_graphs = int(batch.max()) + 1 if num_atoms > 0 else 1
            cell = positions.new_zeros((num_graphs, 3, 3))
        cell = torch.as_tensor(cell, dtype=positions.dtype, device=positions.device)
        if cell.dim() == 2:
            cell = cell.unsqueeze(0)
        empty = (torch.bincount(batch, minlength=cell.shape[0]) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"structure(s) {empty} of the batch are empty (no atoms): every structure "
                             "needs at least one atom")
        if pbc is None:
            pbc = torch.zeros(3, dtype=torch.bool)
        pbc = torch.as_tensor(pbc, dtype=torch.bool, device=positions.device).expand(cell.shape[0], 3)
        atomic_numbers = torch.as_tensor(atomic_numbers, device=positions.device)
        if atomic_numbers.is_floating_point() and not bool((atomic_numbers == atomic_numbers.round()).all()):
            raise ValueError(f"atomic_numbers must be whole numbers, got {atomic_numbers.tolist()}")
        atomic_numbers = atomic_numbers.long()
        if atomic_numbers.shape != (num_atoms,):
            raise ValueError(
                f"atomic_numbers must have shape [N] = [{num_atoms}], got {tuple(atomic_numbers.shape)}"
            )
        return cls(positions, atomic_numbers, cell, pbc.contiguous(), batch, receivers, senders, shifts)

    @classmethod
    def from_ase(
        cls,
        atoms: Union["ase.Atoms", Sequence["ase.Atoms"]],  # noqa: F821
        cutoff: float,
        *,
        backend: Backend = "auto",
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> "AtomicGraph":
        """Graph of one ``ase.Atoms`` or a batch of a list of them, neighbors within ``cutoff`` (Å).

        The neighbor list is computed in float64 from ASE's positions, then the graph is cast
        to ``dtype`` (default: ``torch.get_default_dtype()``) and moved to ``device``.
        """
        structures = [atoms] if not isinstance(atoms, (list, tuple)) else list(atoms)
        if not structures:
            raise ValueError("from_ase needs at least one structure, got an empty list")
        positions = torch.from_numpy(np.concatenate([a.get_positions() for a in structures]))
        numbers = torch.from_numpy(np.concatenate([a.numbers for a in structures]).astype(np.int64))
        cell = torch.from_numpy(np.stack([np.asarray(a.cell[:], dtype=np.float64) for a in structures]))
        pbc = torch.from_numpy(np.stack([np.asarray(a.pbc, dtype=bool) for a in structures]))
        sizes = torch.tensor([len(a) for a in structures])
        batch = torch.repeat_interleave(torch.arange(len(structures)), sizes)
        graph = cls.from_positions(
            positions, numbers, cutoff, cell=cell, pbc=pbc, batch=batch, backend=backend
        )
        return graph.to(device, dtype or torch.get_default_dtype())

    def to_ase(self) -> List["ase.Atoms"]:  # noqa: F821
        """One ``ase.Atoms`` per structure (always a list, also for a single structure)."""
        import ase

        atoms = []
        for graph in split_graphs(self):
            atoms.append(
                ase.Atoms(
                    numbers=graph.atomic_numbers.cpu().numpy(),
                    positions=graph.positions.detach().cpu().double().numpy(),
                    cell=graph.cell[0].detach().cpu().double().numpy(),
                    pbc=graph.pbc[0].cpu().numpy(),
                )
            )
        return atoms

    def to(
        self, device: Optional[Union[str, torch.device, torch.dtype]] = None, dtype: Optional[torch.dtype] = None
    ) -> "AtomicGraph":
        """Move every tensor to ``device`` and cast the float ones (positions, cell) to ``dtype``
        (float32 or float64); as with ``Tensor.to``, a dtype alone may come first:
        ``graph.to(torch.float64)``."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError("AtomicGraph.to got two dtypes")
            device, dtype = None, device
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"a graph's positions and cell are float32 or float64, got {dtype}")
        return AtomicGraph(
            *(t.to(device=device, dtype=dtype if t.is_floating_point() else None) for t in self)
        )


def edge_vectors(graph: AtomicGraph) -> Tensor:
    """Edge vectors r_ij = x[j] - x[i] + S @ cell, differentiable in positions and cell.

    Autograd reaches the cell through the shifts, which is what the stress needs.

    Shapes:
        graph with N atoms, E edges  ->  [E, 3], Å
    """
    # index_select, not x[idx]: cheaper, and its backward is an index_add, not an accumulating index_put
    cell = graph.cell.index_select(0, graph.batch.index_select(0, graph.receivers))  # [E, 3, 3]
    offset = torch.bmm(graph.shifts.to(cell.dtype)[:, None], cell)[:, 0]              # [E, 3]: S_e @ cell
    positions = graph.positions
    return positions.index_select(0, graph.senders) - positions.index_select(0, graph.receivers) + offset  # [E, 3]


def edge_vectors_backward(graph: AtomicGraph, grad: Tensor, positions: bool = True,
                          cell: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The gradients of positions and cell from that of ``edge_vectors(graph)`` (its adjoint, for
    kernels with a hand-written backward): with r_ij = x[j] - x[i] + S_ij @ cell,

        ∂L/∂x_k = Σ_(edges with j = k) g_ij - Σ_(edges with i = k) g_ij,
        ∂L/∂cell_b = Σ_(edges ij of structure b) S_ijᵀ g_ij

    (None for what is not asked).

    Shapes:
        graph with N atoms, E edges, B structures, grad [E, 3]  ->  [N, 3], [B, 3, 3]
    """
    grad_positions = grad_cell = None
    if positions:
        grad_positions = torch.zeros_like(graph.positions).index_add_(0, graph.senders, grad)   # [N, 3]
        grad_positions.index_add_(0, graph.receivers, grad, alpha=-1)
    if cell:
        outer = graph.shifts.to(grad.dtype)[:, :, None] * grad[:, None, :]                 # [E, 3, 3]
        structure = graph.batch.index_select(0, graph.receivers)                           # [E]
        grad_cell = torch.zeros_like(graph.cell).index_add_(0, structure, outer)           # [B, 3, 3]
    return grad_positions, grad_cell


def half_edge_graph(graph: AtomicGraph) -> AtomicGraph:
    """The same structures with one directed edge of each pair {(i, j, S), (j, i, -S)}.

    Whatever depends only on |r_ij| (radial bases, filter networks) is equal on both
    directions of a pair: models compute it on these P = E // 2 edges and send each pair's
    message both ways (see :func:`molnets.layers.pairs.half_edges`). Static shapes: compiles
    and exports.

    Eager mode keeps the last edge list and its half (per thread) when it has at most
    ``KEEP_MAX_EDGES`` edges: the next call with the same edges (compared by value: three equality
    tests) returns the kept half without the sort, the symmetry check and the gathers, some 30
    small operations (~80 µs on the CPU). A molecule's list stays the same from step to step of a
    simulation. Longer lists are not kept (their split costs under 1% of a model's call: 1.2 ms
    at 88k edges, a copy of them would stay in memory).

    Shapes:
        graph with E edges  ->  graph with P = E // 2 edges (receivers, senders, shifts [P, 3])
    """
    edges = (graph.receivers, graph.senders, graph.shifts)
    keep = not traced() and graph.receivers.shape[0] <= KEEP_MAX_EDGES
    kept = getattr(_LAST_HALF, "edges", None) if keep else None
    if kept is None or not same_values(kept[0], edges):
        pairs = half_edges(*edges)                                                    # [P]
        half = tuple(x.index_select(0, pairs) for x in edges)
        if not keep:
            return graph._replace(receivers=half[0], senders=half[1], shifts=half[2])
        with torch.inference_mode(False):  # usable outside inference mode too
            kept = _LAST_HALF.edges = (tuple(x.clone() for x in edges), tuple(x.clone() for x in half))
    receivers, senders, shifts = kept[1]
    return graph._replace(receivers=receivers, senders=senders, shifts=shifts)


_LAST_HALF = threading.local()
KEEP_MAX_EDGES = 1 << 16  # edge lists up to this long are kept by half_edge_graph (a molecule, a small cell)


def batch_graphs(graphs: Sequence[AtomicGraph]) -> AtomicGraph:
    """Concatenate graphs into one batch; atom and structure indices are offset.

    Shapes:
        graphs with N_g atoms, E_g edges, B_g structures  ->  sum N_g, sum E_g, sum B_g
    """
    if not graphs:
        raise ValueError("batch_graphs needs at least one graph")
    kinds = {(g.positions.dtype, g.positions.device) for g in graphs}
    if len(kinds) > 1:  # torch.cat would promote float32 to float64 without a word
        raise ValueError(f"batch_graphs needs graphs of one dtype and device, got {sorted(map(str, kinds))}: "
                         "convert them first (graph.to(device, dtype))")
    atom_offsets = torch.tensor([0] + [g.num_atoms for g in graphs[:-1]]).cumsum(0).tolist()
    graph_offsets = torch.tensor([0] + [g.num_graphs for g in graphs[:-1]]).cumsum(0).tolist()
    return AtomicGraph(
        positions=torch.cat([g.positions for g in graphs]),
        atomic_numbers=torch.cat([g.atomic_numbers for g in graphs]),
        cell=torch.cat([g.cell for g in graphs]),
        pbc=torch.cat([g.pbc for g in graphs]),
        batch=torch.cat([g.batch + o for g, o in zip(graphs, graph_offsets)]),
        receivers=torch.cat([g.receivers + o for g, o in zip(graphs, atom_offsets)]),
        senders=torch.cat([g.senders + o for g, o in zip(graphs, atom_offsets)]),
        shifts=torch.cat([g.shifts for g in graphs]),
    )


def split_graphs(graph: AtomicGraph) -> List[AtomicGraph]:
    """Undo ``batch_graphs``: one single-structure graph per structure, indices renumbered."""
    out = []
    edge_graph = graph.batch[graph.receivers]                                        # [E]
    for g in range(graph.num_graphs):
        atoms = (graph.batch == g).nonzero().flatten()                               # [n]
        edges = (edge_graph == g).nonzero().flatten()                                # [e]
        renumber = torch.full((graph.num_atoms,), -1, dtype=torch.long, device=graph.batch.device)
        renumber[atoms] = torch.arange(len(atoms), device=graph.batch.device)
        out.append(
            AtomicGraph(
                positions=graph.positions[atoms],
                atomic_numbers=graph.atomic_numbers[atoms],
                cell=graph.cell[g : g + 1],
                pbc=graph.pbc[g : g + 1],
                batch=torch.zeros(len(atoms), dtype=torch.long, device=graph.batch.device),
                receivers=renumber[graph.receivers[edges]],
                senders=renumber[graph.senders[edges]],
                shifts=graph.shifts[edges],
            )
        )
    return out
