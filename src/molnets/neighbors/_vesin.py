"""vesin backend: the C++ cell list of the ``vesin`` package, on the CPU, one structure at a time,
and :func:`vesin_cost`, which tells beforehand whether vesin can take a system at all."""

from __future__ import annotations

import functools
import math
import threading
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from vesin import NeighborList

from ._geometry import CPU, System, reduce_cell, reducible


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


# vesin 0.6's CPU cell list (vesin-0.6.2/lib/src/cpu_cell_list.cpp and types.hpp) sizes its grid
# from the atoms. Along a non-periodic direction k the grid spans d_k = 1.01 x (max - min) of the
# Cartesian coordinate k (1.01 if all are equal, at least 1 Å), along a periodic one the lattice
# plane spacing. It has trunc(d_k / cutoff) cells (at least one) per direction, each searching
# ceil(cutoff * n_k / d_k) cells (at least one) both ways, under mixed pbc every cell along a
# non-periodic direction (n_k - 1). One far atom breaks it:
# - over 1e5 cells, vesin shrinks the grid keeping its aspect ratios; a direction left with less
#   than one cell makes it divide by zero: SIGFPE, the whole process dies (ethanol with one H 1e6 Å
#   away; also a thin periodic cell 2000 x 2000 x 3 Å, no far atom needed);
# - its search visits n_k (2 m_k + 1) cells per direction, all of them visited, empty or not, and
#   under mixed pbc that grows as extent^2: a Cu(111) slab with its top atom 1e4 Å up takes 0.8 s,
#   3e4 Å 7 s, 1e5 Å minutes;
# - cell indices and shifts are int32: an atom more than ~2^31 cells along a periodic vector
#   silently loses its pairs (1e12 Å along a Cu(111) slab's a_1).
_MAX_CELLS = 1e5  # vesin's MAX_NUMBER_OF_CELLS
# Measured (2 cores, 1 thread; molecules with a far atom, slabs with an atom far above, sparse
# gases, 5e4 to 2e7 visits): 1.6-4.5 ns per visited cell; the upper end is taken.
SECONDS_PER_VISIT = 4e-9
# backend="vesin" is refused beyond this many visits, 25-40 s of searching nearly all empty cells:
# as good as hung (the slab with its atom 1e5 Å up: 2e10). A slow but finite search is left alone:
# a 4-atom structure with a 0.5 Å cutoff, 25 Å across and mixed pbc visits 1.3e9 cells in 3.3 s.
MAX_VISITS = 1e10
# int32 cell indices, with a factor 2 for the sums of shifts.
_MAX_CELL_INDEX = 2.0**30


class VesinCost(NamedTuple):
    """What vesin's cell list would make of a system, found without calling it."""

    problem: Optional[str]  # why vesin cannot compute the list (crash, overflow, minutes); None if it can
    visits: float           # cells its search would visit, all structures together (maybe an upper bound)


def vesin_cost(system: System, cutoff: float, enough: float = MAX_VISITS) -> VesinCost:
    """Model vesin's cell grid for every structure of ``system`` (see the notes above).

    Args:
        system: validated inputs.
        cutoff: Å.
        enough: the caller needs the exact visits only above this. A single structure whose atoms
            lie within the limits of :func:`_quick_limits` (remembered per cell and cutoff) is
            answered from two comparisons, with ``QUICK_VISITS`` as the bound on its visits: that
            is every molecule, cluster, crystal and slab of ordinary size. Anything else is
            modelled exactly from the atoms' extent along each axis.
    """
    host = system.host
    if host.bounds is not None and host.pbc.shape[0] == 1 and enough >= QUICK_VISITS:
        low, high = host.bounds
        size_limit, radius_limit = _quick_limits(host.cell.tobytes(), host.pbc.tobytes(), cutoff)[0]
        if 1.01 * max(high - low, 1.0) < size_limit and _SQRT3 * max(-low, high) < radius_limit:
            return VesinCost(None, QUICK_VISITS)
    lower, upper = _bounding_boxes(system)                                     # [B][3] x2
    spacings = _plane_spacings(host.cell.tobytes(), host.pbc.tobytes())       # [B][3]
    pbc = host.pbc.tolist()                                                   # [B][3]
    total, problems = 0.0, []
    for g, (low, high, spacing, periodic) in enumerate(zip(lower, upper, spacings, pbc)):
        if low[0] > high[0]:  # no atom in this structure
            continue
        sizes = [s if p else max(1.01 * (h - lo if h - lo >= 1e-6 else 1.0), 1.0)
                 for lo, h, s, p in zip(low, high, spacing, periodic)]
        radius = _SQRT3 * max(max(-lo, h) for lo, h in zip(low, high))  # no squares: 1e300 Å must not overflow
        problem, visits = _grid(sizes, periodic, cutoff, radius)
        total += visits
        if problem is not None:
            problems.append(f"structure {g}: {problem}" if len(pbc) > 1 else problem)
    return VesinCost("; ".join(problems[:3]) or None, total)


