"""The ACE atomic basis' messages, chunk by chunk on the CPU (private kernels).

    A_i = Σ_{e: receivers[e] = i} K_e X_e,   X_e = [R_b(pair of e) ∘ W h_b(senders[e])]_b

(``layers.pair_atomic_basis``: K_e = Y_e · coupling, the Clebsch-Gordan coupling of the edge's
spherical harmonics; R_b the radial weights of the paths from input irrep b.)
``atomic_basis_messages`` is the reference in plain operations; ``AtomicBasisMessages`` computes
the same numbers without materializing the per-edge X [E, rows, C] or messages [E, M, C], the
largest tensors of the MACE-style model on crystals: pairs are processed in cache-sized chunks
(``_message_kernels.CHUNK_NUMEL``), each block built in a small reused buffer, forward and
backward; its backward's own gradients (training on forces) are ``AtomicBasisGradients``,
chunked again, so no per-edge array is built at any order. For a frozen layer
``FrozenAtomicBasis`` also forms K chunk by chunk and reads the radial weights from one
[P, paths, C] array whose paths are grouped by input irrep, so neither K, nor the per-irrep
radial weights, nor their gradients exist at full size.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._frozen import frozen_on_cpu_eager, reference_gradients
from ._message_kernels import _chunk_size, kernel_applies, workspace
from .scatter import gather_rows, scatter_sum

__all__ = ["atomic_basis", "atomic_basis_messages", "AtomicBasisMessages", "AtomicBasisGradients",
           "FrozenAtomicBasis", "frozen_atomic_basis_applies"]


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


def _messages_chunked(coupling_of: Callable[[slice], Tensor], num_components: int, num_rows: int,
                      senders: Tensor, receivers: Tensor, num_atoms: int, radial: Sequence[Tensor],
                      node_feats: Sequence[Tensor]) -> Tensor:
    """Σ_{e: receivers[e] = i} K_e X_e chunk by chunk of pairs, X and the messages in reused
    buffers; ``coupling_of(edges)`` gives K of a chunk of edges, [p, M, rows] (a stored K's rows,
    or Y coupling formed for the chunk). -> [N, M, C]"""
    num_pairs, (M, rows), C = senders.shape[0] // 2, (num_components, num_rows), node_feats[0].shape[2]
    like = node_feats[0]
    out = like.new_zeros(num_atoms, M, C)                                              # [N, M, C]
    chunk, numel = _atomic_basis_chunks(num_pairs, M, rows, C)
    X_buffer, message_buffer = workspace("rows", (numel,), like), workspace("messages", (numel,), like)
    for start in range(0, num_pairs, chunk):
        stop = min(start + chunk, num_pairs)
        p = stop - start
        X, messages = X_buffer[:p * rows * C].view(p, rows, C), message_buffer[:p * M * C].view(p, M, C)
        for half in (0, num_pairs):
            edges = slice(half + start, half + stop)
            _fill_rows(X, radial, node_feats, senders[edges], start, stop)
            torch.bmm(coupling_of(edges), X, out=messages)
            out.index_add_(0, receivers[edges], messages)
    return out


def _gradients_chunked(grad_out: Tensor, coupling_of: Callable[[slice], Tensor],
                       coupling_gradient: Optional[Callable[[slice, Tensor, Tensor], None]],
                       num_components: int, num_rows: int, senders: Tensor, receivers: Tensor,
                       radial: Sequence[Tensor], node_feats: Sequence[Tensor],
                       grad_radial: Sequence[Optional[Tensor]], grad_node_feats: Sequence[Optional[Tensor]]) -> None:
    """The gradients of ``_messages_chunked`` without a graph, chunk by chunk. With G = g[receivers]
    per edge:

        dK_e = G_e X_eᵀ,   dX_e = K_eᵀ G_e,   dR_b = Σ_m dX_b Wh_j (both directions),   dWh_b[j] += Σ_path dX_b R_b.

    dK is not formed here: ``coupling_gradient(edges, G, X)`` takes G and X of each chunk of
    edges (None: no gradient of K wanted); dR_b and dWh_b are added into ``grad_radial`` and
    ``grad_node_feats`` (zeros, or None where not wanted)."""
    num_pairs, (M, rows), C = senders.shape[0] // 2, (num_components, num_rows), node_feats[0].shape[2]
    chunk, numel = _atomic_basis_chunks(num_pairs, M, rows, C)
    X_buffer, G_buffer = workspace("rows", (numel,), grad_out), workspace("gathered", (numel,), grad_out)
    dX_buffer = workspace("rows_gradient", (numel,), grad_out)
    for start in range(0, num_pairs, chunk):
        stop = min(start + chunk, num_pairs)
        p = stop - start
        X, dX = X_buffer[:p * rows * C].view(p, rows, C), dX_buffer[:p * rows * C].view(p, rows, C)
        for half in (0, num_pairs):
            edges = slice(half + start, half + stop)
            G = torch.index_select(grad_out, 0, receivers[edges], out=G_buffer[:p * M * C].view(p, M, C))  # [p, M, C]
            if coupling_gradient is not None:
                _fill_rows(X, radial, node_feats, senders[edges], start, stop)
                coupling_gradient(edges, G, X)
            torch.bmm(coupling_of(edges).transpose(1, 2), G, out=dX)                   # [p, rows, C]
            row = 0
            for R_b, Wh, dR_b, dWh_b in zip(radial, node_feats, grad_radial, grad_node_feats):
                n_b, dim = R_b.shape[1], Wh.shape[1]
                dX_b = dX[:, row:row + n_b * dim].view(p, n_b, dim, C)                 # [p, n_b, d_b, C]
                if dR_b is not None:
                    Wh_j = Wh.index_select(0, senders[edges])                          # [p, d_b, C]
                    dR_b[start:stop] += (dX_b * Wh_j[:, None]).sum(2)
                if dWh_b is not None:
                    dWh_b.index_add_(0, senders[edges], (dX_b * R_b[start:stop, :, None]).sum(1))
                row += n_b * dim


def atomic_basis_chunked(K: Tensor, senders: Tensor, receivers: Tensor, num_atoms: int,
                         radial: Sequence[Tensor], node_feats: Sequence[Tensor]) -> Tensor:
    """``atomic_basis_messages`` chunk by chunk of pairs (``_messages_chunked`` on K's rows)."""
    return _messages_chunked(lambda edges: K[edges], K.shape[1], K.shape[2], senders, receivers, num_atoms,
                             radial, node_feats)


def atomic_basis_backward_chunked(grad_out: Tensor, K: Tensor, senders: Tensor, receivers: Tensor,
                                  radial: Sequence[Tensor], node_feats: Sequence[Tensor],
                                  needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """(dK, dR_0, dWh_0, dR_1, ...) without a graph (``_gradients_chunked``), dK_e = G_e X_eᵀ
    written into one [E, M, rows] array."""
    grad_K = torch.empty_like(K) if needs[0] else None                                # [E, M, rows]
    grad_R = [torch.zeros_like(R_b) if need else None for R_b, need in zip(radial, needs[1::2])]
    grad_Wh = [torch.zeros_like(Wh) if need else None for Wh, need in zip(node_feats, needs[2::2])]

    def coupling_gradient(edges: slice, G: Tensor, X: Tensor) -> None:
        torch.bmm(G, X.transpose(1, 2), out=grad_K[edges])                             # [p, M, rows]

    _gradients_chunked(grad_out, lambda edges: K[edges], coupling_gradient if grad_K is not None else None,
                       K.shape[1], K.shape[2], senders, receivers, radial, node_feats, grad_R, grad_Wh)
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


def _coupling_numel(R: Tensor, layer: nn.Module) -> int:
    """Numbers of K (or of dK) for the largest chunk of pairs of ``FrozenAtomicBasis``."""
    num_pairs, M, rows = R.shape[0], layer.num_components, layer.num_rows
    return min(_atomic_basis_chunks(num_pairs, M, rows, R.shape[2])[0], num_pairs) * M * rows


def _coupling_of(edge_sh: Tensor, R: Tensor, layer: nn.Module) -> Callable[[slice], Tensor]:
    """K of a chunk of edges formed when asked for, Y[edges] coupling, in a reused buffer
    (``FrozenAtomicBasis``). edges -> [p, M, rows]"""
    M, rows = layer.num_components, layer.num_rows
    buffer = workspace("coupling", (_coupling_numel(R, layer),), R)

    def coupling_of(edges: slice) -> Tensor:
        p = edges.stop - edges.start
        K = torch.mm(edge_sh[edges], layer.coupling, out=buffer[:p * M * rows].view(p, M * rows))  # [p, M rows]
        return K.view(p, M, rows)

    return coupling_of


class FrozenAtomicBasis(torch.autograd.Function):
    """``atomic_basis_messages`` of a frozen layer from the factors of K, chunk by chunk:

        K_e = Y_e coupling   (per chunk: [p, M_sh] by [M_sh, M rows]),

    so neither K [E, M, rows] nor its gradient exists at full size, and the gradient goes to Y
    (dY_e = dK_e couplingᵀ). The radial weights come as one [P, paths, C] array whose paths are
    grouped by input irrep (``PairAtomicBasis._network_by_path``), R_b a slice of it: no copy
    per irrep, and their gradients are written into one [P, paths, C] array. The chunks are the
    trainable kernel's (``_messages_chunked``, ``_gradients_chunked``) with K formed per chunk
    (``_coupling_of``) and dK sent to Y. When a graph of the backward is wanted (double backward)
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
        radial = R.split(layer.path_counts, dim=1)                                     # R_b [P, n_b, C]
        out = _messages_chunked(_coupling_of(edge_sh, R, layer), layer.num_components,
                                layer.num_rows, senders, receivers, node_feats[0].shape[0], radial, node_feats)
        ctx.layer = layer
        ctx.save_for_backward(edge_sh, R, senders, receivers, *node_feats)
        return out                                                                     # [N, M, C]

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
        M, rows = layer.num_components, layer.num_rows
        grad_sh = torch.empty_like(edge_sh) if needs[0] else None                     # [E, M_sh]
        grad_R = torch.zeros_like(R) if needs[1] else None                            # [P, paths, C]
        grad_radial = grad_R.split(layer.path_counts, dim=1) if grad_R is not None else [None] * len(layer.path_counts)
        grad_Wh = [torch.zeros_like(Wh) if need else None for Wh, need in zip(node_feats, needs[2:])]
        dK_buffer = workspace("coupling_gradient", (_coupling_numel(R, layer),), R)

        def coupling_gradient(edges: slice, G: Tensor, X: Tensor) -> None:  # dY_e = dK_e couplingᵀ
            p = edges.stop - edges.start
            dK = torch.bmm(G, X.transpose(1, 2), out=dK_buffer[:p * M * rows].view(p, M, rows))  # [p, M, rows]
            torch.mm(dK.view(p, M * rows), layer.coupling.T, out=grad_sh[edges])        # [p, M_sh]

        _gradients_chunked(grad_out.contiguous(), _coupling_of(edge_sh, R, layer),
                           coupling_gradient if grad_sh is not None else None, M, rows, senders, receivers,
                           R.split(layer.path_counts, dim=1), node_feats, grad_radial, grad_Wh)
        return (grad_sh, grad_R, None, None, None, *grad_Wh)
