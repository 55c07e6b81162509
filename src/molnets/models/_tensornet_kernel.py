"""Frozen TensorNet-style layers in one autograd node each (private; CPU, eager, any size).

``TensorInteraction`` in plain operations records ~120 autograd nodes per layer, and its 3x3 products
are batched products of [N C] tiny matrices (~50 ns each): most of a call on a small molecule. With
frozen weights (as calculators run a model), ``FrozenInteraction`` computes the same forward
without recording a graph and its backward as written out below, in about 40 operations, with
every 3x3 product done "entry-major":
a stack of matrices stored as [9, L] (entry (a, b) of all L = N C matrices in one row), where
(P Q)_ab = Σ_k P_ak Q_kb is a product and two multiply-adds of rows that run along L.
Components [9, L] and entries [9, L] are one [9, 9] matrix product apart (the orthonormal basis
of ``layers.cartesian``). The layers pass their [N, C, 3, 3] outputs and gradients as views of
entry-major [9, N C] arrays, so the next one reads its entries without a transposing copy.
Everything that acts part by part (the I, A and S rows of the 9 components) does so on slices,
never spreading a part's [.., 3, C] numbers over 9 rows first: the filters on the per-pair rows
(``layers._message_kernels.scale_parts``, ``sum_parts``) and the channel maps
(``_linear_by_part``: three matrix products with the part's rows stacked). The per-pair
temporaries [2p, 9, C] live in buffers reused from call to call (``_message_kernels.workspace``).

On a crystal the same kernels run chunk by chunk: pairs in chunks of one such buffer (with their
filters: the interaction's filter network, the embedding's radial layer), atoms in chunks of
``_tensornet_ops.ATOM_CHUNK_NUMEL`` numbers per [9, n C] array, and the backward computes each
chunk's node terms again instead of keeping them, so that besides the inputs and outputs only y, the pair
convolution and their gradients exist at full size ([N, 9, C]; the reference's ~20 node arrays
per layer and its [P, 3, C] filters and their gradients, each a fresh block of memory above
32 MB on thousands of atoms, are not formed). On a molecule (one chunk) the backward keeps what
it needs. ``TensorInteraction._reference`` is the oracle; the tests compare the two (values and
gradients, first and second order, in one chunk and in many).

Forward (paper Eqs. 7-11, see ``TensorInteraction``), with d_X = ||X|| + 1 and d_A = ||A|| + 1:

    h_0 = e(r),  h_k = SiLU(a_k),  a_k = W_k h_(k-1) + b_k,   f = φ h_3              [P, 3, C]
    X̂ = X / d_X,   Y = L_in(X̂),   y = components of Y                                [N, 9, C]
    M = Σ_pairs f ∘ y + f(0) ∘ y,   A = M Y + Y M,   D = L_out(A / d_A)
    out = X̂ + D + D D

Backward, from g = ∂L/∂out (L_in, L_out are linear; ᵀ their adjoints; <., .> the Frobenius
product per atom and channel):

    g_D = g + g Dᵀ + Dᵀ g,   g_Â = L_outᵀ g_D,   g_A = g_Â / d_A - 2 A <g_Â, A> / d_A²
    g_M = g_A Yᵀ + Yᵀ g_A,   g_Y = Mᵀ g_A + g_A Mᵀ + (components of) Σ_pairs f ∘ g_M + f(0) ∘ g_M
    g_f = Σ over the rows of each part of g_M[i] y[j] + g_M[j] y[i]
    g_X̂ = g + L_inᵀ g_Y,   g_X = g_X̂ / d_X - 2 X <g_X̂, X> / d_X²
    g_φ = <g_f, h_3>,   g_(a_k) = SiLU'(a_k) ∘ g_(h_k),   g_(h_(k-1)) = W_kᵀ g_(a_k)

``FrozenEmbedding`` (``_tensornet_embedding_kernel``) does the same for ``TensorEmbedding`` with
these helpers. When a graph of the backward is wanted (double backward, ``create_graph=True``),
the gradients are taken through the reference instead.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import _native
from .._frozen import reference_gradients
from ..layers import _message_kernels
from ..layers._message_kernels import (
    _chunk_size,
    _widest,
    filter_kernel_applies,
    native_convolution,
    native_convolution_backward,
    scale_parts,
    sum_parts,
    workspace,
)
from ..layers.cartesian import PART_SLICES
from ._tensornet_ops import (
    _add_square,
    _anticommutator,
    _atom_chunks,
    _columns,
    _dense_chain,
    _dense_chain_backward,
    _denominator,
    _linear_by_part,
    _matrices,
    _normalized_entries,
    _normalized_gradient,
    _pair_chunks,
    _rows,
    _transposed,
)

__all__ = ["FrozenInteraction", "kernels_apply"]

def kernels_apply(layer: nn.Module, num_pairs: int, like: Tensor) -> bool:
    """Whether a frozen TensorNet-style layer (its weights frozen, eager, CPU: the caller's
    ``frozen_on_cpu_eager``) runs as its kernel here on num_pairs pairs: a molecule (its pairs in
    one chunk) or a crystal whose filter network's widest activation over all pairs exceeds
    ``_message_kernels.FRESH_MAPPING_BYTES`` (about a thousand atoms). Between those (a few
    hundred atoms) the reference runs, with its chunked convolution kernels and each filter
    network as one product per layer: A/B on 256 atoms of Cu, the kernels 0.83-0.94x in float64
    (1.05x in float32). Shapes only."""
    return (num_pairs <= _chunk_size(9 * layer.num_channels)
            or num_pairs * _widest(layer.radial) * like.element_size() > _message_kernels.FRESH_MAPPING_BYTES)


class FrozenInteraction(torch.autograd.Function):
    """``TensorInteraction`` with frozen weights as one autograd node (module docstring).

    The filter network runs here chunk by chunk of pairs, each chunk's filters used by the pair
    convolution at once, so that neither the filters of every pair nor their gradient are formed;
    its activations are kept for the backward unless over all pairs they would exceed
    ``FRESH_MAPPING_BYTES`` (a crystal of about a thousand atoms:
    ``_message_kernels.filter_kernel_applies``), and are then computed again chunk by chunk. The
    node updates run chunk by chunk of atoms; the backward computes each chunk's node terms again
    from X, y and the convolution, or keeps them on a molecule (one chunk).

    Shapes:
        X [N, C, 3, 3], edge_rbf [P, K], edge_envelope [P], pair_i [P], pair_j [P],
        self_weights [9, C] (f(0) spread over the components), layer  ->  [N, C, 3, 3]
    """

    @staticmethod
    def forward(ctx: Any, X: Tensor, edge_rbf: Tensor, edge_envelope: Tensor, pair_i: Tensor,
                pair_j: Tensor, self_weights: Tensor, layer: nn.Module) -> Tensor:
        (N, C), P = X.shape[:2], pair_i.shape[0]
        basis = layer.basis(X).flatten(1)                                           # [9, 9]: B_k over (a, b)
        chunks = _atom_chunks(N, C)
        y = X.new_empty(N, 9, C)                                                    # components of Y
        for a, b in chunks:
            X_hat, X_norm = _normalized_entries(_rows(X, a, b))                     # [9, L], [L]
            u = _linear_by_part(torch.mm(basis, X_hat).view(9, b - a, C), layer.linear_in.weight)  # [9, n, C]
            y[a:b] = u.transpose(0, 1)
        messages = torch.zeros_like(y)                                              # Σ_pairs f ∘ y
        keep = not filter_kernel_applies(layer.radial, edge_rbf)  # the filters' activations, or again
        kept_filters: List[Tensor] = []
        for s, e in _pair_chunks(P, C):
            rbf, envelope, i, j = (_rows(t, s, e) for t in (edge_rbf, edge_envelope, pair_i, pair_j))
            filters = _filters(layer, rbf, envelope)                                # f, h, pre-activations
            _convolve(filters[0], y, i, j, messages)
            kept_filters += filters if keep else []
        out = X.new_empty(9, N * C)                                                 # entries
        for a, b in chunks:
            if len(chunks) > 1:  # this chunk's X̂ and u again (u from y: L_in is not applied again)
                X_hat, u = _normalized_entries(_rows(X, a, b))[0], _rows(y, a, b).transpose(0, 1).contiguous()
            terms = _update_terms(u, _rows(messages, a, b), self_weights, basis, layer)
            D = terms[-1]
            _add_square(_matrices(torch.add(X_hat, D, out=_columns(out, a * C, b * C))), _matrices(D))
        kept = (X_norm, *terms) if len(chunks) == 1 else ()  # else computed again, chunk by chunk
        ctx.layer, ctx.num_kept = layer, len(kept)
        ctx.save_for_backward(X, edge_rbf, edge_envelope, pair_i, pair_j, self_weights, basis, y, messages,
                              *kept, *kept_filters)
        return out.T.view(N, C, 3, 3)  # entry-major, as the next layer and the backward read it

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        X, edge_rbf, edge_envelope, pair_i, pair_j, self_weights, basis, y, messages, *rest = ctx.saved_tensors
        kept, kept_filters = rest[:ctx.num_kept], rest[ctx.num_kept:]
        layer, needs = ctx.layer, ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # a graph of the backward is wanted: through the reference
            return reference_gradients(
                lambda X, e, u: layer._reference(X, e, u, pair_i, pair_j, self_weights),
                [X, edge_rbf, edge_envelope], needs, grad, num_args=7)
        (N, C), P = X.shape[:2], pair_i.shape[0]
        chunks = _atom_chunks(N, C)
        grad_m = X.new_empty(N, 9, C)                                               # ∂L/∂M, components
        grad_u = []  # per chunk: ∂L/∂u [9, n, C] but for the pairs' part
        for a, b in chunks:
            Y, M, A, A_norm, D = kept[1:] or _update_terms(
                _rows(y, a, b).transpose(0, 1).contiguous(), _rows(messages, a, b), self_weights, basis, layer)
            g = _rows(grad, a, b).reshape(-1, 9).T                                  # [9, L] entries
            grad_D = _anticommutator(_matrices(g), _transposed(D), plus=g)          # [9, L]
            grad_A = _linear_by_part(torch.mm(basis, grad_D).view(9, b - a, C), layer.linear_out.weight,
                                     adjoint=True)                                  # [9, n, C]
            grad_A = _normalized_gradient(torch.mm(basis.T, grad_A.view(9, -1)), A, A_norm)  # [9, L]
            grad_M = torch.mm(basis, _anticommutator(_matrices(grad_A), _transposed(Y))).view(9, b - a, C)
            grad_Y = _anticommutator(_transposed(M), _matrices(grad_A))             # [9, L]
            grad_m[a:b] = grad_M.transpose(0, 1)
            grad_u.append(torch.addmm((grad_M * self_weights[:, None]).view(9, -1), basis,
                                      grad_Y).view(9, b - a, C))                    # f(0) ∘ g_M + g_Y
        # the pair convolution's backward, chunk by chunk of pairs, and the filter network's
        grad_y = torch.zeros_like(y)                                                # ∂L/∂y through the pairs
        grad_rbf = torch.empty_like(edge_rbf) if needs[1] else None                 # [P, K]
        grad_envelope = torch.empty_like(edge_envelope) if needs[2] else None       # [P]
        pair_chunks = _pair_chunks(P, C)
        width = len(kept_filters) // len(pair_chunks)                               # 0: not kept
        for k, (s, e) in enumerate(pair_chunks):
            rbf, envelope, i, j = (_rows(t, s, e) for t in (edge_rbf, edge_envelope, pair_i, pair_j))
            filters = kept_filters[k * width:(k + 1) * width] or _filters(layer, rbf, envelope)
            grad_f = _convolve_backward(grad_m, filters[0], y, i, j, grad_y)        # [p, 3, C]
            _filters_backward(layer, grad_f, filters, envelope, grad_rbf, grad_envelope, s, e)
        grad_X = X.new_empty(9, N * C)                                              # entries
        for (a, b), grad_u_rest in zip(chunks, grad_u):
            X_norm = kept[0] if kept else _denominator(_rows(X, a, b))              # [L]
            grad_X_hat = _linear_by_part(grad_u_rest.add_(_rows(grad_y, a, b).transpose(0, 1)), layer.linear_in.weight,
                                         adjoint=True)                              # [9, n, C]
            grad_X_hat = torch.addmm(_rows(grad, a, b).reshape(-1, 9).T, basis.T, grad_X_hat.view(9, -1))  # [9, L]
            _normalized_gradient(grad_X_hat, _rows(X, a, b).reshape(-1, 9).T, X_norm,
                                 out=_columns(grad_X, a * C, b * C))
        grad_X = grad_X.T.view(N, C, 3, 3) if needs[0] else None                   # entry-major
        return grad_X, grad_rbf, grad_envelope, None, None, None, None


def _filters(layer: nn.Module, edge_rbf: Tensor, edge_envelope: Tensor) -> List[Tensor]:
    """The filters f = φ SiLU(MLP(e)) of p pairs and what their backward needs:
    [f [p, 3, C], h = SiLU(MLP(e)) [p, 3C], the MLP's pre-activations]."""
    pre_activations: List[Tensor] = []
    h = _dense_chain(layer.radial, edge_rbf, pre_activations)                       # [p, 3C]
    return [(h * edge_envelope[:, None]).view(h.shape[0], 3, h.shape[1] // 3), h, *pre_activations]


def _filters_backward(layer: nn.Module, grad_f: Tensor, filters: Sequence[Tensor], edge_envelope: Tensor,
                      grad_rbf: Optional[Tensor], grad_envelope: Optional[Tensor], start: int, stop: int) -> None:
    """The backward of ``_filters`` from ∂L/∂f [p, 3, C]: ∂L/∂e and ∂L/∂φ of the pairs
    start..stop written into ``grad_rbf`` [P, K] and ``grad_envelope`` [P] (those not None)."""
    _, h, *pre_activations = filters
    grad_f = grad_f.view(h.shape)                                                   # [p, 3C]
    if grad_envelope is not None:
        torch.sum(grad_f * h, 1, out=_rows(grad_envelope, start, stop))
    if grad_rbf is not None:
        _dense_chain_backward(layer.radial, grad_f * edge_envelope[:, None], pre_activations,
                              out=_rows(grad_rbf, start, stop))


def _convolve(filters: Tensor, y: Tensor, pair_i: Tensor, pair_j: Tensor, out: Tensor) -> None:
    """out += Σ_pairs f ∘ y both ways (``layers.pair_convolution``) for p pairs: one gather,
    product and sum over both directions in a reused buffer [2p, 9, C], or the compiled kernel
    in one pass where it runs (aspirin, float64: 147 -> 74 µs alone)."""
    if _native.applies(filters, y):
        native_convolution(filters, y, pair_i, pair_j, PART_SLICES, out)
        return
    p, C = pair_i.shape[0], y.shape[2]
    messages = torch.index_select(y, 0, torch.cat([pair_j, pair_i]), out=workspace("messages", (2 * p, 9, C), y))
    scale_parts(messages.view(2, p, 9, C), filters, PART_SLICES)                    # [2p, 9, C]
    out.index_add_(0, torch.cat([pair_i, pair_j]), messages)


def _convolve_backward(grad_m: Tensor, filters: Tensor, y: Tensor, pair_i: Tensor, pair_j: Tensor,
                       grad_y: Tensor) -> Tensor:
    """The backward of ``_convolve`` from ∂L/∂M [N, 9, C]: ∂L/∂y (the convolution of ∂L/∂M) is
    added into ``grad_y``, ∂L/∂f returned; the compiled kernel in one pass where it runs
    (aspirin, float64: 320 -> 97 µs alone). [p, 3, C]"""
    if _native.applies(grad_m, filters, y):
        grad_f = filters.new_empty(filters.shape)
        native_convolution_backward(grad_m, filters, y, pair_i, pair_j, PART_SLICES, grad_y, grad_f)
        return grad_f
    p, C = pair_i.shape[0], y.shape[2]
    grad_messages = torch.index_select(grad_m, 0, torch.cat([pair_i, pair_j]), out=workspace("gathered", (2 * p, 9, C), y))
    products = torch.index_select(y, 0, torch.cat([pair_j, pair_i]), out=workspace("products", (2 * p, 9, C), y))
    products = products.mul_(grad_messages).view(2, p, 9, C)                        # [2, p, 9, C]
    products = torch.add(products[0], products[1], out=workspace("summed", (p, 9, C), y))  # [p, 9, C]
    grad_f = sum_parts(products, PART_SLICES)                                       # [p, 3, C]
    scale_parts(grad_messages.view(2, p, 9, C), filters, PART_SLICES)               # [2p, 9, C]
    grad_y.index_add_(0, torch.cat([pair_j, pair_i]), grad_messages)
    return grad_f


def _update_terms(u: Tensor, messages: Tensor, self_weights: Tensor, basis: Tensor,
                  layer: nn.Module) -> Tuple[Tensor, ...]:
    """The node update of ``FrozenInteraction`` on a chunk of n atoms, from the components
    u [9, n, C] of Y = L_in(X̂) and the pair convolution Σ_pairs f ∘ y [n, 9, C]:
    (Y, M, A = M Y + Y M, d_A, D = L_out(A / d_A)), entry-major [9, n C] (d_A [n C])."""
    n, C = u.shape[1:]
    Y = torch.mm(basis.T, u.view(9, -1))                                            # [9, L] entries
    M = torch.mul(u, self_weights[:, None]).add_(messages.transpose(0, 1))          # f(0) ∘ y + pairs: [9, n, C]
    M = torch.mm(basis.T, M.view(9, -1))                                            # [9, L] entries
    A = _anticommutator(_matrices(M), _matrices(Y))                                 # [9, L]
    A_norm = A.square().sum(0) + 1                                                  # [L]
    v = _linear_by_part(torch.mm(basis, A / A_norm).view(9, n, C), layer.linear_out.weight)  # [9, n, C]
    D = torch.mm(basis.T, v.view(9, -1))                                            # [9, L] entries
    return Y, M, A, A_norm, D
