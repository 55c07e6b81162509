"""Pure-torch cell list: O(N), any device, many structures of different cells in one call.

The linked-cell method (Allen & Tildesley, *Computer Simulation of Liquids*, 2nd ed. 2017, the
"cell structures and linked lists" method of the chapter on speeding up simulations): space is
cut into bins at least ``cutoff / q`` wide, so that the partners of an atom lie in the
``(2m + 1)^3`` bins around its own, with m = ceil(cutoff / bin width) per direction.

Bins live in fractional coordinates of a full-rank basis (:func:`complete_cell`), so any
triclinic cell works: along a periodic lattice vector a_k the distance between lattice planes is
``spacing_k = 1 / |b_k|`` (b_k the reciprocal vector), and a pair closer than the cutoff has
``|Δfrac_k| * spacing_k < cutoff``. Periodic bins wrap around (the wrap count is the image's
cell shift, which makes cells smaller than the cutoff work: many stencil offsets, many images);
non-periodic bins span the atoms' extent. Only half the stencil is searched and every pair found
is emitted in both directions, (i, j, S) and (j, i, -S).

Memory and time stay O(N) however far apart the atoms are (one atom 1e30 Å from the rest, a
molecule spread over a huge box): empty stretches wider than the cutoff along non-periodic
directions are closed up before binning (:func:`_close_gaps`), and a structure that would still
need more than ``MAX_BINS_PER_ATOM`` bins per atom gets wider bins (:func:`_coarse_width`).

All structures of a batch are binned together in one global bin index; the only loops are over
the (few) partially periodic structures in :func:`complete_cell`. Output sizes depend on the data,
so there are a handful of host synchronisations (totals of bins, stencil entries, candidates).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._geometry import MAX_WRAP, System, complete_cell, reduce_cell, unwrapped_far_atoms

# Bins are at least cutoff / BINS_PER_CUTOFF wide: 2 searches 5^3 bins of (cutoff/2)^3, a volume
# of 15.6 cutoff^3 per atom, instead of 27 cutoff^3 with bins one cutoff wide (measured faster).
BINS_PER_CUTOFF = 2
# About this many bins per atom of a structure at most (8x that in the worst case, see
# _coarse_width): a few atoms in a huge periodic box, or a sparse gas, get bins wider than
# cutoff / 2 instead of millions of empty ones. Dense matter needs ~1 (Cu, cutoff 5 Å: 0.8).
MAX_BINS_PER_ATOM = 4
# Beyond this distance (Å) from the origin along a non-periodic direction, the rounding of
# u_i - S' @ cell (|u| * 1e-16 Å) is no longer negligible: the distance test is done as
# (u_j - u_i) + S' @ cell instead.
EXACT_ORDER_BEYOND = 1e6
# Relative safety on the search radius: bins and stencils are sized for cutoff * (1 + margin), so
# that rounding at bin boundaries never loses a pair (the distance test itself is exact).
SEARCH_MARGIN = 1e-6


def cell_list_neighbor_list(system: System, cutoff: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """All (i, j, S) with |x[j] - x[i] + S @ cell| < cutoff, except i == j at S = 0.

    Args:
        system: validated positions [N, 3] (Å), cell [B, 3, 3] (Å), pbc [B, 3], batch [N].
        cutoff: radius in Å.

    Returns:
        receivers [E], senders [E], shifts [E, 3] (long), distances [E] (Å, positions' dtype).

    Shapes:
        positions [N, 3], cell [B, 3, 3], pbc [B, 3], batch [N]  ->  [E], [E], [E, 3], [E]
    """
    positions, cell, pbc, batch, _ = system
    device, dtype = positions.device, positions.dtype
    num_atoms, num_graphs = positions.shape[0], cell.shape[0]
    if num_atoms == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty.reshape(0, 3), positions.new_zeros(0)
    single = num_graphs == 1

    # Binning is done in float64 whatever the input dtype: it only decides which pairs are
    # candidates, and fractional coordinates of far-away atoms need the precision.
    # A strongly skewed cell is first reduced to short, nearly orthogonal vectors of the same
    # lattice (shifts are found in that basis and mapped back with the integer transform).
    cell64, transform = reduce_cell(cell.to(torch.float64), pbc)                      # [B, 3, 3] x2
    cell = cell64.to(dtype)                                                           # [B, 3, 3]
    basis = complete_cell(cell64, pbc)                                                # [B, 3, 3]
    inv = torch.linalg.inv(basis)                                                     # [B, 3, 3]
    x64 = positions.to(torch.float64)                                                 # [N, 3]
    frac = x64 @ inv[0] if single else torch.einsum("nx,nxy->ny", x64, inv[batch])   # [N, 3]
    atom_pbc = pbc.expand(num_atoms, 3) if single else pbc[batch]                     # [N, 3]
    # Periodic coordinates are wrapped into [0, 1); a_i remembers by how many cells, so that a
    # pair found between wrapped atoms with shift S' has S = S' + a_i - a_j.
    image = torch.where(atom_pbc, torch.floor(frac), torch.zeros_like(frac))         # [N, 3]
    # Extents before wrapping: along periodic directions they are unused by the bins, and tell
    # how many cells away the farthest atom is.
    index = batch.unsqueeze(1).expand(num_atoms, 3)
    lo, hi = _extent(frac, index, num_graphs)                                         # [B, 3] x2
    frac = frac - image                                                               # [N, 3]

    # Per structure and direction: number of bins n, width (Å, perpendicular), stencil half-width m.
    # Counted in float64 until they are known to be small: an atom 1e30 Å away asks for 4e29 bins.
    spacing = 1.0 / inv.norm(dim=-2)                                                  # [B, 3] Å
    reach = cutoff * (1.0 + SEARCH_MARGIN)
    width = torch.full((num_graphs, 1), reach / BINS_PER_CUTOFF, dtype=torch.float64, device=device)
    length = torch.where(pbc, spacing, hi - lo)                                       # [B, 3] Å
    num_bins = _bins(length, width, pbc)                                              # [B, 3]
    atoms_per_graph = torch.bincount(batch, minlength=num_graphs)                     # [B]
    limit = (MAX_BINS_PER_ATOM * atoms_per_graph).clamp(min=1).to(torch.float64)     # [B]
    bins_per_graph = num_bins.prod(-1)                                                # [B]
    crowded = bins_per_graph > limit                                                  # [B]
    magnitude = torch.maximum(lo.abs(), hi.abs())                                     # [B, 3]
    zero = torch.zeros_like(magnitude)
    # One host sync for all four: the common case (no far atom, few bins) goes straight on.
    total_bins, most_crowded, most_cells, farthest = torch.stack((
        bins_per_graph.sum(),
        (bins_per_graph - limit).max(),                  # > 0: some structure has too many bins
        torch.where(pbc, magnitude, zero).max(),         # cells away along a periodic vector
        torch.where(pbc, zero, magnitude).max(),         # Å along a non-periodic direction
    )).tolist()
    any_crowded, any_too_far = most_crowded > 0, most_cells >= MAX_WRAP
    # Atoms this far along a non-periodic direction need the distance test in its exact order,
    # (u_j - u_i) + S' @ cell (one more gather per candidate: +10-15% at 2048 atoms, so only then).
    exact_order = farthest > EXACT_ORDER_BEYOND or any_too_far
    if any_too_far:
        # Isolated far atoms keep a = 0 (their periodic coordinate stays wrapped for the binning,
        # which is all their self-images need); any other raises.
        far = unwrapped_far_atoms(frac, image, atom_pbc, batch, reach)               # [N]
        image = torch.where(far.unsqueeze(1), torch.zeros_like(image), image)        # [N, 3]
    if any_crowded:
        # Far atoms along non-periodic directions: close the empty stretches, then widen the bins
        # of structures that still need too many (a sparse gas).
        frac = torch.where(atom_pbc, frac, _close_gaps(frac, reach))                  # [N, 3]
        lo, hi = _extent(frac, index, num_graphs)                                     # [B, 3] x2
        length = torch.where(pbc, spacing, hi - lo)                                   # [B, 3] Å
        width = torch.where(crowded.unsqueeze(1), _coarse_width(length, width, limit), width)  # [B, 1]
        num_bins = _bins(length, width, pbc)                                          # [B, 3]
        total_bins = float(num_bins.prod(-1).sum())
    num_bins = num_bins.to(torch.long)                                                # [B, 3]
    total_bins = int(total_bins)
    bin_width = torch.where(pbc, spacing / num_bins, width)                           # [B, 3] Å
    # At least 1: a periodic direction of one huge bin still needs its neighbor images (S' = ±1).
    half_width = torch.ceil(reach / bin_width - 1e-9).to(torch.long).clamp(min=1)    # [B, 3]
    # Beyond the last bin of a non-periodic direction there is nothing to search.
    half_width = torch.where(pbc, half_width, torch.minimum(half_width, num_bins - 1))

    image_long = image.to(torch.long)                                                 # [N, 3]
    # Wrapped Cartesian positions u_i = x_i - a_i @ cell: the distance test uses u_j - u_i + S' @ cell,
    # which equals x_j - x_i + S @ cell (and is exactly x_j - x_i for non-periodic atoms).
    unwrap = image @ cell64[0] if single else torch.einsum("nx,nxy->ny", image, cell64[batch])
    wrapped = (x64 - unwrap).to(dtype)                                                # [N, 3]

    # Bin of every atom, and one global bin index over all structures.
    origin = torch.where(pbc, torch.zeros_like(lo), lo)                               # [B, 3]
    scale = torch.where(pbc, num_bins.to(torch.float64), 1.0 / width)                 # [B, 3]
    if single:
        atom_bin = torch.floor((frac - origin) * scale)                               # [N, 3]
    else:
        atom_bin = torch.floor((frac - origin[batch]) * scale[batch])                 # [N, 3]
    atom_num_bins = num_bins.expand(num_atoms, 3) if single else num_bins[batch]      # [N, 3]
    atom_bin = torch.minimum(atom_bin.to(torch.long).clamp(min=0), atom_num_bins - 1)  # [N, 3]
    bins_per_graph = num_bins.prod(-1)                                                # [B] long
    bin_offset = torch.cumsum(bins_per_graph, 0) - bins_per_graph                     # [B]
    global_bin = _flat_bin(atom_bin, atom_num_bins) + bin_offset[batch]               # [N]

    # Atoms sorted by bin (CSR): bin b holds sorted atoms start[b] .. start[b] + count[b] - 1.
    global_bin, order = torch.sort(global_bin)                                        # [N], [N]
    count = torch.bincount(global_bin, minlength=total_bins)                          # [bins]
    start = torch.cumsum(count, 0) - count                                            # [bins]
    graph_s = batch[order]                                                            # [N]
    bin_s = atom_bin[order]                                                           # [N, 3]
    wrapped = wrapped[order]                                                          # [N, 3]
    image_long = image_long[order]                                                    # [N, 3]

    # Half stencil per atom: offsets o with (o0, o1, o2) >= (0, 0, 0) lexicographically, i.e. the
    # flat stencil index t from the centre (K - 1) / 2 to K - 1, K = prod(2m + 1).
    side = 2 * half_width + 1                                                         # [B, 3]
    arange_n = torch.arange(num_atoms, device=device)
    if single:
        # One stencil for all atoms: entries by broadcasting, without per-entry gathers.
        stencil_size = int(side[0].prod())
        t = torch.arange((stencil_size - 1) // 2, stencil_size, device=device)        # [K/2]
        offset = _unflatten(t, side[0]) - half_width[0]                               # [K/2, 3]
        entry_atom = arange_n.repeat_interleave(t.shape[0])                           # [P]
        first = arange_n * t.shape[0]                                                 # [N]
        target = (bin_s.unsqueeze(1) + offset).reshape(-1, 3)                         # [P, 3]
        entry_graph, entry_num_bins, entry_pbc = None, num_bins[0], pbc[0]
    else:
        atom_side = side[graph_s]                                                     # [N, 3]
        stencil_size = atom_side.prod(-1)                                             # [N]
        num_half = (stencil_size + 1) // 2                                            # [N]
        first = torch.cumsum(num_half, 0) - num_half                                  # [N]
        num_entries = int(num_half.sum())
        entry_atom = torch.repeat_interleave(arange_n, num_half, output_size=num_entries)  # [P]
        t = (stencil_size[entry_atom] - 1) // 2 + torch.arange(num_entries, device=device) - first[entry_atom]
        entry_graph = graph_s[entry_atom]                                             # [P]
        offset = _unflatten(t, atom_side[entry_atom]) - half_width[entry_graph]       # [P, 3]
        target = bin_s[entry_atom] + offset                                           # [P, 3]
        entry_num_bins, entry_pbc = num_bins[entry_graph], pbc[entry_graph]           # [P, 3] x2

    # Target bin of each entry; periodic directions wrap, and the wrap count is the shift S'.
    wrap = torch.div(target, entry_num_bins, rounding_mode="floor")                   # [P, 3]
    target = target - wrap * entry_num_bins                                           # [P, 3]
    inside = (entry_pbc | (wrap == 0)).all(-1)                                        # [P]
    shift = torch.where(entry_pbc, wrap, torch.zeros_like(wrap))                      # [P, 3]
    target_bin = _flat_bin(target, entry_num_bins)                                    # [P]
    if not single:
        target_bin = target_bin + bin_offset[entry_graph]
    target_bin = torch.where(inside, target_bin, torch.zeros_like(target_bin))
    entry_count = torch.where(inside, count[target_bin], torch.zeros_like(target_bin))  # [P]
    entry_start = start[target_bin]                                                   # [P]
    # The zero offset (the first entry of each atom) pairs i only with the atoms after it in its
    # own bin, so that each pair of the same bin is found once.
    own_end = start[global_bin] + count[global_bin]                                   # [N]
    entry_count[first] = own_end - arange_n - 1
    entry_start[first] = arange_n + 1

    keep = (entry_count > 0).nonzero().squeeze(1)                                     # [P']
    entry_atom, entry_count, entry_start = entry_atom[keep], entry_count[keep], entry_start[keep]
    shift = shift[keep]                                                               # [P', 3]
    shift_vec = (
        shift.to(dtype) @ cell[0] if single else torch.einsum("px,pxy->py", shift.to(dtype), cell[entry_graph[keep]])
    )                                                                                 # [P', 3]
    centre = wrapped[entry_atom] if exact_order else wrapped[entry_atom] - shift_vec  # [P', 3]

    # Candidates: every (entry, atom of its target bin); atoms of a bin are contiguous.
    num_candidates = int(entry_count.sum())
    entry_of = torch.repeat_interleave(
        torch.arange(keep.shape[0], device=device), entry_count, output_size=num_candidates
    )                                                                                 # [C]
    base = entry_start - (torch.cumsum(entry_count, 0) - entry_count)                # [P']
    neighbor = base[entry_of] + torch.arange(num_candidates, device=device)          # [C]
    vectors = wrapped[neighbor] - centre[entry_of]                                    # [C, 3]
    if exact_order:
        # u_i - S' @ cell would round to u_i for an atom 1e30 Å away, whose periodic self-images
        # would then seem to sit on top of it.
        vectors += shift_vec[entry_of]                                                # [C, 3]
    sq_distances = (vectors * vectors).sum(-1)                                        # [C]
    found = (sq_distances < cutoff * cutoff).nonzero().squeeze(1)                     # [E/2]

    entry_of = entry_of[found]
    receivers_s, senders_s = entry_atom[entry_of], neighbor[found]                    # [E/2]
    shifts = shift[entry_of] + image_long[receivers_s] - image_long[senders_s]        # [E/2, 3]
    distances = sq_distances[found].sqrt()                                            # [E/2]
    receivers, senders = order[receivers_s], order[senders_s]
    if bool((transform != torch.eye(3, dtype=torch.long, device=device)).any()):
        edge_transform = transform[0] if single else transform[batch[receivers]]     # [3, 3] or [E/2, 3, 3]
        shifts = (shifts.unsqueeze(-1) * edge_transform).sum(-2)                      # [E/2, 3]
    return (
        torch.cat((receivers, senders)),
        torch.cat((senders, receivers)),
        torch.cat((shifts, -shifts)),
        torch.cat((distances, distances)),
    )


def _extent(frac: Tensor, index: Tensor, num_graphs: int) -> Tuple[Tensor, Tensor]:
    """Smallest and largest fractional coordinate of each structure's atoms.

    Shapes: frac [N, 3], index [N, 3] (structure of each atom, repeated) -> [B, 3], [B, 3]
    """
    lo = frac.new_zeros(num_graphs, 3).scatter_reduce(0, index, frac, "amin", include_self=False)
    hi = frac.new_zeros(num_graphs, 3).scatter_reduce(0, index, frac, "amax", include_self=False)
    return lo, hi


def _bins(length: Tensor, width: Tensor, pbc: Tensor) -> Tensor:
    """Bins per direction: periodic ones tile the cell (at least one, each at least ``width``
    wide), non-periodic ones cover the atoms' extent ``length``. float64, whole numbers: the
    caller converts to long once the counts are known to be small.

    Shapes: length [B, 3], width [B, 1], pbc [B, 3] -> [B, 3]
    """
    ratio = torch.floor(length / width)
    return torch.where(pbc, ratio.clamp(min=1), ratio + 1)


def _close_gaps(frac: Tensor, reach: float) -> Tensor:
    """Shrink every empty stretch wider than ``reach`` (Å) between the atoms' coordinates along
    each direction to ``reach``.

    Two atoms closer than the cutoff along a direction have no such stretch between them, so
    their coordinate difference is kept (up to rounding far below SEARCH_MARGIN: coordinates are
    rebuilt as sums of the kept differences, which stay small); two atoms across a stretch stay at
    least ``reach`` apart. The cell list then finds the same candidate pairs within an extent of
    at most N * reach, however far apart the atoms were. Only the binning uses these coordinates;
    distances come from the true positions. Meant for non-periodic directions (Cartesian lengths
    along orthonormal vectors); all atoms of all structures are closed up together, which keeps
    each structure's small differences just the same.

    Shapes: frac [N, 3] -> [N, 3]
    """
    values, order = torch.sort(frac, dim=0)                                           # [N, 3] x2
    gaps = values.diff(dim=0)                                                         # [N-1, 3]
    steps = torch.where(gaps > reach, torch.full_like(gaps, reach), gaps)            # [N-1, 3]
    closed = torch.cat((values.new_zeros(1, 3), torch.cumsum(steps, 0)))             # [N, 3]
    return torch.empty_like(closed).scatter_(0, order, closed)                        # [N, 3]


def _coarse_width(length: Tensor, width: Tensor, limit: Tensor) -> Tensor:
    """Bin width (Å) that brings a structure's bins to about ``limit``, at least ``width``.

    Water-filling: directions shorter than the width get one bin (two if non-periodic), the others
    share ``limit`` bins in proportion to their length, w = (prod_long length / limit)^(1 / #long).
    Each round can only drop directions from the long ones, so three rounds settle it. With the
    flooring and the extra non-periodic bin, the count is at most 2^3 * limit.

    Shapes: length [B, 3], width [B, 1], limit [B] -> [B, 1]
    """
    w = width.squeeze(1)                                                              # [B]
    for _ in range(3):
        long_ = length > w.unsqueeze(1)                                               # [B, 3]
        log_length = torch.where(long_, length, torch.ones_like(length)).log()        # [B, 3]
        num_long = long_.sum(-1).clamp(min=1)                                         # [B]
        w = torch.maximum(w, ((log_length.sum(-1) - limit.log()) / num_long).exp())  # [B]
    return w.unsqueeze(1)


def _flat_bin(bins: Tensor, num_bins: Tensor) -> Tensor:
    """Row-major flat index of 3-d bin indices. Shapes: [M, 3], [M, 3] or [3] -> [M]."""
    return (bins[:, 0] * num_bins[..., 1] + bins[:, 1]) * num_bins[..., 2] + bins[:, 2]


def _unflatten(t: Tensor, side: Tensor) -> Tensor:
    """Row-major 3-d index (from 0) of flat stencil indices. Shapes: [M], [M, 3] or [3] -> [M, 3]."""
    return torch.stack((t // (side[..., 1] * side[..., 2]), (t // side[..., 2]) % side[..., 1], t % side[..., 2]), 1)
