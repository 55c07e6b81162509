"""Fused forward/backward of the three message scatters on the CPU (private kernels).

Each computes the same numbers as its reference (``pairs.pair_convolution``,
``scatter.scatter_outer``, ``atomic_basis_messages`` below) without materializing the per-edge
messages [E, n, C], the largest tensors of the SchNet-, TensorNet- and MACE-style models on
crystals, whose writing and reading at full size was most of their time: edges are processed in
cache-sized chunks, each message block built in one small reused buffer and added into the
output.

Pair convolution, w_p spread over the rows of its part:

    out[i_p] += w_p ∘ x[j_p],   out[j_p] += w_p ∘ x[i_p].

Linear in x with a symmetric pattern (each pair sends the same weights both ways), so with the
output gradient g

    dx = pair_convolution(w, g),   dw_p[k] = Σ_{rows n of part k} g[i_p, n] x[j_p, n] + g[j_p, n] x[i_p, n].

Scatter of outer products, out[r_e, n, c] += u_e[n] w_e[part(n), c], with G_e = g[r_e]:

    du_e[n] = Σ_c G_e[n, c] w_e[part(n), c],   dw_e[k] = Σ_{rows n of part k} u_e[n] G_e[n].

Without a graph of the backward, the gradients are computed chunk by chunk in one pass. With
one (create_graph: training on forces) they are autograd nodes computed chunk by chunk too, whose
own gradients are again these kernels, so no per-edge array is built at any order: dx of the
convolution is the convolution again, its dw ``PairWeightGradient`` (gradients: convolutions),
the scatter's du and dw ``ScatterOuterGradients`` (scatters and itself), the atomic basis'
gradients ``AtomicBasisGradients`` (messages and itself).

Also here, for frozen models: the atomic basis with K = Y coupling formed chunk by chunk too and
the radial weights read from one [P, paths, C] array (``FrozenAtomicBasis``: neither K, nor the
per-irrep radial weights, nor their gradients exist at full size); on large systems the filter
networks W = σ(network(e)) u chunk by chunk of edges (``FrozenFilter``, behind
``mlp.radial_filter``), whose backward recomputes each chunk instead of keeping every hidden
activation of every edge.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._frozen import frozen_on_cpu_eager, reference_gradients
from ..memory import freed_memory_is_reused

# numbers per thread in the largest [chunk, n, C] buffer (1 MiB in float32): stays in cache
# between the gather that writes it and the product and index_add that read it
CHUNK_NUMEL = 1 << 18


# messages of at least this many bytes take the kernels even within one chunk. A/B, training
# steps (where the kernels' backward is chunked to every order): SchNet-style 16 aspirins
# (2400 pairs, 1.2 MB in float32) 1.17x best call, TensorNet-style aspirin float64 (1.4 MB)
# 1.01x best / 1.07x median; inference of the 16 aspirins (SchNet-style) 1.04x / 1.14x
KERNEL_MIN_BYTES = 1 << 20


def kernel_applies(num_edges: int, message_numel: int, like: Tensor, min_bytes: float = KERNEL_MIN_BYTES) -> bool:
    """Whether the chunked kernels run for num_edges messages of n C numbers each: eager on
    the CPU with more than one chunk of messages or at least ``min_bytes`` of them. Otherwise
    the references: compiled (the compiler fuses them itself), on other devices (which want few
    large kernels), or for small messages (a small molecule: the kernel's Python costs more
    there). The choice depends on shapes only."""
    return (not torch.compiler.is_compiling() and like.device.type == "cpu"
            and (num_edges > _chunk_size(message_numel)
                 or num_edges * message_numel * like.element_size() >= min_bytes))


def spread_over_rows(weights: Tensor, parts: Sequence[Tuple[int, int]]) -> Tensor:
    """weights[:, part(n)] for every row n: [E, K, C] -> [E, n, C] (a view for one part). An
    index_select, whose backward is an index_add (indexing with a list would accumulate with
    index_put, several times slower). Compiled, each part's column expanded and concatenated:
    its backward is a sum, where the compiler would turn the index_add into atomic adds."""
    if len(parts) == 1:
        return weights                                                              # [E, 1, C]
    if torch.compiler.is_compiling():
        return torch.cat([weights[:, k:k + 1].expand(-1, b - a, -1) for k, (a, b) in enumerate(parts)], dim=1)
    return weights.index_select(1, _part_of_row(parts, weights.device))              # [E, n, C]


def sum_parts(rows: Tensor, parts: Sequence[Tuple[int, int]], out: Optional[Tensor] = None) -> Tensor:
    """Σ over the rows of each part, the adjoint of ``spread_over_rows``: one index_add over the
    row axis (1.3-2x faster than a sum per part at [150-300, 9, 128]); differentiable, or into
    ``out`` (overwritten). Used by the kernels (eager).

    Shapes:
        rows [..., n, C]  ->  [..., K, C]
    """
    out = rows.new_zeros(rows.shape[:-2] + (len(parts), rows.shape[-1])) if out is None else out.zero_()
    index = _part_of_row(parts, rows.device)                                        # [n]
    return out.index_add_(-2, index, rows)


_PART_OF_ROW: Dict[Tuple[Tuple[Tuple[int, int], ...], torch.device], Tensor] = {}


def _part_of_row(parts: Sequence[Tuple[int, int]], device: torch.device) -> Tensor:
    """The part k of every row n, [n] (long), kept per parts and device."""
    key = (tuple((int(a), int(b)) for a, b in parts), torch.device(device))
    index = _PART_OF_ROW.get(key)
    if index is None:
        with torch.inference_mode(False):  # usable outside inference mode (saved for a backward)
            index = _PART_OF_ROW[key] = torch.tensor(
                [k for k, (a, b) in enumerate(key[0]) for _ in range(a, b)], device=device)
    return index


def _chunk_size(message_numel: int) -> int:
    """Edges per chunk for messages of n C numbers each."""
    return max(1, CHUNK_NUMEL * torch.get_num_threads() // max(message_numel, 1))


def scale_parts(rows: Tensor, weights: Tensor, parts: Sequence[Tuple[int, int]],
                out: Optional[Tensor] = None) -> Tensor:
    """out[..., a:b, :] = rows[..., a:b, :] * weights[..., k, :] for part k = (a, b): each part's
    filter on its rows, slice by slice, never spread over the n rows first (a [.., n, C] tensor
    written and read again). In place when ``out`` is None (or is ``rows``).

    Shapes:
        rows [..., n, C or 1], weights [..., K, C], broadcastable to out [..., n, C]  ->  out
    """
    out = rows if out is None else out
    for k, (start, stop) in enumerate(parts):
        torch.mul(rows[..., start:stop, :], weights[..., k:k + 1, :], out=out[..., start:stop, :])
    return out


def forward_chunked(weights: Tensor, x: Tensor, pair_i: Tensor, pair_j: Tensor,
                    parts: Sequence[Tuple[int, int]]) -> Tensor:
    """The convolution chunk by chunk of pairs (module docstring). -> [N, n, C]"""
    num_pairs = pair_i.shape[0]
    out = torch.zeros_like(x)                                                        # [N, n, C]
    chunk = _chunk_size(x.shape[1] * x.shape[2])
    buffer = x.new_empty((min(chunk, num_pairs),) + x.shape[1:])                     # [p, n, C]
    for start in range(0, num_pairs, chunk):
        stop = min(start + chunk, num_pairs)
        i, j, w = pair_i[start:stop], pair_j[start:stop], weights[start:stop]
        messages = buffer[:stop - start]                                             # [p, n, C]
        for source, target in ((j, i), (i, j)):
            torch.index_select(x, 0, source, out=messages)
            scale_parts(messages, w, parts)
            out.index_add_(0, target, messages)
    return out


def backward_chunked(grad_out: Tensor, weights: Tensor, x: Tensor, pair_i: Tensor, pair_j: Tensor,
                     parts: Sequence[Tuple[int, int]], need_weights: bool, need_x: bool
                     ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(dweights, dx) in one pass over chunks of pairs, no graph (module docstring)."""
    num_pairs = pair_i.shape[0]
    grad_w = torch.empty_like(weights) if need_weights else None                    # [P, K, C]
    grad_x = torch.zeros_like(x) if need_x else None                                # [N, n, C]
    chunk = _chunk_size(x.shape[1] * x.shape[2])
    shape = (min(chunk, num_pairs),) + x.shape[1:]
    g_i, g_j, x_i, x_j = (x.new_empty(shape) for _ in range(4))                     # [p, n, C]
    for start in range(0, num_pairs, chunk):
        stop = min(start + chunk, num_pairs)
        p = stop - start
        i, j, w = pair_i[start:stop], pair_j[start:stop], weights[start:stop]
        gi, gj = torch.index_select(grad_out, 0, i, out=g_i[:p]), torch.index_select(grad_out, 0, j, out=g_j[:p])
        if grad_w is not None:
            xi, xj = torch.index_select(x, 0, i, out=x_i[:p]), torch.index_select(x, 0, j, out=x_j[:p])
            sum_parts(xj.mul_(gi).addcmul_(gj, xi), parts, out=grad_w[start:stop])   # [p, K, C]
        if grad_x is not None:
            scale_parts(gj, w, parts)
            grad_x.index_add_(0, i, gj)
            scale_parts(gi, w, parts)
            grad_x.index_add_(0, j, gi)
    return grad_w, grad_x