# Up to ~1 ms of vesin's search: never slower than the torch cell list (~1 ms fixed cost, see
# molnets.neighbors._TORCH_SECONDS), so a bound below it settles "auto".
QUICK_VISITS = 2.5e5
_SQRT3 = math.sqrt(3.0)


@functools.lru_cache(maxsize=64)
def _quick_limits(cell_bytes: bytes, pbc_bytes: bytes, cutoff: float) -> List[Tuple[float, float]]:
    """Per structure: (size limit, radius limit) in Å such that atoms whose largest extent along
    any axis gives a grid size d = 1.01 * max(extent, 1) below the size limit, and that all lie
    within the radius limit of the origin, make vesin visit at most QUICK_VISITS cells, without
    rescaling its grid (no crash) or overflowing its int32 cell indices.

    Along a non-periodic direction of grid size d in [1 Å, D], the cells visited, n (2 m + 1), are
    at most those at d = 1 (the most searched: m = ceil(cutoff / d)) or at d = D (the most cells,
    m = 1, or n - 1 under mixed pbc), so the n cells at D are raised until that bound fails.

    Shapes: cell [B, 3, 3], pbc [B, 3] (as bytes) -> [B] pairs
    """
    limits = []
    spacings = _plane_spacings(cell_bytes, pbc_bytes)
    for spacing, pbc in zip(spacings, np.frombuffer(pbc_bytes, dtype=np.bool_).reshape(-1, 3).tolist()):
        mixed = pbc[0] + pbc[1] + pbc[2] in (1, 2)
        num_free = 3 - (pbc[0] + pbc[1] + pbc[2])

        def visits(n: int, d: float, periodic: bool) -> int:
            return n * (2 * max(math.ceil(cutoff * n / d), n - 1 if mixed and not periodic else 1) + 1)

        cells, fixed, radius_limit = 1, 1, math.inf
        for d, periodic in zip(spacing, pbc):
            if periodic:
                n = max(int(d / cutoff), 1)
                cells, fixed = cells * n, fixed * visits(n, d, True)
                radius_limit = min(radius_limit, _MAX_CELL_INDEX * d / n)
        smallest = visits(max(int(1.0 / cutoff), 1), 1.0, False)
        largest = 0  # cells of the largest non-periodic size that passes
        for n in range(1, int(_MAX_CELLS) + 1):
            if cells * n**num_free > _MAX_CELLS or fixed * max(visits(n, n * cutoff, False), smallest) ** num_free > QUICK_VISITS:
                break
            largest = n
            if num_free == 0:
                break
        # d < (largest + 1) * cutoff, with a hair of margin against rounding in d / cutoff
        size_limit = math.inf if num_free == 0 and largest else (largest + 1) * cutoff * (1 - 1e-9) if largest else 0.0
        limits.append((size_limit, radius_limit))
    return limits


