"""Pairs of a symmetric neighbor list: one directed edge per unordered pair {i, j}.

A neighbor list holds both (i, j, S) and (j, i, -S). Anything that depends on |r_ij| only
(radial bases, filter networks) is the same for both directions, so a model can compute it on
one edge of each pair (half of the edges) and send the pair's message both ways. SchNet- and
TensorNet-style models use this to halve their dominant cost (dense layers per edge).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["half_edges"]


def half_edges(receivers: Tensor, senders: Tensor, shifts: Tensor, num_atoms: int) -> Tensor:
    """One edge of each pair {(i, j, S), (j, i, -S)} of a symmetric neighbor list, by sorting.

    Every edge gets a key that is the same for both directions of its pair; after a stable
    sort the two directions are adjacent and the even positions pick one of each. Shapes stay
    static (P = E // 2), so this compiles and exports; it needs the neighbor list to be
    symmetric, which ``molnets.neighbor_list`` guarantees (checked in eager mode).

    Shapes:
        receivers [E], senders [E], shifts [E, 3], num_atoms = N  ->  edge indices [P], P = E // 2
    """
    num_edges = receivers.shape[0]
    lo, hi = torch.minimum(receivers, senders), torch.maximum(receivers, senders)     # [E]
    # The shift of the direction with receivers < senders (or the lexicographically
    # larger of S, -S for an atom and its own image) names the pair.
    flip = (receivers > senders) | ((receivers == senders) & _lex_negative(shifts))   # [E]
    pair_shift = torch.where(flip[:, None], -shifts, shifts).clamp(-511, 511) + 512   # [E, 3]
    shift_key = (pair_shift[:, 0] * 1024 + pair_shift[:, 1]) * 1024 + pair_shift[:, 2]  # [E]
    atom_key = lo * num_atoms + hi                                                     # [E]
    # Lexicographic sort on (atom_key, shift_key) as two stable sorts: no int64 overflow.
    by_shift = torch.sort(shift_key, stable=True).indices                             # [E]
    order = by_shift[torch.sort(atom_key[by_shift], stable=True).indices]             # [E]
    if not torch.compiler.is_compiling():
        first, second = order[0 : num_edges - 1 : 2], order[1::2]
        paired = (atom_key[first] == atom_key[second]) & (shift_key[first] == shift_key[second])
        if num_edges % 2 or not bool(paired.all()):
            raise ValueError("half_edges needs a symmetric neighbor list: every (i, j, S) with its (j, i, -S)")
    return order[0::2]                                                                # [P]


def _lex_negative(shifts: Tensor) -> Tensor:
    """Whether the first nonzero component of each integer shift is negative. [E, 3] -> [E]"""
    sign = torch.sign(shifts)                                                          # [E, 3]
    first = torch.where(sign[:, 0] != 0, sign[:, 0], torch.where(sign[:, 1] != 0, sign[:, 1], sign[:, 2]))
    return first < 0
