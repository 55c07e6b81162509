"""A frozen SchNet-style interaction in one autograd node (private; small systems, CPU, eager).

On a small molecule a SchNet-style call is a few hundred tiny operations, and the autograd
bookkeeping of each (views included) is a good part of it. With frozen weights (as calculators
run a model) and a small system, ``FrozenCFConv`` computes ``CFConvInteraction`` without
recording a graph and its backward as written out here, in about 30 operations for both.
``CFConvInteraction._reference`` is the oracle; the tests compare the two (values and
gradients, first and second order).

Forward (Schütt et al. 2018, Eq. 5 and Fig. 2; ssp(a) = softplus(a) - ln 2):

    W = (W_f2 ssp(W_f1 e(r) + b_f1) + b_f2) φ(r)                       [P, C]
    x = W_in h,   m_i = Σ_pairs W_ij ∘ x_j  (both directions)           [N, C]
    v = W_2 ssp(W_1 m + b_1) + b_2

Backward, from g = ∂L/∂v (ssp' = sigmoid):

    g_m = W_1ᵀ (σ(W_1 m + b_1) ∘ W_2ᵀ g),   g_W_p = g_m[i] ∘ x[j] + g_m[j] ∘ x[i]
    g_h = W_inᵀ Σ_pairs W_ij ∘ g_m[j] (both directions),   g_φ = <g_W, W / φ>
    g_e = W_f1ᵀ (σ(W_f1 e + b_f1) ∘ W_f2ᵀ (φ g_W))

When a graph of the backward is wanted (double backward) the gradients are taken through the
reference instead.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._frozen import reference_gradients

__all__ = ["FrozenCFConv"]


def _ssp_chain(mlp: nn.Module, h: Tensor) -> Tuple[Tensor, Tensor]:
    """A two-layer ssp ``MLP``: (output, the first layer's pre-activation)."""
    first, last = (m for m in mlp if type(m) is nn.Linear)
    a = F.linear(h, first.weight, first.bias)                                       # [*, C]
    return F.linear(F.softplus(a) - math.log(2.0), last.weight, last.bias), a       # [*, C]


def _ssp_chain_backward(mlp: nn.Module, grad: Tensor, a: Tensor) -> Tensor:
    """The input gradient of ``_ssp_chain`` (frozen weights). [*, D_in]"""
    first, last = (m for m in mlp if type(m) is nn.Linear)
    return ((grad @ last.weight) * torch.sigmoid(a)) @ first.weight                 # [*, D_in]


class FrozenCFConv(torch.autograd.Function):
    """``CFConvInteraction`` with frozen weights as one autograd node (module docstring).

    Shapes:
        node_feats [N, C], edge_radial [P, K], edge_envelope [P], pair_i [P], pair_j [P], layer  ->  [N, C]
    """

    @staticmethod
    def forward(ctx: Any, node_feats: Tensor, edge_radial: Tensor, edge_envelope: Tensor, pair_i: Tensor,
                pair_j: Tensor, layer: nn.Module) -> Tensor:
        P, C = pair_i.shape[0], node_feats.shape[1]
        raw_filters, filter_pre = _ssp_chain(layer.filter, edge_radial)             # [P, C]
        filters = raw_filters * edge_envelope[:, None]                              # [P, C]
        x = F.linear(node_feats, layer.linear_in.weight)                            # [N, C]
        messages = x.index_select(0, torch.cat([pair_j, pair_i]))                   # [2P, C]: to i, to j
        messages.view(2, P, C).mul_(filters)
        m = torch.zeros_like(x).index_add_(0, torch.cat([pair_i, pair_j]), messages)  # [N, C]
        out, update_pre = _ssp_chain(layer.update, m)                               # [N, C]
        ctx.layer = layer
        ctx.save_for_backward(node_feats, edge_radial, edge_envelope, pair_i, pair_j, raw_filters, filters,
                              filter_pre, x, update_pre)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (node_feats, edge_radial, edge_envelope, pair_i, pair_j, raw_filters, filters, filter_pre, x,
         update_pre) = ctx.saved_tensors
        layer, needs = ctx.layer, ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # a graph of the backward is wanted: through the reference
            return reference_gradients(lambda h, e, u: layer._reference(h, e, u, pair_i, pair_j),
                                       [node_feats, edge_radial, edge_envelope], needs, grad, num_args=6)
        P, C = pair_i.shape[0], node_feats.shape[1]
        grad_m = _ssp_chain_backward(layer.update, grad, update_pre)                # [N, C]
        grad_messages = grad_m.index_select(0, torch.cat([pair_i, pair_j]))         # [2P, C]
        grad_filters = (x.index_select(0, torch.cat([pair_j, pair_i])).mul_(grad_messages)
                        .view(2, P, C).sum(0))                                     # [P, C]
        grad_messages.view(2, P, C).mul_(filters)
        grad_x = torch.zeros_like(x).index_add_(0, torch.cat([pair_j, pair_i]), grad_messages)  # [N, C]
        grad_h = grad_x @ layer.linear_in.weight if needs[0] else None              # [N, C]
        grad_envelope = (grad_filters * raw_filters).sum(1) if needs[2] else None   # [P]
        grad_radial = (_ssp_chain_backward(layer.filter, grad_filters * edge_envelope[:, None], filter_pre)
                       if needs[1] else None)                                       # [P, K]
        return grad_h, grad_radial, grad_envelope, None, None, None