def _grid(sizes: List[float], pbc: List[bool], cutoff: float, radius: float) -> Tuple[Optional[str], float]:
    """vesin's grid for one structure of grid sizes d_k (Å) and atoms within ``radius`` Å of the
    origin: (why it fails or None, cells its search visits).

    Plain Python floats: for one small molecule this runs on every call, where a handful of numpy
    calls would cost more than vesin's own setup.
    """
    ratios = [d / cutoff for d in sizes]
    if max(ratios) == math.inf:
        return f"{_box(sizes)}: its number of cells overflows float64", math.inf
    cells = [max(int(ratio), 1) for ratio in ratios]
    if cells[0] * cells[1] * cells[2] > _MAX_CELLS:
        # vesin's own rescaling, step by step; a real value that truncates to 0 is a division by zero
        x_y, y_z = cells[0] / cells[1], cells[1] / cells[2]
        # beyond ~1e150 Å this over- or underflows, and vesin's grid would be infinite
        z = math.cbrt(_MAX_CELLS / (x_y * y_z * y_z)) if 0.0 < x_y * y_z * y_z < math.inf else 0.0
        z = z if z < math.inf else 0.0
        y = y_z * math.trunc(z)
        x = x_y * math.trunc(y)
        if min(x, y, z) < 1.0 + 1e-9:  # a hair of margin against a different rounding in C++
            return f"{_box(sizes)} and would have no cell along one direction: vesin would crash (SIGFPE)", math.inf
        cells = [math.trunc(x), math.trunc(y), math.trunc(z)]
    mixed = pbc[0] + pbc[1] + pbc[2] in (1, 2)
    visits = 1.0
    for n, d, periodic in zip(cells, sizes, pbc):
        visits *= n * (2 * max(math.ceil(cutoff * n / d), n - 1 if mixed and not periodic else 1) + 1)
    if True in pbc:
        # |fractional coordinate| <= |x| / spacing, and vesin's cell index is that times n_k
        index = max(radius / d * n for d, n, p in zip(sizes, cells, pbc) if p)
        if index >= _MAX_CELL_INDEX:
            return (
                f"an atom is up to {radius:.3g} Å from the origin, {index:.3g} of vesin's cells along a "
                "periodic lattice vector: its int32 cell indices would overflow (wrong pairs)"
            ), visits
    if visits > MAX_VISITS:
        return f"{_box(sizes)}, its search would visit {visits:.2g} cells (~{visits * SECONDS_PER_VISIT:.0f} s)", visits
    return None, visits


def _box(sizes: List[float]) -> str:
    return f"vesin's cell grid spans {sizes[0]:.3g} x {sizes[1]:.3g} x {sizes[2]:.3g} Å"


def _bounding_boxes(system: System) -> Tuple[List[List[float]], List[List[float]]]:
    """Smallest and largest Cartesian coordinates of each structure's atoms (inf, -inf: no atom).

    Shapes: -> [B][3], [B][3]
    """
    positions, cell, _, batch, _ = system
    x = positions.detach().to(CPU, torch.float64)                                  # [N, 3]
    if cell.shape[0] == 1 and x.shape[0] > 0:
        # torch's reduction along the atoms: numpy's over [N, 3] along axis 0 is ~8x slower
        low, high = torch.aminmax(x, dim=0)
        return [low.tolist()], [high.tolist()]
    index = batch.to(CPU).unsqueeze(1).expand(x.shape[0], 3)                       # [N, 3]
    lower = torch.full((cell.shape[0], 3), math.inf, dtype=torch.float64).scatter_reduce(0, index, x, "amin")
    upper = torch.full((cell.shape[0], 3), -math.inf, dtype=torch.float64).scatter_reduce(0, index, x, "amax")
    return lower.tolist(), upper.tolist()


@functools.lru_cache(maxsize=64)
def _plane_spacings(cell_bytes: bytes, pbc_bytes: bytes) -> List[List[float]]:
    """Distances between the lattice planes (Å) of the cell vesin is given (reduced, as in
    :func:`vesin_neighbor_list`), inf along non-periodic directions; remembered per cell.

    With the non-periodic vectors completed by unit vectors orthogonal to the periodic ones (as
    vesin does), spacing_k = 1 / |b_k| = 1 / sqrt((G^-1)_kk), G the Gram matrix of that basis.

    Shapes: cell [B, 3, 3], pbc [B, 3] (as bytes) -> [B][3]
    """
    cell = np.frombuffer(cell_bytes, dtype=np.float64).reshape(-1, 3, 3)         # [B, 3, 3]
    pbc = np.frombuffer(pbc_bytes, dtype=np.bool_).reshape(-1, 3)                # [B, 3]
    if reducible(cell, pbc):
        cell = reduce_cell(torch.from_numpy(cell.copy()), torch.from_numpy(pbc.copy()))[0].numpy()
    rows = cell * pbc[..., None]                                                 # [B, 3, 3]
    gram = rows @ rows.transpose(0, 2, 1)                                        # [B, 3, 3]
    gram[:, np.arange(3), np.arange(3)] += ~pbc
    spacing = 1.0 / np.sqrt(np.diagonal(np.linalg.inv(gram), axis1=1, axis2=2))  # [B, 3]
    return np.where(pbc, spacing, np.inf).tolist()
