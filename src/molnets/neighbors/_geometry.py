"""Geometry shared by the neighbor-list backends: input checks and a full-rank cell.

Private: the public face is :func:`molnets.neighbors.neighbor_list`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

PbcLike = Union[None, bool, Sequence[bool], Tensor]

# Two atoms closer than this (Å) are "on top of each other": every model divides by |r_ij|.
MIN_PAIR_DISTANCE = 1e-6
# |det| of the periodic lattice vectors' Gram matrix, relative to the product of their squared
# lengths, below which the cell counts as singular.
SINGULAR_CELL_TOL = 1e-12
# An atom 2^52 or more cells away along a periodic lattice vector (its fractional coordinate,
# float64) has no place left inside the cell: the spacing of float64 numbers there is a whole
# cell, so its pairs with other atoms cannot be computed (and its cell shift nears int64's
# range), unless it is far from all of them along a non-periodic direction (unwrapped_far_atoms).
MAX_WRAP = 2.0**52
CPU = torch.device("cpu")


class Host(NamedTuple):
    """numpy copies or views of a :class:`System` for the CPU backends, and what the checks found."""

    positions: Optional[np.ndarray]  # [N, 3] view of float32/float64 CPU positions, else None
    cell: np.ndarray                 # [B, 3, 3] float64
    pbc: np.ndarray                  # [B, 3] bool
    reduced: bool                    # no move of reduce_cell shortens a periodic vector of any cell
    # Smallest and largest coordinate of all atoms (Å, any axis), if positions is a view with
    # atoms, else None: vesin's grid is sized from the atoms' extent (_vesin.vesin_cost).
    bounds: Optional[Tuple[float, float]]


class System(NamedTuple):
    """Validated, broadcast inputs of ``neighbor_list`` (B structures, N atoms)."""

    positions: Tensor     # [N, 3] float
    cell: Tensor          # [B, 3, 3] float, rows are lattice vectors (zero rows allowed if not periodic)
    pbc: Tensor           # [B, 3] bool
    batch: Tensor         # [N] long
    host: Host            # the same positions, cell and pbc on the host, checked


def validate(
    positions: Tensor,
    cutoff: float,
    cell: Optional[Tensor],
    pbc: PbcLike,
    batch: Optional[Tensor],
) -> System:
    """Check every input of ``neighbor_list`` and broadcast cell and pbc to [B, ...].

    Raises:
        ValueError: naming the problem (shape, NaN/inf, cutoff, singular cell, pbc without cell).
    """
    if not isinstance(positions, Tensor) or positions.dim() != 2 or positions.shape[1] != 3:
        shape = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
        raise ValueError(f"positions must be a tensor of shape [N, 3], got {shape}")
    if not positions.is_floating_point():
        raise ValueError(f"positions must be a floating-point tensor, got {positions.dtype}")
    view = numpy_view(positions)
    bounds = None
    if view is not None and view.shape[0] > 0:
        # The extremes, which vesin's guard needs, are also the finite check: NaN propagates
        # through min and max, and inf is its own extreme. Over all coordinates at once: along
        # axis 0 of [N, 3], numpy is 30-80x slower (2048-16384 atoms).
        bounds = (float(np.minimum.reduce(view, axis=None)), float(np.maximum.reduce(view, axis=None)))
        total = bounds[0] + bounds[1]
    else:
        total = positions.sum()
    # A NaN or inf anywhere makes the total so (an overflow of huge finite values also does, which
    # the exact look-up below tells apart).
    if not math.isfinite(total):
        bad = (~torch.isfinite(positions).all(dim=1)).nonzero().flatten()[:5].tolist()
        if bad:
            raise ValueError(f"positions contain NaN or infinite values (atoms {bad})")
    cutoff = float(cutoff)
    if not cutoff > 0 or cutoff == float("inf"):
        raise ValueError(f"cutoff must be a finite number > 0 Å, got {cutoff}")

    num_atoms = positions.shape[0]
    if batch is None:
        # On the CPU made by numpy: a torch factory call costs several times more (~10 µs).
        batch = (
            torch.from_numpy(np.zeros(num_atoms, dtype=np.int64)) if positions.is_cpu
            else torch.zeros(num_atoms, dtype=torch.long, device=positions.device)
        )
        num_graphs_in_batch = 1
    elif batch.shape != (num_atoms,):
        raise ValueError(f"batch must have shape [N] = [{num_atoms}], got {tuple(batch.shape)}")
    elif batch.dtype != torch.long:
        raise ValueError(f"batch must be a long tensor, got {batch.dtype}")
    elif num_atoms == 0:
        num_graphs_in_batch = 1
    else:
        low, high = _min_max(batch)
        if low < 0:
            raise ValueError("batch contains negative structure indices")
        num_graphs_in_batch = high + 1

    pbc_np = _host_pbc(pbc)                                                   # [3] or [B, 3]
    if cell is None:
        if pbc_np.any():
            raise ValueError("pbc is set but no cell was given: periodic boundaries need a cell")
        cell = positions.new_zeros((num_graphs_in_batch, 3, 3))
    else:
        if not isinstance(cell, Tensor):
            cell = torch.as_tensor(cell, dtype=positions.dtype, device=positions.device)
        if cell.shape == (3, 3):
            cell = cell.unsqueeze(0)
        if cell.dim() != 3 or cell.shape[1:] != (3, 3):
            raise ValueError(f"cell must have shape [3, 3] or [B, 3, 3], got {tuple(cell.shape)}")
        # Tested first: .to costs ~10 µs on the CPU even when it has nothing to do.
        if cell.dtype != positions.dtype or cell.device != positions.device:
            cell = cell.to(dtype=positions.dtype, device=positions.device)
    num_graphs = cell.shape[0]
    if num_graphs_in_batch > num_graphs:
        raise ValueError(
            f"batch refers to structure {num_graphs_in_batch - 1} but only {num_graphs} cell(s) were given"
        )
    # A new contiguous, writable [B, 3] array (torch wants it), never the caller's memory.
    if pbc_np.shape == (3,):
        pbc_np = pbc_np[None].repeat(num_graphs, axis=0)                      # [B, 3]
    elif pbc_np.shape == (num_graphs, 3):
        pbc_np = pbc_np.copy()                                                # [B, 3]
    else:
        raise ValueError(f"pbc must have shape [3] or [B, 3] = [{num_graphs}, 3], got {pbc_np.shape}")
    pbc_t = torch.from_numpy(pbc_np)                                          # [B, 3]
    # The per-structure checks run in numpy on a host copy of the (tiny) cell and pbc: a handful
    # of numpy calls cost less than the ~15 small torch ops they replace, on every device.
    cell_np = host_cell(cell)                                                 # [B, 3, 3]
    reduced = check_lattice(cell_np, pbc_np)
    if not positions.is_cpu:
        pbc_t = pbc_t.to(positions.device)
    return System(positions, cell, pbc_t, batch, Host(view, cell_np, pbc_np, reduced, bounds))


def host_cell(cell: Tensor) -> np.ndarray:
    """float64 numpy copy of cell [B, 3, 3] (a view of a float64 CPU cell)."""
    view = numpy_view(cell)
    if view is not None and view.dtype == np.float64:
        return view
    return cell.detach().to(CPU, torch.float64).numpy()


def numpy_view(values: Tensor) -> Optional[np.ndarray]:
    """A numpy view (no copy) of a float32/float64 CPU tensor, else None.

    The checks reduce over such views with the ufuncs' own ``reduce`` (not even numpy's Python
    wrappers): on the CPU that costs a few microseconds, a torch reduction several times more
    (dispatch), which adds up to a tenth of a small neighbor list.
    """
    if not values.is_cpu or values.dtype not in (torch.float32, torch.float64):
        return None
    return (values.detach() if values.requires_grad else values).numpy()


def _min_max(batch: Tensor) -> Tuple[int, int]:
    """Smallest and largest structure index of a non-empty batch [N]; one numpy pass on the CPU
    for the common single structure (all zero)."""
    if batch.is_cpu and not batch.numpy().any():
        return 0, 0
    low, high = torch.aminmax(batch)
    return int(low), int(high)


def check_lattice(cell: np.ndarray, pbc: np.ndarray) -> bool:
    """Raise if a cell is not finite or is singular along its periodic directions; return
    whether every cell is already reduced (see :func:`reducible`).

    The answer depends on the cells' values only, and is remembered for the last few distinct
    ones: a simulation or a benchmark passes the same cell again and again, and these checks
    (about 20 numpy calls, ~60 µs) cost several percent of vesin's whole search on 256 atoms.

    Shapes:
        cell [B, 3, 3] (float64), pbc [B, 3] (bool)
    """
    return _check_lattice_bytes(cell.tobytes(), pbc.tobytes())


@functools.lru_cache(maxsize=64)
def _check_lattice_bytes(cell_bytes: bytes, pbc_bytes: bytes) -> bool:
    cell = np.frombuffer(cell_bytes, dtype=np.float64).reshape(-1, 3, 3)     # [B, 3, 3]
    pbc = np.frombuffer(pbc_bytes, dtype=np.bool_).reshape(-1, 3)            # [B, 3]
    if not np.isfinite(cell).all():
        raise ValueError("cell contains NaN or infinite values")
    _check_periodic_vectors(cell, pbc)
    return not reducible(cell, pbc)


def _host_pbc(pbc: PbcLike) -> np.ndarray:
    """pbc as a numpy bool array of shape [3] or [B, 3] (shape checked against B later)."""
    if pbc is None or isinstance(pbc, bool):
        return np.array([bool(pbc)] * 3)
    pbc_np = pbc.cpu().numpy() if isinstance(pbc, Tensor) else np.asarray(pbc)
    if pbc_np.dtype != np.bool_:
        raise ValueError(f"pbc must be booleans, got {pbc_np.dtype}")
    if pbc_np.ndim not in (1, 2) or pbc_np.shape[-1] != 3:
        raise ValueError(f"pbc must have shape [3] or [B, 3], got {pbc_np.shape}")
    return pbc_np


def _check_periodic_vectors(cell: np.ndarray, pbc: np.ndarray) -> None:
    """The lattice vectors along periodic directions must be linearly independent.

    Shapes:
        cell [B, 3, 3] (float64), pbc [B, 3] (bool)
    """
    rows = cell * pbc[..., None]                                              # [B, 3, 3]
    gram = rows @ rows.transpose(0, 2, 1)                                     # [B, 3, 3]
    # Non-periodic directions get a unit diagonal so that they do not make the Gram matrix singular.
    gram[:, np.arange(3), np.arange(3)] += ~pbc                               # [B, 3, 3]
    scale = np.where(pbc, (rows * rows).sum(-1), 1.0).prod(-1)                # [B]
    singular = np.linalg.det(gram) <= SINGULAR_CELL_TOL * scale               # [B]
    if singular.any():
        bad = np.flatnonzero(singular)[:5].tolist()
        raise ValueError(
            f"the cell of structure(s) {bad} is singular along its periodic directions "
            "(lattice vectors are zero or linearly dependent)"
        )


def complete_cell(cell: Tensor, pbc: Tensor) -> Tensor:
    """Replace the non-periodic lattice vectors by unit vectors orthogonal to the periodic ones.

    The result is a full-rank basis in which the periodic vectors are unchanged, so that
    fractional coordinates along periodic directions are the true ones, and the other
    fractional coordinates are plain Cartesian lengths (Å) along orthonormal directions.

    Shapes:
        cell [B, 3, 3], pbc [B, 3]  ->  [B, 3, 3]
    """
    out = torch.eye(3, dtype=cell.dtype, device=cell.device).repeat(cell.shape[0], 1, 1)  # [B, 3, 3]
    num_periodic = pbc.sum(-1)                                                # [B]
    full = num_periodic == 3
    out[full] = cell[full]
    for g in (~full & (num_periodic > 0)).nonzero().flatten().tolist():
        out[g] = _complete_one(cell[g], pbc[g])
    return out


def _complete_one(cell: Tensor, pbc: Tensor) -> Tensor:
    periodic = [k for k in range(3) if bool(pbc[k])]
    free = [k for k in range(3) if not bool(pbc[k])]
    basis = []  # orthonormal basis of the periodic subspace
    for k in periodic:
        v = cell[k].clone()
        for b in basis:
            v = v - (v @ b) * b
        basis.append(v / v.norm())
    # Gram-Schmidt of the Cartesian axes against the periodic vectors, least aligned axis first.
    axes = torch.eye(3, dtype=cell.dtype, device=cell.device)
    order = torch.stack([sum((axes[a] @ b).abs() for b in basis) for a in range(3)]).argsort()
    extra = []
    for a in order.tolist():
        v = axes[a].clone()
        for b in basis + extra:
            v = v - (v @ b) * b
        if v.norm() > 1e-6:
            extra.append(v / v.norm())
        if len(extra) == len(free):
            break
    out = cell.clone()
    for k, v in zip(free, extra):
        out[k] = v
    return out


def unwrapped_far_atoms(
    frac: Tensor, image: Tensor, atom_pbc: Tensor, batch: Tensor, reach: float, atoms: Optional[Tensor] = None
) -> Tensor:
    """Atoms :data:`MAX_WRAP` or more cells away along a periodic lattice vector that are
    isolated: farther than ``reach`` from every other atom of their structure along a
    non-periodic direction. Such an atom pairs only with its own periodic images, whose vectors
    S @ cell do not depend on where in the cell it is, so the caller leaves it unwrapped (a = 0).
    This is an atom flown off a slab at 1e30 Å: float64 cannot make its path exactly normal to
    the lattice, and its drift along the lattice is itself 1e15 cells.

    Args:
        frac: [N, 3] fractional coordinates (Å along the orthonormal non-periodic directions).
        image: [N, 3] the atoms' whole numbers of cells (0 along non-periodic directions).
        atom_pbc: [N, 3] bool, periodicity of each atom's structure.
        batch: [N] structure of each atom.
        reach: Å, at least the cutoff.
        atoms: [N] the atoms' indices in the caller's input, for the message, if ``frac`` holds a subset.

    Returns:
        [N] bool, the isolated far atoms.

    Raises:
        ValueError: for a far atom that is not isolated: its pairs with other atoms depend on its
            place in the cell, which float64 has lost.
    """
    too_far = ((image.abs() >= MAX_WRAP) & atom_pbc).any(1)                   # [N]
    # Nearest other atom of the same structure along each direction: sort by structure, then by
    # coordinate within it, and look at both sorted neighbors.
    values, order = torch.sort(frac, dim=0)                                   # [N, 3] x2
    graph, by_graph = torch.sort(batch[order], dim=0, stable=True)            # [N, 3] x2
    values, order = values.gather(0, by_graph), order.gather(0, by_graph)     # [N, 3] x2
    apart = torch.where(graph[1:] == graph[:-1], values.diff(dim=0), math.inf)  # [N-1, 3]
    edge = values.new_full((1, 3), math.inf)
    nearest = torch.minimum(torch.cat((edge, apart)), torch.cat((apart, edge)))  # [N, 3]
    alone = torch.empty_like(nearest).scatter_(0, order, nearest) > reach     # [N, 3]
    isolated = too_far & (alone & ~atom_pbc).any(1)                           # [N]
    stuck = too_far & ~isolated                                               # [N]
    if bool(stuck.any()):
        bad = stuck.nonzero().flatten()[:5]
        bad = (bad if atoms is None else atoms[bad]).tolist()
        raise ValueError(
            f"atoms {bad} are {MAX_WRAP:.1e} or more cells away along a periodic lattice vector, among "
            "other atoms: float64 cannot place them inside the cell, and their pairs depend on it (wrap "
            "the positions into the cell, or fix the simulation that sent them there)"
        )
    return isolated


def check_no_overlap(
    receivers: Tensor, senders: Tensor, distances: Tensor
) -> None:
    """Raise if two atoms (or an atom and its periodic image) sit on top of each other."""
    if distances.numel() == 0:
        return
    # One reduction (a single pass, one host sync); the offending pair is looked up only on failure.
    view = numpy_view(distances)
    closest = np.minimum.reduce(view) if view is not None else distances.min()
    if bool(closest < MIN_PAIR_DISTANCE):
        e = int((distances < MIN_PAIR_DISTANCE).nonzero()[0, 0])
        raise ValueError(
            f"atoms {int(receivers[e])} and {int(senders[e])} are on top of each other "
            f"(distance {float(distances[e]):.3g} Å < {MIN_PAIR_DISTANCE} Å)"
        )


# Reduction moves (k, l, c_l, m, c_m): a_k is reduced by w = c_l a_l + c_m a_m.
_MOVES = [
    (k, l, 1, m, c)
    for k, (l, m) in enumerate(((1, 2), (0, 2), (0, 1)))
    for (l, m, c) in ((l, m, 0), (m, l, 0), (l, m, 1), (l, m, -1))
]


# The moves as arrays: coefficient rows [12, 3] (w = coefficients @ cell), the reduced row k [12].
_MOVE_COEFFICIENTS = np.array(
    [[cl * (c == l) + cm * (c == m) for c in range(3)] for _, l, cl, m, cm in _MOVES], dtype=np.float64
)
_MOVE_ROW = np.array([move[0] for move in _MOVES])


def reducible(cell: np.ndarray, pbc: np.ndarray) -> bool:
    """Whether any move of :func:`reduce_cell` would shorten a periodic vector (all moves at once).

    Shapes:
        cell [B, 3, 3] (float64), pbc [B, 3] (bool)
    """
    w = _MOVE_COEFFICIENTS @ cell                                             # [B, 12, 3]
    ratio = (cell[:, _MOVE_ROW] * w).sum(-1) / np.maximum((w * w).sum(-1), 1e-300)  # [B, 12]
    # A move counts only if every vector it uses (a_k and those in w) is periodic.
    uses_free = ((_MOVE_COEFFICIENTS != 0)[None] & ~pbc[:, None, :]).any(-1)  # [B, 12]
    active = ~uses_free & pbc[:, _MOVE_ROW]                                   # [B, 12]
    return bool((active & (np.abs(ratio) > 0.5 + 1e-9)).any())


def reduce_cell(cell: Tensor, pbc: Tensor, max_iterations: int = 200) -> Tuple[Tensor, Tensor]:
    """Lattice reduction of the periodic vectors: the same lattice, with short, nearly
    orthogonal vectors, so that a strongly skewed cell needs no huge search box.

    Greedy Minkowski-style reduction, all structures at once: a periodic vector a_k is replaced by
    a_k - round(a_k . w / |w|^2) w for w another periodic vector or the sum or difference of the
    two others, while that shortens it. Non-periodic rows are left alone.

    Returns:
        reduced [B, 3, 3] = transform @ cell, and transform [B, 3, 3] (long, unimodular), so that
        a shift S_r in the reduced basis is the shift ``S_r @ transform`` in the original one.

    Shapes:
        cell [B, 3, 3], pbc [B, 3]  ->  [B, 3, 3], [B, 3, 3]
    """
    num_graphs = cell.shape[0]
    transform = torch.eye(3, dtype=torch.long, device=cell.device).repeat(num_graphs, 1, 1)
    if not reducible(host_cell(cell), pbc.cpu().numpy()):  # the common case, decided with one host sync
        return cell, transform
    reduced = cell.clone()                                                    # [B, 3, 3]
    for _ in range(max_iterations):
        changed = torch.zeros((), dtype=torch.bool, device=cell.device)
        for k, l, cl, m, cm in _MOVES:
            active = pbc[:, k] & pbc[:, l] & (pbc[:, m] | (cm == 0))           # [B]
            w = cl * reduced[:, l] + cm * reduced[:, m]                       # [B, 3]
            w_t = cl * transform[:, l] + cm * transform[:, m]                 # [B, 3]
            ratio = (reduced[:, k] * w).sum(-1) / (w * w).sum(-1).clamp(min=1e-300)  # [B]
            # Strictly shorter only beyond one half: no cycling on ties.
            mu = torch.where(active & (ratio.abs() > 0.5 + 1e-9), torch.round(ratio), torch.zeros_like(ratio))
            changed = changed | (mu != 0).any()
            reduced[:, k] = reduced[:, k] - mu.unsqueeze(1) * w
            transform[:, k] = transform[:, k] - mu.to(torch.long).unsqueeze(1) * w_t
        if not bool(changed):
            break
    # Recomputed from the integers, so that rounding does not accumulate over the iterations.
    return transform.to(cell.dtype) @ cell, transform
