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
from .scatter import gather_rows, scatter_sum

__all__ = ["half_edges", "pair_convolution"]


def half_edges(receivers: Tensor, senders: Tensor, shifts: Tensor) -> Tensor:
    """One edge of each pair {(i, j, S), (j, i, -S)} of a symmetric neighbor list.

    The kept direction of a pair is the one with i < j (for an atom and its own image, i = j,
    the one whose shift S is lexicographically positive); one stable sort on that flag puts
    the P = E // 2 kept edges first, in their original order. Shapes stay static, so this
    compiles and exports. It needs the neighbor list to be symmetric, which
    ``molnets.neighbor_list`` guarantees; eager mode checks it: exactly half the edges are
    kept, and the kept and the other edges carry the same multiset of pair keys (i, j, S) up
    to direction, compared by count and by the wrapping sum of a 64-bit mix of the key (an
    asymmetric list passes only by a hash collision, odds ~2^-64).

    Shapes:
        receivers [E], senders [E], shifts [E, 3]  ->  edge indices [P], P = E // 2
    """
    num_edges = receivers.shape[0]
    # For |S| < 2^20 per component the sign of this weighted sum is that of S's first nonzero
    # component, and the sum names S uniquely.
    shift_key = shifts[:, 0] * (1 << 42) + shifts[:, 1] * (1 << 21) + shifts[:, 2]     # [E]
    flip = (receivers > senders) | ((receivers == senders) & (shift_key < 0))          # [E]
    order = torch.sort(flip.to(torch.uint8), stable=True).indices                       # [E]
    if not torch.compiler.is_compiling():
        _check_symmetric(receivers, senders, shifts, shift_key, flip)
    return order[: num_edges // 2]                                                     # [P]


def _check_symmetric(receivers: Tensor, senders: Tensor, shifts: Tensor, shift_key: Tensor, flip: Tensor) -> None:
    """Raise unless every (i, j, S) has its (j, i, -S) (see ``half_edges``). Eager only."""
    sign = 1 - 2 * flip.to(torch.long)                                                 # [E]: +1 kept, -1 other
    # (i + j, i j, sign S) names the unordered pair; mixed into 64 bits with wrapping products
    mixed = ((receivers + senders) * -7046029254386353131 + receivers * senders * 1609587929392839161
             + sign * shift_key * -4658895280553007687)                                # [E]
    mixed = mixed ^ (mixed >> 29)                                                      # [E]
    bad = (sign.sum() != 0) | ((sign * mixed).sum() != 0) | (shifts.abs() >= 1 << 20).any()
    if receivers.shape[0] % 2 or bool(bad):
        raise ValueError("half_edges needs a symmetric neighbor list: every (i, j, S) with its (j, i, -S)"
                         " (and cell shifts below 2^20)")


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
    """``pair_convolution`` in differentiable torch operations: the oracle of the kernel. Both
    directions in one gather, one product and one scatter (rows [P:] are the messages to j)."""
    num_atoms, num_pairs = node_feats.shape[0], pair_i.shape[0]
    w = spread_over_rows(weights, parts)                                             # [P, n or 1, C]
    sources = gather_rows(node_feats, torch.cat([pair_j, pair_i]))                   # [2P, n, C]
    messages = sources.view((2, num_pairs) + sources.shape[1:]) * w                  # [2, P, n, C]
    return scatter_sum(messages.flatten(0, 1), torch.cat([pair_i, pair_j]), dim_size=num_atoms)  # [N, n, C]
