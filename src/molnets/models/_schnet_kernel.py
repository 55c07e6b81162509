"""A frozen SchNet-style model in one autograd node (private; small molecules, CPU, eager).

On a molecule of 9-21 atoms every tensor of the model has a few hundred rows, and a call is some
250 small torch operations (forward, backward and their autograd nodes) of a few µs each: most
of the time is their fixed cost, not arithmetic (a 3-atom molecule at 1 channel costs 0.8 ms of
the 1.3 ms of ethanol at 128). When the weights are frozen (as calculators run a model: forces
need gradients with respect to the geometry only), ``FrozenSchNet`` takes positions and cell to
the per-atom energies without recording a graph, and its backward is written out below: far
fewer operations, and none of autograd's per-operation bookkeeping. The filter networks depend
on the distances only, so all T of them run together (their first layers as one matrix product,
their second as one batched product), and on a molecule within a few cutoffs the pair filters
are one dense [T, N, N, C] array, so that a block's messages are one product and one sum instead
of a gather and a scatter of the pairs; where the compiled kernels run (``molnets._native``) the
messages and their gradients are instead one pass over the pairs each (no dense array).
``SchNet._energies`` is the oracle; the tests compare the two (values and gradients, first and
second order).

Forward (``schnet`` module docstring; ssp(x) = softplus(x) - ln 2, whose shift is folded into
the next dense layer's bias, ``layers.mlp._bias_after_ssp``), for blocks t = 1..T:

    v = x_j - x_i + S cell (``graph.edge_vectors``),   r = ||v||,   e = e(r) [P, K],   u = u(r) [P]
    a = W_1 e + b_1  (the T filter networks' first layers stacked: [P, T C])
    W_t(r) = (W_2,t softplus(a_t) + b'_2,t) u                                        [T, P, C]
    x = W_in,t h,   m_i = Σ_j W_t[i, j] ∘ x_j  (W_t dense, both directions)           [N, C]
    h <- h + U_2,t softplus(U_1,t m + c_1,t) + c'_2,t
    E_i = s w_o · softplus(H h + b_H) + (s b'_o + shift + E0[s_i])                     [N]

The update biases are carried rather than added: the kernel's h' = h - β_t, β_t = Σ_(s<t) c'_2,s
(the same for every atom), enters each linear map with its share as a bias (W_in h = W_in h' +
W_in β_t, and H β_T in b_H), one operation fewer per block. On a molecule (no pair with a
periodic shift) the edge vectors are x_j - x_i without the cell.

Backward, from g = ∂L/∂E (σ the logistic sigmoid, softplus' = σ); g_h = Hᵀ (σ(H h + b_H) ∘
s w_o g), then block by block in reverse:

    g_m = U_1ᵀ (σ(U_1 m + c_1) ∘ U_2ᵀ g_h),   g_W,t[i, j] = g_m[i] ∘ x_j
    g_h <- g_h + W_inᵀ Σ_i W_t[i, j] ∘ g_m[i]

and for all T filter networks at once (g_W of a pair: its two entries of the dense array):

    g_u = Σ_t,c g_W,t ∘ (W_2,t softplus(a_t) + b'_2,t),   g_(a_t) = σ(a_t) ∘ W_2,tᵀ (u g_W,t)
    g_r = Σ_k (W_1ᵀ g_a)_k de_k/dr + g_u du/dr,   g_v = g_r v / r

and g_v to positions and cell by ``graph.edge_vectors_backward``.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import _native
from .._frozen import parameters_of, reference_gradients
from ..graph import AtomicGraph, edge_vectors, edge_vectors_backward
from ..layers._message_kernels import native_convolution, native_convolution_backward
from ..layers.mlp import MLP, ShiftedSoftplus, _bias_after_ssp
from ..layers.radial import CosineEnvelope, GaussianBasis
from ..layers.readout import AtomicReferenceEnergies, EnergyHead, ScaleShift

__all__ = ["FrozenSchNet", "KernelWeights", "kernel_inputs", "arranged_weights", "dense_enough"]

_SSP_MLP = [nn.Linear, ShiftedSoftplus, nn.Linear]
_ONE_PART = ((0, 1),)


def kernel_inputs(model: nn.Module) -> Optional[List[Tensor]]:
    """The parameters and buffers ``FrozenSchNet`` reads from ``model`` (a SchNet), or None when
    the model is not made of the modules the kernel knows (a subclass that swaps one runs its
    own): a ``GaussianBasis``, a ``CosineEnvelope``, blocks whose filter and update networks are
    two dense layers around a shifted softplus, such an ``EnergyHead``, a ``ScaleShift`` and
    ``AtomicReferenceEnergies``. Types and dictionaries only: a fixed cost of every call."""
    from .schnet import CFConvInteraction  # (schnet imports this module)

    modules = model._modules
    head, scale_shift, reference = modules["head"], modules["scale_shift"], modules["reference_energies"]
    if not (type(modules["radial"]) is GaussianBasis and type(modules["envelope"]) is CosineEnvelope
            and type(head) is EnergyHead and _is_ssp_mlp(head._modules["mlp"])
            and type(scale_shift) is ScaleShift and type(reference) is AtomicReferenceEnergies):
        return None
    networks = [head._modules["mlp"]]
    linears = []
    for block in modules["interactions"]._modules.values():
        if type(block) is not CFConvInteraction:
            return None
        parts = block._modules
        if not (_is_ssp_mlp(parts["filter"]) and _is_ssp_mlp(parts["update"])):
            return None
        networks += [parts["filter"], parts["update"]]
        linears.append(parts["linear_in"])
    found = parameters_of(modules["embedding"]) + [p for p in modules["radial"]._parameters.values() if p is not None]
    for network in networks:
        for layer in network._modules.values():
            found += [p for p in layer._parameters.values() if p is not None]
    buffers = scale_shift._buffers
    return found + [linear._parameters["weight"] for linear in linears] + [
        buffers["scale"], buffers["shift"], reference._buffers["energies"]]


# The largest dense pair array of one block [N, N, C] the kernel builds. Measured (A/B against the
# reference in one process): ethanol and aspirin (83-452 KB in float64) 1.3-1.45x, 32 atoms of Cu
# within 5 Å 1.09x in float32 (524 KB) but 0.95x in float64 (1 MB).
DENSE_MAX_BYTES = 768 << 10


# Dense pair arrays [T, N, N, C] of fewer numbers than this run as such even where the compiled
# convolution could (A/B in one process, best call: ethanol, 31 thousand numbers, float32 0.74 ms
# dense against 0.76 compiled, the compiled calls' fixed cost; aspirin, 169 thousand, 1.64 -> 1.39)
NATIVE_MIN_DENSE_NUMEL = 1 << 16


def dense_enough(num_atoms: int, num_pairs: int, num_channels: int, itemsize: int) -> bool:
    """Whether the kernel's dense pair arrays pay: they hold at most twice the numbers of the pair
    messages (N^2 <= 4P: [N, N, C] against [2P, C] per block, a molecule within a few cutoffs)
    and one block's array stays within ``DENSE_MAX_BYTES``. There the dense products beat
    gathers and scatters of the pairs (ethanol: 2x, forward). Elsewhere the reference runs: the
    kernel with gathered and scattered pairs instead measured 0.89-0.97x the reference (with its
    fused pair kernels) on 32-108 atoms of Cu. Shapes only."""
    return (num_atoms * num_atoms <= 4 * num_pairs
            and num_atoms * num_atoms * num_channels * itemsize <= DENSE_MAX_BYTES)


def _is_ssp_mlp(network: nn.Module) -> bool:
    return type(network) is MLP and [type(m) for m in network._modules.values()] == _SSP_MLP


class _Block(NamedTuple):
    """One interaction block's node-side weights: each dense map W [out, in] with its transpose
    (a view), the bias after a shifted softplus with its shift folded in."""

    linear_in: Tensor         # W_in [C, C]
    linear_in_t: Tensor
    update_in: Tensor         # U_1 [C, C]
    update_in_t: Tensor
    update_in_bias: Tensor    # c_1 [C]
    update_out: Tensor        # U_2 [C, C]
    update_out_t: Tensor
    linear_in_bias: Tensor    # W_in β_t [C]: the update biases of the blocks before (module docstring)


class KernelWeights(NamedTuple):
    """The weights of ``FrozenSchNet`` (``arranged_weights``)."""

    first: Tensor             # W_1 of every block's filter network, stacked [T C, K]
    first_t: Tensor
    first_bias: Tensor        # b_1 [T C]
    second: Tensor            # W_2 of every filter network [T, C, C]
    second_t: Tensor
    second_bias: Tensor       # b'_2 [T, 1, C]
    blocks: Tuple[_Block, ...]
    head: Tensor              # H [C_h, C]
    head_t: Tensor
    head_bias: Tensor         # b_H [C_h]
    head_out: Tensor          # s w_o [C_h]: times the energy scale s
    species_bias: Tensor      # s b'_o + shift + E0 [S]: the per-atom energy's constant, by species


def arranged_weights(model: nn.Module) -> KernelWeights:
    """The weights as the kernel reads them, built once while frozen (``molnets._frozen``): the
    filter networks' layers stacked, every dense map with its transpose, the shift of each
    shifted softplus folded into the next layer's bias (``layers.mlp._bias_after_ssp``), the
    update biases carried into the next maps (module docstring), and the energy scale, shift and
    reference energies folded into the head's last layer."""
    filters = [block.filter for block in model.interactions]
    scale, shift = model.scale_shift.scale, model.scale_shift.shift
    first = torch.cat([f[0].weight for f in filters])                                     # [T C, K]
    second = torch.stack([f[2].weight for f in filters])                                  # [T, C, C]
    blocks, carried = [], 0.0  # β_t: the update biases so far
    for b in model.interactions:
        blocks.append(_Block(b.linear_in.weight, b.linear_in.weight.T, b.update[0].weight, b.update[0].weight.T,
                             b.update[0].bias, b.update[2].weight, b.update[2].weight.T,
                             (b.linear_in.weight * carried).sum(1)))
        carried = carried + _bias_after_ssp(b.update[2])
    head = model.head.mlp
    return KernelWeights(first, first.T, torch.cat([f[0].bias for f in filters]),
                         second, second.transpose(1, 2), torch.stack([_bias_after_ssp(f[2]) for f in filters])[:, None],
                         tuple(blocks), head[0].weight, head[0].weight.T, head[0].bias + (head[0].weight * carried).sum(1),
                         scale * head[2].weight[0],
                         scale * _bias_after_ssp(head[2]) + shift + model.reference_energies.energies)


