"""Frozen SchNet-style interactions in one autograd node (private; small systems, CPU, eager).

On a molecule of 9-21 atoms every tensor of the model has a few hundred rows, and a call is some
300 small torch operations (forward, backward and their autograd nodes) of a few µs each: most
of the time is their fixed cost, not arithmetic. When the weights are frozen (as calculators run
a model: forces need gradients with respect to the geometry only), ``FrozenInteractions`` takes
the edge vectors to the node features after the last interaction block without recording a
graph, and its backward is written out below: about half the operations, and none of autograd's
per-operation bookkeeping. It also evaluates the first dense layer of every block's filter
network as one matrix product (the filters depend on the distances only, not on the node
features). ``SchNet._interactions`` is the oracle; the tests compare the two (values and
gradients, first and second order).

Forward (``schnet`` module docstring; ssp(x) = softplus(x) - ln 2, whose shift is folded into
the next dense layer's bias, ``layers.mlp._bias_after_ssp``), for blocks t = 1..T:

    r = ||v||,   e = e(r) [P, K],   u = u(r) [P]
    a = W_1 e + b_1  (all T filter networks' first layers stacked: [P, T C])
    W_t(r) = (W_2,t softplus(a_t) + b'_2,t) u                                        [P, C]
    x = W_in,t h,   m_i = Σ_pairs W_t(r_ij) ∘ x_j (both directions)                   [N, C]
    h <- h + U_2,t softplus(U_1,t m + c_1,t) + c'_2,t

Backward, from g = ∂L/∂h_T (σ the logistic sigmoid, softplus' = σ), block by block in reverse:

    g_m = U_1ᵀ (σ(U_1 m + c_1) ∘ U_2ᵀ g),   g_W(pair ij) = g_m[i] ∘ x_j + g_m[j] ∘ x_i
    g <- g + W_inᵀ Σ_pairs W_t ∘ g_m (both directions)
    g_u += Σ_c g_W ∘ W_2 softplus(a_t) + b'_2,   g_(a_t) = σ(a_t) ∘ W_2ᵀ (u g_W)
    g_r = Σ_k (W_1ᵀ g_a)_k de_k/dr + g_u du/dr,   g_v = g_r v / r
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._frozen import reference_gradients
from ..layers.mlp import MLP, ShiftedSoftplus, _bias_after_ssp
from ..layers.radial import CosineEnvelope, GaussianBasis

__all__ = ["FrozenInteractions", "KernelWeights", "kernel_supports", "arranged_weights"]

_SSP_MLP = [nn.Linear, ShiftedSoftplus, nn.Linear]


def kernel_supports(model: nn.Module) -> bool:
    """Whether ``model`` (a SchNet) is made of the modules the kernel reads: a ``GaussianBasis``,
    a ``CosineEnvelope`` and blocks whose filter and update networks are two dense layers around
    a shifted softplus (a subclass that swaps one of them runs its own modules). Types only."""
    from .schnet import CFConvInteraction  # (schnet imports this module)

    return (type(model.radial) is GaussianBasis and type(model.envelope) is CosineEnvelope
            and all(type(block) is CFConvInteraction and _is_ssp_mlp(block.filter) and _is_ssp_mlp(block.update)
                    for block in model.interactions))


def _is_ssp_mlp(network: nn.Module) -> bool:
    return type(network) is MLP and [type(m) for m in network._modules.values()] == _SSP_MLP


class _Block(NamedTuple):
    """One interaction block's weights as the kernel reads them: each dense map W [out, in] with
    its transpose (a view), the biases after a shifted softplus with its shift folded in."""

    filter_out: Tensor        # W_2 [C, C]
    filter_out_t: Tensor
    filter_bias: Tensor       # b'_2 [C]
    linear_in: Tensor         # W_in [C, C]
    linear_in_t: Tensor
    update_in: Tensor         # U_1 [C, C]
    update_in_t: Tensor
    update_in_bias: Tensor    # c_1 [C]
    update_out: Tensor        # U_2 [C, C]
    update_out_t: Tensor
    update_bias: Tensor       # c'_2 [C]


class KernelWeights(NamedTuple):
    """The weights of ``FrozenInteractions`` (``arranged_weights``)."""

    first: Tensor             # W_1 of every block's filter network, stacked [T C, K]
    first_t: Tensor
    first_bias: Tensor        # b_1 [T C]
    blocks: Tuple[_Block, ...]


def arranged_weights(model: nn.Module) -> KernelWeights:
    """The weights as the kernel reads them, built once while frozen (``molnets._frozen``): the
    first layers of all filter networks stacked, every dense map with its transpose, and the
    shift of each shifted softplus folded into the next layer's bias (``layers.mlp._bias_after_ssp``)."""
    first = torch.cat([block.filter[0].weight for block in model.interactions])           # [T C, K]
    blocks = tuple(
        _Block(b.filter[2].weight, b.filter[2].weight.T, _bias_after_ssp(b.filter[2]),
               b.linear_in.weight, b.linear_in.weight.T,
               b.update[0].weight, b.update[0].weight.T, b.update[0].bias,
               b.update[2].weight, b.update[2].weight.T, _bias_after_ssp(b.update[2]))
        for b in model.interactions)
    return KernelWeights(first, first.T, torch.cat([block.filter[0].bias for block in model.interactions]), blocks)