class PairWeightGradient(torch.autograd.Function):
    """dw of the pair convolution (module docstring) chunk by chunk, for a backward that must
    itself be differentiable (training on forces). dw is bilinear in g and x and each pair acts
    the same way in both directions, so with h = ∂L/∂dw [P, K, C]

        ∂L/∂g = pair_convolution(h, x),   ∂L/∂x = pair_convolution(h, g):

    two more chunked convolutions, and no per-pair [P, n, C] array is built at any order.
    ``weights`` gives dw's shape only (it gets no gradient here).

    Shapes:
        grad_out [N, n, C], x [N, n, C], weights [P, K, C], pair_i [P], pair_j [P]  ->  [P, K, C]
    """

    @staticmethod
    def forward(grad_out: Tensor, x: Tensor, weights: Tensor, pair_i: Tensor, pair_j: Tensor,
                parts: Sequence[Tuple[int, int]]) -> Tensor:
        return backward_chunked(grad_out.contiguous(), weights, x, pair_i, pair_j, parts, True, False)[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        grad_out, x, _, pair_i, pair_j, parts = inputs
        ctx.save_for_backward(grad_out, x, pair_i, pair_j)
        ctx.parts = parts

    @staticmethod
    def backward(ctx: Any, h: Tensor) -> Tuple[Optional[Tensor], ...]:
        grad_out, x, pair_i, pair_j = ctx.saved_tensors
        need_grad_out, need_x = ctx.needs_input_grad[:2]
        grad_grad_out = PairConvolution.apply(h, x, pair_i, pair_j, ctx.parts) if need_grad_out else None
        grad_x = PairConvolution.apply(h, grad_out, pair_i, pair_j, ctx.parts) if need_x else None
        return grad_grad_out, grad_x, None, None, None, None


class PairConvolution(torch.autograd.Function):
    """``pairs.pair_convolution`` with the chunked forward and backward of the module docstring."""

    @staticmethod
    def forward(weights: Tensor, x: Tensor, pair_i: Tensor, pair_j: Tensor,
                parts: Sequence[Tuple[int, int]]) -> Tensor:
        return forward_chunked(weights, x, pair_i, pair_j, parts)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        weights, x, pair_i, pair_j, parts = inputs
        ctx.save_for_backward(weights, x, pair_i, pair_j)
        ctx.parts = parts

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        weights, x, pair_i, pair_j = ctx.saved_tensors
        need_weights, need_x = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # a graph of the backward is wanted
            grad_w = (PairWeightGradient.apply(grad_out, x, weights, pair_i, pair_j, ctx.parts)
                      if need_weights else None)
            grad_x = PairConvolution.apply(weights, grad_out, pair_i, pair_j, ctx.parts) if need_x else None
        else:
            grad_w, grad_x = backward_chunked(grad_out.contiguous(), weights, x, pair_i, pair_j, ctx.parts,
                                              need_weights, need_x)
        return grad_w, grad_x, None, None, None


def scatter_outer_chunked(u: Tensor, weights: Tensor, index: Tensor, dim_size: int,
                          parts: Sequence[Tuple[int, int]]) -> Tensor:
    """out[r_e] += u_e ⊗ w_e part by part, chunk by chunk of edges (module docstring). -> [N, n, C]"""
    num_edges, n, C = u.shape[0], u.shape[1], weights.shape[2]
    out = u.new_zeros(dim_size, n, C)                                               # [N, n, C]
    chunk = _chunk_size(n * C)
    buffer = u.new_empty(min(chunk, num_edges), n, C)                               # [p, n, C]
    for start in range(0, num_edges, chunk):
        stop = min(start + chunk, num_edges)
        messages, u_c, w_c = buffer[:stop - start], u[start:stop], weights[start:stop]
        for k, (a, b) in enumerate(parts):
            torch.mul(u_c[:, a:b, None], w_c[:, k:k + 1], out=messages[:, a:b])
        out.index_add_(0, index[start:stop], messages)
    return out


def _outer_grads(G: Tensor, u: Tensor, weights: Tensor, parts: Sequence[Tuple[int, int]], need_u: bool,
                 need_weights: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(du, dweights) from the gathered output gradient G [E, n, C] (module docstring)."""
    grad_u = torch.cat([(G[:, a:b] * weights[:, k:k + 1]).sum(-1)
                        for k, (a, b) in enumerate(parts)], dim=1) if need_u else None       # [E, n]
    grad_w = sum_parts(G * u[:, :, None], parts) if need_weights else None                  # [E, K, C]
    return grad_u, grad_w


def scatter_outer_backward(grad_out: Tensor, u: Tensor, weights: Tensor, index: Tensor,
                           parts: Sequence[Tuple[int, int]], need_u: bool, need_weights: bool
                           ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(du, dweights) of the module docstring chunk by chunk, no graph."""
    num_edges = u.shape[0]
    grad_u = torch.empty_like(u) if need_u else None                                 # [E, n]
    grad_w = torch.empty_like(weights) if need_weights else None                     # [E, K, C]
    chunk = _chunk_size(grad_out.shape[1] * grad_out.shape[2])
    buffer = grad_out.new_empty((min(chunk, num_edges),) + grad_out.shape[1:])       # [p, n, C]
    for start in range(0, num_edges, chunk):
        stop = min(start + chunk, num_edges)
        G = torch.index_select(grad_out, 0, index[start:stop], out=buffer[:stop - start])  # [p, n, C]
        du, dw = _outer_grads(G, u[start:stop], weights[start:stop], parts, need_u, need_weights)
        if grad_u is not None:
            grad_u[start:stop] = du
        if grad_w is not None:
            grad_w[start:stop] = dw
    return grad_u, grad_w


class ScatterOuter(torch.autograd.Function):
    """``scatter.scatter_outer`` with the chunked forward and backward of the module docstring."""

    @staticmethod
    def forward(u: Tensor, weights: Tensor, index: Tensor, dim_size: int,
                parts: Sequence[Tuple[int, int]]) -> Tensor:
        return scatter_outer_chunked(u, weights, index, dim_size, parts)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        u, weights, index, _, parts = inputs
        ctx.save_for_backward(u, weights, index)
        ctx.parts = parts

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        u, weights, index = ctx.saved_tensors
        need_u, need_weights = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # a graph of the backward is wanted
            grad_u, grad_w = ScatterOuterGradients.apply(grad_out, u, weights, index, ctx.parts)
            return grad_u if need_u else None, grad_w if need_weights else None, None, None, None
        grad_u, grad_w = scatter_outer_backward(grad_out.contiguous(), u, weights, index, ctx.parts,
                                                need_u, need_weights)
        return grad_u, grad_w, None, None, None


class ScatterOuterGradients(torch.autograd.Function):
    """(du, dweights) of the scatter of outer products (module docstring) chunk by chunk, for a
    backward that must itself be differentiable (training on forces). du is bilinear in (g, w)
    and dw in (g, u), so with a = ∂L/∂du [E, n] and b = ∂L/∂dw [E, K, C]

        ∂L/∂g = scatter_outer(a, w) + scatter_outer(u, b),   (∂L/∂u, ∂L/∂w) = (du, dw) of (g, a, b):

    chunked scatters and this node again, and no per-edge [E, n, C] array is built at any order.

    Shapes:
        grad_out [N, n, C], u [E, n], weights [E, K, C], index [E]  ->  ([E, n], [E, K, C])
    """

    @staticmethod
    def forward(grad_out: Tensor, u: Tensor, weights: Tensor, index: Tensor,
                parts: Sequence[Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
        return scatter_outer_backward(grad_out.contiguous(), u, weights, index, parts, True, True)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
        grad_out, u, weights, index, parts = inputs
        ctx.save_for_backward(grad_out, u, weights, index)
        ctx.parts = parts

    @staticmethod
    def backward(ctx: Any, grad_du: Tensor, grad_dw: Tensor) -> Tuple[Optional[Tensor], ...]:
        grad_out, u, weights, index = ctx.saved_tensors
        need_grad_out, need_u, need_weights = ctx.needs_input_grad[:3]
        num_atoms = grad_out.shape[0]
        grad_grad_out = (ScatterOuter.apply(grad_du, weights, index, num_atoms, ctx.parts)
                         + ScatterOuter.apply(u, grad_dw, index, num_atoms, ctx.parts)) if need_grad_out else None
        grad_u, grad_w = (ScatterOuterGradients.apply(grad_out, grad_du, grad_dw, index, ctx.parts)
                          if need_u or need_weights else (None, None))
        return grad_grad_out, grad_u, grad_w, None, None


# ---------------------------------------------------------------- ACE atomic basis messages


def atomic_basis_messages(K: Tensor, senders: Tensor, receivers: Tensor, num_atoms: int,
                          radial: Sequence[Tensor], node_feats: Sequence[Tensor]) -> Tensor:
    """Σ_{e: receivers[e] = i} K_e X_e, X_e = [R_b(pair of e) ∘ W h_b(senders[e])]_b, the reference.

    Edges e and e + P are the two directions of pair e (``PairAtomicBasis``); per input irrep b
    the radial weights R_b [P, n_b, C] of its n_b paths multiply its node features
    Wh_b [N, 2 l_b + 1, C] of the sender, giving rows (path, m) of X.

    Shapes:
        K [E, M, rows], senders [E], receivers [E], radial R_b [P, n_b, C],
        node_feats Wh_b [N, d_b, C] (rows = Σ_b n_b d_b)  ->  [N, M, C]
    """
    from .scatter import gather_rows, scatter_sum  # (scatter.py imports this module)

    num_pairs = K.shape[0] // 2
    messages, row = None, 0
    for R_b, Wh in zip(radial, node_feats):
        n_b, (dim, C) = R_b.shape[1], Wh.shape[1:]
        Wh_j = gather_rows(Wh, senders).reshape(2, num_pairs, 1, dim, C)               # [2, P, 1, d_b, C]
        # explicit expand: the backward then reduces over the outermost axis (halves) first
        R_e = R_b.unsqueeze(2).expand(num_pairs, n_b, dim, C)                          # [P, n_b, d_b, C]
        X = (R_e * Wh_j).reshape(2 * num_pairs, n_b * dim, C)                          # [E, n_b d_b, C]
        K_b = K[:, :, row:row + n_b * dim]                                             # [E, M, n_b d_b]
        messages = torch.bmm(K_b, X) if messages is None else torch.baddbmm(messages, K_b, X)  # [E, M, C]
        row += n_b * dim
    return scatter_sum(messages, receivers, num_atoms)                                 # [N, M, C]


def _fill_rows(X: Tensor, radial: Sequence[Tensor], node_feats: Sequence[Tensor], senders: Tensor,
               start: int, stop: int) -> None:
    """X[p, (b, path, m), c] = R_b[start + p, path, c] Wh_b[senders[p], m, c], in place. X [p, rows, C]"""
    row, p = 0, stop - start
    for R_b, Wh in zip(radial, node_feats):
        n_b, (dim, C) = R_b.shape[1], Wh.shape[1:]
        Wh_j = Wh.index_select(0, senders)                                             # [p, d_b, C]
        torch.mul(R_b[start:stop, :, None], Wh_j[:, None], out=X[:, row:row + n_b * dim].view(p, n_b, dim, C))
        row += n_b * dim


def _atomic_basis_message_numel(num_components: int, num_rows: int, num_channels: int) -> int:
    """Numbers per edge of the largest per-edge block (X [rows, C] or the message [M, C])."""
    return max(num_components, num_rows) * num_channels


def _atomic_basis_chunks(num_pairs: int, num_components: int, num_rows: int, num_channels: int) -> Tuple[int, int]:
    """(chunk, buffer size) for the chunked atomic basis: pairs per chunk, numbers per buffer."""
    numel = _atomic_basis_message_numel(num_components, num_rows, num_channels)
    chunk = _chunk_size(numel)
    return chunk, min(chunk, num_pairs) * numel


def atomic_basis(K: Tensor, senders: Tensor, receivers: Tensor, num_atoms: int,
                 radial: Sequence[Tensor], node_feats: Sequence[Tensor]) -> Tensor:
    """``atomic_basis_messages``, by the chunked kernel where there is more than one chunk of
    messages (``kernel_applies``): within one chunk the reference (the kernel measured 0.96x
    best call in training on aspirin, float64, 1.7 MB). A frozen layer takes ``FrozenAtomicBasis``
    instead. -> [N, M, C]"""
    num_pairs, C = K.shape[0] // 2, node_feats[0].shape[2]
    if kernel_applies(num_pairs, _atomic_basis_message_numel(K.shape[1], K.shape[2], C), K, math.inf):
        return AtomicBasisMessages.apply(K, senders, receivers, num_atoms, *_interleaved(radial, node_feats))
    return atomic_basis_messages(K, senders, receivers, num_atoms, radial, node_feats)


def atomic_basis_chunked(K: Tensor, senders: Tensor, receivers: Tensor, num_atoms: int,
                         radial: Sequence[Tensor], node_feats: Sequence[Tensor]) -> Tensor:
    """``atomic_basis_messages`` chunk by chunk of pairs, X and the messages in reused buffers."""
    num_pairs, (M, rows), C = K.shape[0] // 2, K.shape[1:], node_feats[0].shape[2]
    out = K.new_zeros(num_atoms, M, C)                                                 # [N, M, C]
    chunk, numel = _atomic_basis_chunks(num_pairs, M, rows, C)
    X_buffer, message_buffer = K.new_empty(numel), K.new_empty(numel)
    for start in range(0, num_pairs, chunk):
        stop = min(start + chunk, num_pairs)
        p = stop - start
        X, messages = X_buffer[:p * rows * C].view(p, rows, C), message_buffer[:p * M * C].view(p, M, C)
        for half in (0, num_pairs):
            _fill_rows(X, radial, node_feats, senders[half + start:half + stop], start, stop)
            torch.bmm(K[half + start:half + stop], X, out=messages)
            out.index_add_(0, receivers[half + start:half + stop], messages)
    return out


def atomic_basis_backward_chunked(grad_out: Tensor, K: Tensor, senders: Tensor, receivers: Tensor,
                                  radial: Sequence[Tensor], node_feats: Sequence[Tensor],
                                  needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """(dK, dR_0, dWh_0, dR_1, ...) without a graph. With G = g[receivers] per edge:

        dK_e = G_e X_eᵀ,   dX_e = K_eᵀ G_e,   dR_b = Σ_m dX_b Wh_j (both directions),   dWh_b[j] += Σ_path dX_b R_b.
    """
    num_pairs, (M, rows), C = K.shape[0] // 2, K.shape[1:], node_feats[0].shape[2]
    grad_K = torch.empty_like(K) if needs[0] else None                                # [E, M, rows]
    grad_R = [torch.zeros_like(R_b) if need else None for R_b, need in zip(radial, needs[1::2])]
    grad_Wh = [torch.zeros_like(Wh) if need else None for Wh, need in zip(node_feats, needs[2::2])]
    chunk, numel = _atomic_basis_chunks(num_pairs, M, rows, C)
    X_buffer, G_buffer, dX_buffer = K.new_empty(numel), K.new_empty(numel), K.new_empty(numel)
    for start in range(0, num_pairs, chunk):
        stop = min(start + chunk, num_pairs)
        p = stop - start
        X, dX = X_buffer[:p * rows * C].view(p, rows, C), dX_buffer[:p * rows * C].view(p, rows, C)
        for half in (0, num_pairs):
            edges = slice(half + start, half + stop)
            G = torch.index_select(grad_out, 0, receivers[edges], out=G_buffer[:p * M * C].view(p, M, C))  # [p, M, C]
            if grad_K is not None:
                _fill_rows(X, radial, node_feats, senders[edges], start, stop)
                torch.bmm(G, X.transpose(1, 2), out=grad_K[edges])
            torch.bmm(K[edges].transpose(1, 2), G, out=dX)                             # [p, rows, C]
            row = 0
            for b, (R_b, Wh) in enumerate(zip(radial, node_feats)):
                n_b, dim = R_b.shape[1], Wh.shape[1]
                dX_b = dX[:, row:row + n_b * dim].view(p, n_b, dim, C)                 # [p, n_b, d_b, C]
                if grad_R[b] is not None:
                    Wh_j = Wh.index_select(0, senders[edges])                          # [p, d_b, C]
                    grad_R[b][start:stop] += (dX_b * Wh_j[:, None]).sum(2)
                if grad_Wh[b] is not None:
                    grad_Wh[b].index_add_(0, senders[edges], (dX_b * R_b[start:stop, :, None]).sum(1))
                row += n_b * dim
    grads: List[Optional[Tensor]] = [grad_K]
    for dR, dWh in zip(grad_R, grad_Wh):
        grads += [dR, dWh]
    return tuple(grads)


class AtomicBasisMessages(torch.autograd.Function):
    """``atomic_basis_messages`` chunked (eager CPU). Inputs after num_atoms: R_0, Wh_0, R_1, Wh_1, ..."""

    @staticmethod
    def forward(K: Tensor, senders: Tensor, receivers: Tensor, num_atoms: int, *tensors: Tensor) -> Tensor:
        return atomic_basis_chunked(K, senders, receivers, num_atoms, tensors[0::2], tensors[1::2])

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        K, senders, receivers, num_atoms, *tensors = inputs
        ctx.save_for_backward(K, senders, receivers, *tensors)
        ctx.num_atoms = num_atoms

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        K, senders, receivers, *tensors = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0],) + tuple(ctx.needs_input_grad[4:])
        if torch.is_grad_enabled():  # a graph of the backward is wanted
            grads = list(AtomicBasisGradients.apply(grad_out, K, senders, receivers, needs, *tensors))
        else:
            grads = list(atomic_basis_backward_chunked(grad_out.contiguous(), K, senders, receivers,
                                                       tensors[0::2], tensors[1::2], needs))
        return (grads[0], None, None, None, *grads[1:])


def _interleaved(radial: Sequence[Any], node_feats: Sequence[Any]) -> List[Any]:
    """R_0, Wh_0, R_1, Wh_1, ...: the tensors after num_atoms of ``AtomicBasisMessages`` (or
    anything given per R_b and per Wh_b in that order: their needs)."""
    return [t for pair in zip(radial, node_feats) for t in pair]


class AtomicBasisGradients(torch.autograd.Function):
    """(dK, dR_0, dWh_0, dR_1, ...) of the atomic basis (``atomic_basis_backward_chunked``, the
    ``needs`` ones; None for the others) chunk by chunk, for a backward that must itself be
    differentiable (training on forces). S = <g, out> is linear in each of g, K, R and Wh, and
    these are its gradients in K, R and Wh; so with cotangents κ, ρ, ω of dK, dR, dWh, and F the
    messages, dK(·; R, Wh), dR(K, ·; Wh), dWh(K, R; ·) this node with the named factors swapped in:

        ∂/∂g = F(κ, R, Wh) + F(K, ρ, Wh) + F(K, R, ω),
        ∂/∂K = dK(ρ, Wh) + dK(R, ω),   ∂/∂R = dR(κ; Wh) + dR(K; ω),   ∂/∂Wh = dWh(κ, R) + dWh(K, ρ):

    chunked messages and this node again, and no per-edge array is built at any order.

    Shapes:
        grad_out [N, M, C], K [E, M, rows], senders [E], receivers [E], R_b [P, n_b, C],
        Wh_b [N, d_b, C]  ->  dK [E, M, rows], dR_b [P, n_b, C], dWh_b [N, d_b, C]
    """

    @staticmethod
    def forward(grad_out: Tensor, K: Tensor, senders: Tensor, receivers: Tensor, needs: Tuple[bool, ...],
                *tensors: Tensor) -> Tuple[Optional[Tensor], ...]:
        return atomic_basis_backward_chunked(grad_out.contiguous(), K, senders, receivers,
                                             tensors[0::2], tensors[1::2], needs)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Optional[Tensor], ...]) -> None:
        grad_out, K, senders, receivers, _, *tensors = inputs
        ctx.save_for_backward(grad_out, K, senders, receivers, *tensors)

    @staticmethod
    def backward(ctx: Any, *cotangents: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        g, K, senders, receivers, *tensors = ctx.saved_tensors
        R, Wh = tensors[0::2], tensors[1::2]
        # a cotangent of an output not formed (None) or not used is zero
        kappa, *rest = [torch.zeros_like(t) if c is None else c.contiguous()
                        for c, t in zip(cotangents, [K] + tensors)]
        rho, omega = rest[0::2], rest[1::2]
        need_g, need_K = ctx.needs_input_grad[:2]
        need_R, need_Wh = ctx.needs_input_grad[5::2], ctx.needs_input_grad[6::2]
        num_atoms = g.shape[0]

        def messages(K_: Tensor, R_: Sequence[Tensor], Wh_: Sequence[Tensor]) -> Tensor:
            return AtomicBasisMessages.apply(K_, senders, receivers, num_atoms, *_interleaved(R_, Wh_))

        def gradients(K_: Tensor, R_: Sequence[Tensor], Wh_: Sequence[Tensor], with_K: bool, with_R: bool,
                      with_Wh: bool) -> List[Optional[Tensor]]:
            needs = (with_K and need_K,) + tuple(_interleaved([with_R and n for n in need_R],
                                                               [with_Wh and n for n in need_Wh]))
            if not any(needs):
                return [None] * len(needs)
            return list(AtomicBasisGradients.apply(g, K_, senders, receivers, needs, *_interleaved(R_, Wh_)))

        grad_g = messages(kappa, R, Wh) + messages(K, rho, Wh) + messages(K, R, omega) if need_g else None
        first = gradients(kappa, rho, Wh, True, True, False)        # dK(ρ, Wh), dR(κ; Wh)
        second = gradients(K, R, omega, True, True, False)          # dK(R, ω), dR(K; ω)
        third = gradients(kappa, R, Wh, False, False, True)         # dWh(κ, R)
        fourth = gradients(K, rho, Wh, False, False, True)          # dWh(K, ρ)
        grads = [None if a is None else a + b for a, b in zip(first, second)]
        grads[2::2] = [None if a is None else a + b for a, b in zip(third[2::2], fourth[2::2])]
        return (grad_g, grads[0], None, None, None, *grads[1:])


# a frozen layer's messages of at least this many bytes (num_pairs x numbers per pair) take
# FrozenAtomicBasis even when they fit in one chunk. Set for its forerunner (AtomicBasisMessages
# on a frozen layer; A/B, MACE-style model, 2 threads: aspirin float64, 1.7 MB, 1.05x; float32,
# 0.85 MB, best call 1.02x, median call 1.22x over 400 alternated rounds; ethanol, 0.4 MB and
# less, 0.90-0.95x); FrozenAtomicBasis against it on aspirin: 0.98-1.01x best call, 1.02x median
FROZEN_KERNEL_BYTES = 1 << 19


def frozen_atomic_basis_applies(layer: nn.Module, like: Tensor, num_pairs: int, num_components: int,
                                num_rows: int, num_channels: int) -> bool:
    """Whether ``FrozenAtomicBasis`` runs for ``layer``: eager on the CPU, its weights frozen
    (``molnets._frozen.frozen_on_cpu_eager``), and more than one chunk of messages or at least
    ``FROZEN_KERNEL_BYTES`` of them. Shapes and flags only."""
    numel = _atomic_basis_message_numel(num_components, num_rows, num_channels)
    return kernel_applies(num_pairs, numel, like, FROZEN_KERNEL_BYTES) and frozen_on_cpu_eager(layer, like)


class FrozenAtomicBasis(torch.autograd.Function):
    """``atomic_basis_messages`` of a frozen layer from the factors of K, chunk by chunk:

        K_e = Y_e coupling   (per chunk: [p, M_sh] by [M_sh, M rows]),

    so neither K [E, M, rows] nor its gradient exists at full size, and the gradient goes to Y
    (dY_e = dK_e couplingᵀ). The radial weights come as one [P, paths, C] array whose paths are
    grouped by input irrep (``PairAtomicBasis._network_by_path``), R_b a slice of it: no copy
    per irrep, and their gradients are written into one [P, paths, C] array. The messages of
    each chunk are ``atomic_basis_chunked``'s (``_fill_rows``), their gradients
    ``atomic_basis_backward_chunked``'s. When a graph of the backward is wanted (double backward)
    the gradients come from the plain path, ``PairAtomicBasis._messages``
    (``molnets._frozen.reference_gradients``).

    Shapes:
        edge_sh Y [E, M_sh], R [P, paths, C] (E = 2P, edges k and k + P the two directions of
        pair k), senders [E], receivers [E], layer (a ``PairAtomicBasis``: coupling [M_sh, M rows],
        path_counts n_b), node_feats Wh_b [N, d_b, C]  ->  [N, M, C]
    """

    @staticmethod
    def forward(ctx: Any, edge_sh: Tensor, R: Tensor, senders: Tensor, receivers: Tensor, layer: nn.Module,
                *node_feats: Tensor) -> Tensor:
        (num_pairs, _, C), N = R.shape, node_feats[0].shape[0]
        coupling, M, rows = layer.coupling, layer.num_components, layer.num_rows
        radial = R.split(layer.path_counts, dim=1)                                     # R_b [P, n_b, C]
        out = R.new_zeros(N, M, C)                                                     # [N, M, C]
        chunk, numel = _atomic_basis_chunks(num_pairs, M, rows, C)
        X_buffer, message_buffer = R.new_empty(numel), R.new_empty(numel)
        K_buffer = R.new_empty(min(chunk, num_pairs) * M * rows)
        for start in range(0, num_pairs, chunk):
            stop = min(start + chunk, num_pairs)
            p = stop - start
            X, messages = X_buffer[:p * rows * C].view(p, rows, C), message_buffer[:p * M * C].view(p, M, C)
            K = K_buffer[:p * M * rows].view(p, M * rows)
            for half in (0, num_pairs):
                edges = slice(half + start, half + stop)
                _fill_rows(X, radial, node_feats, senders[edges], start, stop)
                torch.mm(edge_sh[edges], coupling, out=K)                              # [p, M rows]
                torch.bmm(K.view(p, M, rows), X, out=messages)
                out.index_add_(0, receivers[edges], messages)
        ctx.layer = layer
        ctx.save_for_backward(edge_sh, R, senders, receivers, *node_feats)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        edge_sh, R, senders, receivers, *node_feats = ctx.saved_tensors
        layer, needs = ctx.layer, (ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.needs_input_grad[5:])
        if torch.is_grad_enabled():  # a graph of the backward is wanted: through the plain path
            grad_sh, grad_R, *grad_Wh = reference_gradients(
                lambda sh, R_, *Wh: layer._messages(sh, list(R_.split(layer.path_counts, dim=1)), list(Wh),
                                                    senders, receivers),
                [edge_sh, R, *node_feats], needs, grad_out, num_args=2 + len(node_feats))
            return (grad_sh, grad_R, None, None, None, *grad_Wh)
        (num_pairs, _, C), grad_out = R.shape, grad_out.contiguous()
        coupling, M, rows = layer.coupling, layer.num_components, layer.num_rows
        radial = R.split(layer.path_counts, dim=1)                                     # R_b [P, n_b, C]
        grad_sh = torch.empty_like(edge_sh) if needs[0] else None                     # [E, M_sh]
        grad_R = torch.zeros_like(R) if needs[1] else None                            # [P, paths, C]
        grad_radial = grad_R.split(layer.path_counts, dim=1) if grad_R is not None else [None] * len(radial)
        grad_Wh = [torch.zeros_like(Wh) if need else None for Wh, need in zip(node_feats, needs[2:])]
        chunk, numel = _atomic_basis_chunks(num_pairs, M, rows, C)
        X_buffer, G_buffer, dX_buffer = R.new_empty(numel), R.new_empty(numel), R.new_empty(numel)
        K_buffer, dK_buffer = (R.new_empty(min(chunk, num_pairs) * M * rows) for _ in range(2))
        for start in range(0, num_pairs, chunk):
            stop = min(start + chunk, num_pairs)
            p = stop - start
            X, dX = X_buffer[:p * rows * C].view(p, rows, C), dX_buffer[:p * rows * C].view(p, rows, C)
            K, dK = K_buffer[:p * M * rows].view(p, M, rows), dK_buffer[:p * M * rows].view(p, M, rows)
            for half in (0, num_pairs):
                edges = slice(half + start, half + stop)
                G = torch.index_select(grad_out, 0, receivers[edges], out=G_buffer[:p * M * C].view(p, M, C))
                torch.mm(edge_sh[edges], coupling, out=K.view(p, M * rows))
                if grad_sh is not None:
                    _fill_rows(X, radial, node_feats, senders[edges], start, stop)
                    torch.bmm(G, X.transpose(1, 2), out=dK)                            # [p, M, rows]
                    torch.mm(dK.view(p, M * rows), coupling.T, out=grad_sh[edges])     # [p, M_sh]
                torch.bmm(K.transpose(1, 2), G, out=dX)                                # [p, rows, C]
                row = 0
                for b, (R_b, dR_b, Wh) in enumerate(zip(radial, grad_radial, node_feats)):
                    n_b, dim = R_b.shape[1], Wh.shape[1]
                    dX_b = dX[:, row:row + n_b * dim].view(p, n_b, dim, C)             # [p, n_b, d_b, C]
                    if dR_b is not None:
                        dR_b[start:stop] += (dX_b * Wh.index_select(0, senders[edges])[:, None]).sum(2)
                    if grad_Wh[b] is not None:
                        grad_Wh[b].index_add_(0, senders[edges], (dX_b * R_b[start:stop, :, None]).sum(1))
                    row += n_b * dim
        return (grad_sh, grad_R, None, None, None, *grad_Wh)


# ------------------------------------------------- filter networks of frozen models, chunk by chunk


_WIDEST: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def _widest(network: nn.Module) -> int:
    """The widest output of a dense layer of ``network`` (its widest activation), kept per
    network (a module's layers do not change width; looked up at every call)."""
    widest = _WIDEST.get(network)
    if widest is None:
        widest = _WIDEST[network] = max(m.out_features for m in network.modules() if isinstance(m, nn.Linear))
    return widest


# glibc's malloc serves a block above its largest mmap threshold (32 MiB) with a fresh mapping,
# faulted in page by page at every call (molnets.memory): the filter activations above this size
# are what FrozenFilter saves. Measured (TensorNet-style, fcc Cu, 2 threads, A/B in one process):
# widest activation 136 MB 1.48x, 57-68 MB 1.19x, 29 MB 1.00x, 8-17 MB 0.94x (the recomputation);
# with freed memory reused (no fresh mappings) 0.89x at 68 MB, so then it does not run.
FRESH_MAPPING_BYTES = 32 << 20


def filter_kernel_applies(network: nn.Module, radial: Tensor) -> bool:
    """Whether ``FrozenFilter`` runs: eager on the CPU, the network's weights frozen
    (``molnets._frozen.frozen_on_cpu_eager``), its widest activation over all rows larger than
    ``FRESH_MAPPING_BYTES`` (below that, the backward's recomputation costs more than the
    activations it avoids keeping), and freed memory not kept for reuse
    (``molnets.memory.freed_memory_is_reused``: then there are no fresh blocks to avoid).
    Shapes and flags only."""
    # the cheap tests first: on a small molecule this runs per layer and call
    return (radial.device.type == "cpu" and not torch.compiler.is_compiling()
            and radial.shape[0] * _widest(network) * radial.element_size() > FRESH_MAPPING_BYTES
            and not freed_memory_is_reused() and frozen_on_cpu_eager(network, radial))


def network_output(network: nn.Module, activation: Optional[Callable[[Tensor], Tensor]], radial: Tensor) -> Tensor:
    """σ(network(e)), or network(e) without an activation (``mlp.radial_filter`` before the
    envelope). [rows, D]"""
    out = network(radial)
    return out if activation is None else activation(out)


class FrozenFilter(torch.autograd.Function):
    """W = σ(network(e)) u, a frozen filter network on many edges, chunk by chunk of rows.

    Plain operations keep every hidden activation of every edge for the backward ([E, width]
    each, hundreds of MB on a crystal of thousands of atoms, each a fresh block faulted in page by
    page at every call). Here the forward keeps none: it runs chunk by chunk into the output, and
    the backward runs each chunk's forward again (one more forward of the network) and takes the
    chunk's input gradients from it, in memory of one chunk. With frozen weights the network's
    parameters need no gradient, so only e and u get one. When a graph of the backward is wanted
    (create_graph) the gradients come from the plain operations (differentiable again).

    Shapes:
        radial e [E, K], envelope u [E] or None (u = 1), network (frozen), activation σ or None
        ->  [E, D]
    """

    @staticmethod
    def forward(ctx: Any, radial: Tensor, envelope: Optional[Tensor], network: nn.Module,
                activation: Optional[Callable[[Tensor], Tensor]]) -> Tensor:
        rows = _chunk_size(_widest(network))
        out = None
        for start in range(0, radial.shape[0], rows):
            chunk = network_output(network, activation, radial[start:start + rows])  # [p, D]
            if out is None:
                out = chunk.new_empty(radial.shape[0], chunk.shape[1])               # [E, D]
            if envelope is None:
                out[start:start + rows] = chunk
            else:
                torch.mul(chunk, envelope[start:start + rows, None], out=out[start:start + rows])
        ctx.save_for_backward(radial, envelope)
        ctx.network, ctx.activation = network, activation
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        radial, envelope = ctx.saved_tensors
        network, activation = ctx.network, ctx.activation
        needs = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # a graph of the backward is wanted: through the plain operations
            if envelope is None:
                return reference_gradients(lambda e: network_output(network, activation, e), [radial], needs[:1],
                                           grad, num_args=4)
            return reference_gradients(lambda e, u: network_output(network, activation, e) * u[:, None],
                                       [radial, envelope], needs, grad, num_args=4)
        grad_radial = torch.empty_like(radial) if needs[0] else None                # [E, K]
        grad_envelope = torch.empty_like(envelope) if needs[1] else None             # [E]
        rows = _chunk_size(_widest(network))
        for start in range(0, radial.shape[0], rows):
            stop = min(start + rows, radial.shape[0])
            with torch.enable_grad():
                e = radial[start:stop].detach().requires_grad_(needs[0])              # [p, K]
                chunk = network_output(network, activation, e)                       # [p, D]
            if grad_envelope is not None:
                torch.sum(grad[start:stop] * chunk.detach(), dim=1, out=grad_envelope[start:stop])
            if grad_radial is not None:
                grad_chunk = grad[start:stop] if envelope is None else grad[start:stop] * envelope[start:stop, None]
                (grad_radial[start:stop],) = torch.autograd.grad(chunk, [e], grad_chunk)
        return grad_radial, grad_envelope, None, None
