"""The one neighbor-list core of molnets.

Every model, dataset and calculator gets its edges from :func:`neighbor_list`. Backends differ
only in speed and where they run; all return the same pair set, tested against ASE and the
brute-force reference.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Dict, Literal, Optional, Tuple

import torch
from torch import Tensor

from ._cell_list import cell_list_neighbor_list
from ._cluster import cluster_neighbor_list
from ._geometry import MIN_PAIR_DISTANCE, PbcLike, System, check_no_overlap, validate
from ._reference import reference_neighbor_list
from ._vesin import SECONDS_PER_VISIT, vesin_cost, vesin_neighbor_list

__all__ = ["neighbor_list", "Backend", "BACKENDS", "MIN_PAIR_DISTANCE"]

Backend = Literal["auto", "reference", "torch", "vesin", "cluster"]

_Impl = Callable[[System, float], Tuple[Tensor, Tensor, Tensor, Tensor]]
_BACKENDS: Dict[str, _Impl] = {
    "reference": reference_neighbor_list,
    "torch": cell_list_neighbor_list,
    "vesin": vesin_neighbor_list,
    "cluster": cluster_neighbor_list,
}
BACKENDS: Tuple[str, ...] = tuple(_BACKENDS)


@functools.lru_cache(maxsize=None)
def _has_torch_cluster() -> bool:
    return importlib.util.find_spec("torch_cluster") is not None


def neighbor_list(
    positions: Tensor,
    cutoff: float,
    cell: Optional[Tensor] = None,
    pbc: PbcLike = None,
    batch: Optional[Tensor] = None,
    backend: Backend = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """Full neighbor list of one or many structures: all pairs closer than ``cutoff``.

    Returns every (i, j, S) with ``|x[j] - x[i] + S @ cell| < cutoff``, i and j in the same
    structure: both i->j and j->i, no self pair at zero shift, and self-images (i == j, S != 0)
    where a periodic image of an atom lies within the cutoff. Cells smaller than the cutoff give
    many images per pair. Atoms need not be wrapped into the cell. The pair order is
    unspecified and differs between backends.

    Args:
        positions: [N, 3] Cartesian positions, Å.
        cutoff: radius in Å, > 0; pairs at distance < cutoff are returned.
        cell: [3, 3] or [B, 3, 3], lattice vectors as rows, Å. Needed where any pbc is set;
            vectors along non-periodic directions are ignored (zero is fine).
        pbc: periodicity along each lattice vector, bool of shape [3] or [B, 3]; None means
            non-periodic. Mixed pbc (slabs, wires) is supported.
        batch: [N] long, the structure of each atom (0..B-1); None means one structure.
        backend: ``"reference"`` (brute force, the test oracle), ``"torch"`` (pure-torch cell
            list, any device, batched), ``"vesin"`` (CPU), ``"cluster"`` (torch-cluster,
            non-periodic only), or ``"auto"``, the fastest measured: on other devices the torch
            cell list; on the CPU vesin, except for batches of small structures (at most 64 atoms
            on average): torch-cluster if every structure is non-periodic and it is installed,
            else the batched torch cell list from 32 structures on; and except for systems that
            vesin would search slowly or not at all (an atom far from the rest, see
            ``_vesin.vesin_cost``): the torch cell list, whose time and memory stay O(N) however
            far apart the atoms are (tested up to 1e300 Å).

    Returns:
        receivers [E] (i), senders [E] (j), shifts [E, 3] (long, S) such that the edge vector is
        ``r_ij = positions[senders] - positions[receivers] + shifts @ cell[batch[receivers]]``,
        the same as ASE's ``neighbor_list("ijS")``.

    Raises:
        ValueError: NaN/inf positions or cell, cutoff <= 0, a singular cell along periodic
            directions, pbc without a cell, mismatched shapes, atoms on top of each other
            (closer than ``MIN_PAIR_DISTANCE``), an atom 2^52 or more cells away along a periodic
            lattice vector but within the cutoff of other atoms along the non-periodic ones
            (float64 cannot place it in the cell), ``"cluster"`` asked for a periodic system, or
            ``"vesin"`` asked for a system it would crash on, get wrong or search for seconds (the
            message says which; ``"torch"`` computes it).

    >>> import torch
    >>> x = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    >>> receivers, senders, shifts = neighbor_list(x, cutoff=1.5, backend="reference")
    >>> sorted(zip(receivers.tolist(), senders.tolist()))
    [(0, 1), (1, 0)]
    """
    system = validate(positions, cutoff, cell, pbc, batch)
    receivers, senders, shifts, distances = _BACKENDS[_resolve(backend, system, float(cutoff))](system, float(cutoff))
    check_no_overlap(receivers, senders, distances)
    return receivers, senders, shifts


# "auto" on the CPU, from benchmarks/neighbors.py (2 cores): vesin is the fastest single-structure
# search (fcc Cu 256-16384 atoms: the torch cell list is 3-6x slower). For a batch of many small
# molecules vesin's per-call cost adds up: 64 g2 molecules took 18 ms with a vesin loop, 15 ms with
# the batched torch cell list and 0.9 ms with torch-cluster's batched radius graph.
_SMALL_STRUCTURE = 64   # atoms per structure, on average
_MANY_STRUCTURES = 32
# ... and vesin only where its cell search is not the slower one: the torch cell list takes about
# 1 ms + 12 µs per atom on the CPU (benchmarks/neighbors.py, fcc Cu 4-16384 atoms, 1 thread), vesin
# ~4 ns per cell its search visits (see _vesin.py). Ordinary systems are far below: fcc Cu 16384
# visits 3.6e4 cells, ethanol 245, a 6x6x4 Cu(111) slab with an atom 30 Å above it 7e3. A slab of
# 12 atoms with its top atom 1e3 Å up visits 2e6 (vesin 8.9 ms, torch 1.3 ms): torch.
_TORCH_SECONDS = 1e-3
_TORCH_SECONDS_PER_ATOM = 12e-6


def _resolve(backend: str, system: System, cutoff: float) -> str:
    if backend == "auto":
        if not system.positions.is_cpu:
            return "torch"
        num_atoms, num_graphs = system.positions.shape[0], system.cell.shape[0]
        small = num_atoms <= _SMALL_STRUCTURE * num_graphs
        if num_graphs > 1 and small and _has_torch_cluster() and not bool(system.pbc.any()):
            return "cluster"
        if num_graphs >= _MANY_STRUCTURES and small:
            return "torch"
        # vesin unless its search would visit more cells than the torch cell list takes time
        enough = (_TORCH_SECONDS + _TORCH_SECONDS_PER_ATOM * num_atoms) / SECONDS_PER_VISIT
        vesin = vesin_cost(system, cutoff, enough)
        return "vesin" if vesin.problem is None and vesin.visits <= enough else "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"unknown neighbor-list backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if backend == "vesin":
        problem = vesin_cost(system, cutoff).problem
        if problem is not None:
            raise ValueError(
                f"backend='vesin' cannot compute this neighbor list: {problem}. Use backend='torch' "
                "(the pure-torch cell list, which \"auto\" picks here)"
            )
    return backend
