"""Pairs of a symmetric neighbor list: one directed edge per unordered pair {i, j}.

A neighbor list holds both (i, j, S) and (j, i, -S). Anything that depends on |r_ij| only
(radial bases, filter networks) is the same for both directions, so a model can compute it on
one edge of each pair (half of the edges) and send the pair's message both ways. SchNet- and
TensorNet-style models use this to halve their dominant cost (dense layers per edge), and
``pair_convolution`` sends the messages.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._message_kernels import PairConvolution, kernel_applies, spread_over_rows
from .scatter import scatter_sum

__all__ = ["half_edges", "pair_convolution"]


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
    order = by_shift.index_select(0, torch.sort(atom_key.index_select(0, by_shift), stable=True).indices)  # [E]
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


def pair_convolution(weights: Tensor, node_feats: Tensor, pair_i: Tensor, pair_j: Tensor,
                     parts: Optional[Sequence[Tuple[int, int]]] = None) -> Tensor:
    """Continuous-filter convolution over pairs, each pair's message sent both ways.

        out_i = Σ_{pairs {i, j}} w_ij ∘ x_j      (and out_j gets w_ij ∘ x_i from the same pair)

    the interaction of SchNet (Schütt et al. 2018, Eq. 5: x_j ∘ W(r_ij)) and of TensorNet
    (Simeon & De Fabritiis 2023, Eq. 8: f_I I_j + f_A A_j + f_S S_j) on one edge per pair. The
    rows n of x are split into K parts (rows a..b-1 of part k, e.g. the components of I, A and S)
    and each part is scaled by its own filter w_ij[k] (C numbers).

    On the CPU in eager mode a fused kernel (``_message_kernels``) computes the same
    numbers without the per-pair messages [P, n, C] in memory, and its backward too (differentiable
    twice), when the messages exceed one chunk (``_message_kernels.kernel_applies``; shapes
    only). Otherwise, and under ``torch.compile`` and on other devices, the plain operations run:
    ``scatter_sum(w * x[j], i) + scatter_sum(w * x[i], j)``, w spread over the rows of its part.

    Args:
        weights: filters w [P, K, C], one per pair and part.
        node_feats: x [N, n, C].
        pair_i, pair_j: the atoms of each pair [P] (``half_edge_graph``).
        parts: K slices (a, b) of the n rows, contiguous and covering them; default one part.

    Shapes:
        weights [P, K, C], node_feats [N, n, C], pair_i [P], pair_j [P]  ->  [N, n, C]

    >>> x = torch.tensor([[[1.0]], [[2.0]], [[4.0]]])                     # 3 atoms, n = C = 1
    >>> w = torch.tensor([[[10.0]], [[100.0]]])                            # pairs {0, 1}, {1, 2}
    >>> pair_convolution(w, x, torch.tensor([0, 1]), torch.tensor([1, 2])).flatten()
    tensor([ 20., 410., 200.])
    """
    parts = tuple(parts) if parts is not None else ((0, node_feats.shape[1]),)
    if kernel_applies(pair_i.shape[0], node_feats.shape[1] * node_feats.shape[2], node_feats):
        return PairConvolution.apply(weights, node_feats, pair_i, pair_j, parts)
    return _pair_convolution_reference(weights, node_feats, pair_i, pair_j, parts)


def _pair_convolution_reference(weights: Tensor, node_feats: Tensor, pair_i: Tensor, pair_j: Tensor,
                                parts: Sequence[Tuple[int, int]]) -> Tensor:
    """``pair_convolution`` in differentiable torch operations: the oracle of the kernel."""
    num_atoms = node_feats.shape[0]
    w = spread_over_rows(weights, parts)                                             # [P, n or 1, C]
    to_i = scatter_sum(w * node_feats.index_select(0, pair_j), pair_i, dim_size=num_atoms)  # [N, n, C]
    return to_i + scatter_sum(w * node_feats.index_select(0, pair_i), pair_j, dim_size=num_atoms)