class FrozenInteractions(torch.autograd.Function):
    """A SchNet's T interaction blocks with frozen weights as one autograd node (module docstring).

    Shapes:
        edge_vec [P, 3] (Å, one edge per pair), h [N, C], pair_i [P], pair_j [P], model,
        weights (``arranged_weights(model)``)  ->  [N, C]
    """

    @staticmethod
    def forward(ctx: Any, edge_vec: Tensor, h: Tensor, pair_i: Tensor, pair_j: Tensor, model: nn.Module,
                weights: KernelWeights) -> Tensor:
        (N, C), P = h.shape, edge_vec.shape[0]
        inputs = h
        lengths = torch.linalg.vector_norm(edge_vec, dim=1)                             # [P]
        radial, radial_slope = model.radial.with_derivative(lengths)                     # [P, K]
        envelope, envelope_slope = model.envelope.with_derivative(lengths)               # [P]
        first = torch.addmm(weights.first_bias, radial, weights.first_t)                 # [P, T C]
        hidden = F.softplus(first)                                                       # [P, T C]
        receiving, sending = torch.cat([pair_i, pair_j]), torch.cat([pair_j, pair_i])    # [2P]: both directions
        saved: List[Tensor] = []
        for t, w in enumerate(weights.blocks):
            unscaled = torch.addmm(w.filter_bias, hidden[:, t * C:(t + 1) * C], w.filter_out_t)  # [P, C]
            filters = unscaled * envelope[:, None]                                       # [P, C]
            sources = torch.mm(h, w.linear_in_t).index_select(0, sending)                # [2P, C]: x_j, x_i
            products = sources.view(2, P, C) * filters                                   # [2, P, C]
            messages = torch.zeros_like(h).index_add_(0, receiving, products.view(2 * P, C))  # [N, C]
            update = torch.addmm(w.update_in_bias, messages, w.update_in_t)              # [N, C]
            h = torch.addmm(h, F.softplus(update), w.update_out_t).add_(w.update_bias)   # [N, C]
            saved += [unscaled, filters, sources, update]
        ctx.model, ctx.weights = model, weights
        ctx.save_for_backward(edge_vec, inputs, pair_i, pair_j, lengths, radial_slope, envelope, envelope_slope,
                              first, receiving, sending, *saved)
        return h

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (edge_vec, inputs, pair_i, pair_j, lengths, radial_slope, envelope, envelope_slope, first, receiving, sending,
         *saved) = ctx.saved_tensors
        model, weights, needs = ctx.model, ctx.weights, ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # a graph of the backward is wanted: through the reference
            return reference_gradients(lambda v, h: model._interactions(v, h, pair_i, pair_j),
                                       [edge_vec, inputs], needs, grad, num_args=6)
        (N, C), P = grad.shape, edge_vec.shape[0]
        grad_envelope = torch.zeros_like(envelope)                                       # [P]
        grad_hidden: List[Tensor] = []
        for t in reversed(range(len(weights.blocks))):
            w, (unscaled, filters, sources, update) = weights.blocks[t], saved[4 * t:4 * t + 4]
            grad_update = torch.ops.aten.softplus_backward(torch.mm(grad, w.update_out), update, 1.0, 20.0)
            grad_messages = torch.mm(grad_update, w.update_in).index_select(0, receiving).view(2, P, C)
            grad_filters = torch.mul(grad_messages[0], sources[:P]).addcmul_(grad_messages[1], sources[P:])  # [P, C]
            grad_sources = grad_messages.mul_(filters).view(2 * P, C)                    # [2P, C]
            grad_x = torch.zeros_like(grad).index_add_(0, sending, grad_sources)         # [N, C]
            grad = torch.addmm(grad, grad_x, w.linear_in)                                # [N, C]: + the residual
            grad_envelope += (grad_filters * unscaled).sum(1)                            # [P]
            grad_hidden.append(torch.mm(grad_filters.mul_(envelope[:, None]), w.filter_out))  # [P, C]
        grad_first = torch.ops.aten.softplus_backward(torch.cat(grad_hidden[::-1], 1), first, 1.0, 20.0)  # [P, T C]
        grad_lengths = (torch.mm(grad_first, weights.first) * radial_slope).sum(1).addcmul_(grad_envelope, envelope_slope)
        # d||v||/dv = v / ||v||, 0 at v = 0 (as torch's norm backward)
        grad_vec = edge_vec * grad_lengths.div_(lengths).masked_fill_(lengths == 0, 0.0)[:, None]  # [P, 3]
        return (grad_vec if needs[0] else None, grad if needs[1] else None, None, None, None, None)