class FrozenSchNet(torch.autograd.Function):
    """A SchNet with frozen weights as one autograd node, from positions and cell to per-atom
    energies (module docstring).

    Shapes:
        positions [N, 3] (Å), cell [B, 3, 3] (Å), pair_graph (``half_edge_graph``: P pairs; its
        own positions and cell are not read), species [N], model, weights
        (``arranged_weights(model)``)  ->  [N], eV
    """

    @staticmethod
    def forward(ctx: Any, positions: Tensor, cell: Tensor, pair_graph: AtomicGraph, species: Tensor,
                model: nn.Module, weights: KernelWeights) -> Tensor:
        pair_i, pair_j = pair_graph.receivers, pair_graph.senders                         # [P]
        if pair_graph.shifts.any():  # a periodic image among the pairs (eager: a host sync is fine)
            edge_vec = edge_vectors(pair_graph._replace(positions=positions, cell=cell))  # [P, 3]
        else:
            edge_vec = positions.index_select(0, pair_j) - positions.index_select(0, pair_i)  # [P, 3]
        h = model.embedding(species)                                                     # [N, C]
        (N, C), P, T = h.shape, edge_vec.shape[0], len(weights.blocks)
        lengths = torch.linalg.vector_norm(edge_vec, dim=1)                             # [P]
        radial, radial_slope = model.radial.with_derivative(lengths)                     # [P, K]
        envelope, envelope_slope = model.envelope.with_derivative(lengths)               # [P]
        first = torch.addmm(weights.first_bias, radial, weights.first_t)                 # [P, T C]
        hidden = F.softplus(first).view(P, T, C).transpose(0, 1)                         # [T, P, C]
        unscaled = torch.baddbmm(weights.second_bias, hidden, weights.second_t)          # [T, P, C]
        filters = unscaled * envelope[:, None]                                           # [T, P, C]
        # the convolution in one pass over the pairs, compiled, unless the dense arrays are tiny
        native = T * N * N * C >= NATIVE_MIN_DENSE_NUMEL and _native.applies(filters)
        if native:
            ij = ji = dense = filters                                                    # (saved, unused)
        else:
            # W_t as a dense [N, N, C] array, both directions of every pair (and the images of a
            # periodic system summed): m = Σ_j W[i, j] ∘ x_j is then one product and one sum
            ij, ji = pair_i * N + pair_j, pair_j * N + pair_i                            # [P]: flat (i, j), (j, i)
            dense = filters.new_zeros(T, N * N, C).index_add_(1, ij, filters).index_add_(1, ji, filters)
            dense = dense.view(T, N, N, C)                                               # [T, N, N, C]
        saved: List[Tensor] = []
        for t, w in enumerate(weights.blocks):
            x = torch.addmm(w.linear_in_bias, h, w.linear_in_t)                          # [N, C]
            if native:
                messages = native_convolution(filters[t].view(P, 1, C), x.view(N, 1, C), pair_i, pair_j, _ONE_PART,
                                              x.new_zeros(N, 1, C)).view(N, C)           # [N, C]
            else:
                messages = (dense[t] * x).sum(1)                                         # [N, C]
            update = torch.addmm(w.update_in_bias, messages, w.update_in_t)              # [N, C]
            h = torch.addmm(h, F.softplus(update), w.update_out_t)                       # [N, C]: h' (β carried)
            saved += [x, update]
        head = torch.addmm(weights.head_bias, h, weights.head_t)                         # [N, C_h]
        energies = torch.addmv(weights.species_bias.index_select(0, species), F.softplus(head), weights.head_out)  # [N]
        ctx.model, ctx.weights, ctx.pair_graph, ctx.native = model, weights, pair_graph, native
        ctx.save_for_backward(positions, cell, species, edge_vec, lengths, radial_slope, envelope, envelope_slope,
                              first, unscaled, ij, ji, dense, head, *saved)
        return energies                                                                  # [N]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (positions, cell, species, edge_vec, lengths, radial_slope, envelope, envelope_slope, first, unscaled, ij, ji,
         dense, head, *saved) = ctx.saved_tensors
        model, weights, pair_graph, needs = ctx.model, ctx.weights, ctx.pair_graph, ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # a graph of the backward is wanted: through the reference
            return reference_gradients(
                lambda positions, cell: model._energies(pair_graph._replace(positions=positions, cell=cell), species),
                [positions, cell], needs, grad, num_args=6)
        (N, C), T, P = saved[0].shape, len(weights.blocks), edge_vec.shape[0]
        pair_i, pair_j = pair_graph.receivers, pair_graph.senders                         # [P]
        grad_head = torch.ops.aten.softplus_backward(torch.outer(grad, weights.head_out), head, 1.0, 20.0)  # [N, C_h]
        grad = torch.mm(grad_head, weights.head)                                         # [N, C]
        if ctx.native:
            grad_filters = unscaled.new_empty(T, P, C)                                   # [T, P, C]
        else:
            grad_dense = torch.empty_like(dense)                                         # [T, N, N, C]
        for t in reversed(range(T)):
            w, (x, update) = weights.blocks[t], saved[2 * t:2 * t + 2]
            grad_update = torch.ops.aten.softplus_backward(torch.mm(grad, w.update_out), update, 1.0, 20.0)  # [N, C]
            grad_messages = torch.mm(grad_update, w.update_in)                           # [N, C]
            if ctx.native:
                grad_x = grad_messages.new_zeros(N, 1, C)
                native_convolution_backward(grad_messages.view(N, 1, C), dense[t].view(P, 1, C), x.view(N, 1, C),
                                            pair_i, pair_j, _ONE_PART, grad_x, grad_filters[t].view(P, 1, C))
                grad_x = grad_x.view(N, C)
            else:
                torch.mul(grad_messages[:, None], x, out=grad_dense[t])                  # [N, N, C]
                # Σ_i W[i, j] g_m[i] = Σ_i W[j, i] g_m[i]: W is symmetric (both directions of every
                # pair), and a sum over the inner pair axis is 2x faster than over the outer one
                grad_x = (dense[t] * grad_messages).sum(1)                               # [N, C]
            grad = torch.addmm(grad, grad_x, w.linear_in)                                # [N, C]: + the residual
        if not ctx.native:
            grad_dense = grad_dense.view(T, N * N, C)                                    # [T, N N, C]
            grad_filters = grad_dense.index_select(1, ij).add_(grad_dense.index_select(1, ji))  # [T, P, C]
        grad_envelope = (grad_filters * unscaled).sum((0, 2))                            # [P]
        grad_hidden = torch.bmm(grad_filters.mul_(envelope[:, None]), weights.second)    # [T, P, C]
        grad_first = torch.ops.aten.softplus_backward(
            grad_hidden.transpose(0, 1).reshape(P, T * C), first, 1.0, 20.0)             # [P, T C]
        grad_lengths = (torch.mm(grad_first, weights.first) * radial_slope).sum(1).addcmul_(
            grad_envelope, envelope_slope)                                               # [P]
        # d||v||/dv = v / ||v||, 0 at v = 0 (as torch's norm backward)
        grad_vec = edge_vec * grad_lengths.div_(lengths).masked_fill_(lengths == 0, 0.0)[:, None]  # [P, 3]
        return edge_vectors_backward(pair_graph, grad_vec, *needs) + (None, None, None, None)
