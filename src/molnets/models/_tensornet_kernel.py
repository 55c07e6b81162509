"""Frozen TensorNet-style layers in one autograd node each (private; small systems, CPU, eager).

``TensorInteraction`` in plain operations records ~120 autograd nodes per layer, and its 3x3 products
are batched products of [N C] tiny matrices (~50 ns each): most of a call on a small molecule. With
frozen weights (as calculators run a model) on a small system, ``FrozenInteraction`` computes the
same forward without recording a graph and its backward as written out below, in about 40
operations, with every 3x3 product done "entry-major":
a stack of matrices stored as [9, L] (entry (a, b) of all L = N C matrices in one row), where
(P Q)_ab = Σ_k P_ak Q_kb is a product and two multiply-adds of rows that run along L.
Components [9, L] and entries [9, L] are one [9, 9] matrix product apart (the orthonormal basis
of ``layers.cartesian``). Everything that acts part by part (the I, A and S rows of the 9
components) does so on slices, never spreading a part's [.., 3, C] numbers over 9 rows first: the
filters on the per-pair rows (``layers._message_kernels.scale_parts``, ``sum_parts``) and the
channel maps (``_linear_by_part``: three matrix products with the part's rows stacked). The per-pair
temporaries [2P, 9, C] live in buffers reused from call to call (``_message_kernels.workspace``).
``TensorInteraction._reference`` is the oracle; the tests compare the two (values and
gradients, first and second order).

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

``FrozenEmbedding`` does the same for ``TensorEmbedding`` (its backward in its docstring). When a
graph of the backward is wanted (double backward, ``create_graph=True``), the gradients are taken
through the reference instead.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._frozen import reference_gradients
from ..layers._message_kernels import scale_parts, spread_over_rows, sum_parts, workspace
from ..layers.cartesian import PART_SLICES

__all__ = ["FrozenInteraction", "FrozenEmbedding"]

def _linear_by_part(components: Tensor, weight: Tensor, adjoint: bool = False) -> Tensor:
    """``TensorLinear``'s channel map on components [9, N, C] (or its adjoint, from [9, N, D]):
    the rows of each part through that part's matrix of ``weight`` [3, D, C], as three matrix
    products on the part's stacked rows (N, 3N and 5N of them). The layer's batched product over
    the 9 components reads each part's matrix once per component; here once per part (in float64
    on small molecules the weights' traffic is most of the product's time). -> [9, N, D or C]"""
    rows = components.shape[1]
    maps = weight if adjoint else weight.transpose(1, 2)                            # [3, in, out]
    out = components.new_empty(9, rows, maps.shape[2])
    for part, (a, b) in enumerate(PART_SLICES):
        torch.mm(components[a:b].reshape((b - a) * rows, -1), maps[part], out=out[a:b].view((b - a) * rows, -1))
    return out


def _dense_chain(layer: nn.Module, h: Tensor, pre_activations: List[Tensor]) -> Tensor:
    """SiLU after every dense layer of an ``MLP`` (SiLU between its layers, and after the last as
    the models apply it); the pre-activations are appended to ``pre_activations``. [*, D_out]"""
    for linear in layer:
        if type(linear) is nn.Linear:
            pre_activations.append(F.linear(h, linear.weight, linear.bias))         # [*, width]
            h = F.silu(pre_activations[-1])                                         # [*, width]
    return h


def _dense_chain_backward(layer: nn.Module, grad: Tensor, pre_activations: Sequence[Tensor]) -> Tensor:
    """The input gradient of ``_dense_chain`` from its output gradient (frozen weights). [*, D_in]"""
    linears = [m for m in layer if type(m) is nn.Linear]
    for linear, a in zip(reversed(linears), reversed(pre_activations)):
        grad = torch.ops.aten.silu_backward(grad, a) @ linear.weight                # [*, width in]
    return grad


def _product(P: Tensor, Q: Tensor) -> Tensor:
    """P Q for entry-major stacks of 3x3 matrices: [3, 3, L] views (strided ones: transposes).
    Σ_k P[:, k] Q[k, :] as a product and two multiply-adds of [3, 3, L] (a [3, 3, 3, L] product
    and a sum over k is 2.5x slower at L = 2688 in float64: a tensor three times larger). -> [9, L]"""
    out = torch.mul(P[:, 0:1], Q[0:1], out=P.new_empty(3, 3, P.shape[-1]))          # [3, 3, L]
    out.addcmul_(P[:, 1:2], Q[1:2]).addcmul_(P[:, 2:3], Q[2:3])
    return out.view(9, P.shape[-1])                                                 # [9, L]


def _anticommutator(P: Tensor, Q: Tensor) -> Tensor:
    """P Q + Q P, entry-major [3, 3, L] each. -> [9, L]"""
    return _product(P, Q) + _product(Q, P)                                          # [9, L]


def _matrices(entries: Tensor) -> Tensor:
    """[9, L] -> [3, 3, L] (a view)."""
    return entries.view(3, 3, entries.shape[-1])


def _transposed(entries: Tensor) -> Tensor:
    """The transposed matrices of [9, L] entries, as a [3, 3, L] view."""
    return _matrices(entries).transpose(0, 1)


def _normalized_gradient(grad: Tensor, X: Tensor, denominator: Tensor) -> Tensor:
    """The gradient with respect to X of X / d, d = ||X|| + 1 per matrix, from the one of the
    result; entry-major [9, L], d [L]. -> [9, L]"""
    inner = (grad * X).sum(0)                                                       # [L]
    return grad / denominator - (2 * inner / denominator.square()) * X             # [9, L]


class FrozenInteraction(torch.autograd.Function):
    """``TensorInteraction`` with frozen weights as one autograd node (module docstring).

    Shapes:
        X [N, C, 3, 3], edge_rbf [P, K], edge_envelope [P], pair_i [P], pair_j [P],
        self_weights [9, C] (f(0) spread over the components), layer  ->  [N, C, 3, 3]
    """

    @staticmethod
    def forward(ctx: Any, X: Tensor, edge_rbf: Tensor, edge_envelope: Tensor, pair_i: Tensor,
                pair_j: Tensor, self_weights: Tensor, layer: nn.Module) -> Tensor:
        (N, C), P = X.shape[:2], edge_rbf.shape[0]
        basis = layer.basis(X).flatten(1)                                           # [9, 9]: B_k over (a, b)
        pre_activations: List[Tensor] = []
        h = _dense_chain(layer.radial, edge_rbf, pre_activations)                   # [P, 3C]
        f = (h * edge_envelope[:, None]).view(P, 3, C)                              # [P, 3, C]
        X_norm = X.square().sum((-2, -1)).view(-1) + 1                              # [L], L = N C
        X_hat = X.reshape(-1, 9).T / X_norm                                         # [9, L] entries
        u = _linear_by_part(torch.mm(basis, X_hat).view(9, N, C), layer.linear_in.weight)  # [9, N, C]
        Y = torch.mm(basis.T, u.view(9, -1))                                        # [9, L] entries
        y = u.transpose(0, 1).contiguous()                                          # [N, 9, C]
        # both directions of every pair: one gather, one product, one sum
        messages = torch.index_select(y, 0, torch.cat([pair_j, pair_i]), out=workspace("messages", (2 * P, 9, C), y))
        scale_parts(messages.view(2, P, 9, C), f, PART_SLICES)                      # [2P, 9, C]
        M = torch.addcmul(torch.zeros_like(y).index_add_(0, torch.cat([pair_i, pair_j]), messages),
                          self_weights, y)                                          # [N, 9, C]
        M = torch.mm(basis.T, M.transpose(0, 1).reshape(9, -1))                     # [9, L] entries
        A = _anticommutator(_matrices(M), _matrices(Y))                             # [9, L]
        A_norm = A.square().sum(0) + 1                                              # [L]
        v = _linear_by_part(torch.mm(basis, A / A_norm).view(9, N, C), layer.linear_out.weight)
        D = torch.mm(basis.T, v.view(9, -1))                                        # [9, L] entries
        out = X_hat + D + _product(_matrices(D), _matrices(D))                      # [9, L]
        ctx.layer = layer
        ctx.save_for_backward(X, edge_rbf, edge_envelope, pair_i, pair_j, self_weights, basis, h, f,
                              X_norm, Y, y, M, A, A_norm, D, *pre_activations)
        return out.T.reshape(N, C, 3, 3)                                            # [N, C, 3, 3]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (X, edge_rbf, edge_envelope, pair_i, pair_j, self_weights, basis, h, f, X_norm, Y, y, M,
         A, A_norm, D, *pre_activations) = ctx.saved_tensors
        layer, needs = ctx.layer, ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # a graph of the backward is wanted: through the reference
            return reference_gradients(
                lambda X, e, u: layer._reference(X, e, u, pair_i, pair_j, self_weights),
                [X, edge_rbf, edge_envelope], needs, grad, num_args=7)
        (N, C), P = X.shape[:2], edge_rbf.shape[0]
        grad = grad.reshape(-1, 9).T                                                # [9, L] entries
        grad_D = grad + _anticommutator(_matrices(grad), _transposed(D))            # [9, L]
        grad_A = _linear_by_part(torch.mm(basis, grad_D).view(9, N, C), layer.linear_out.weight,
                                 adjoint=True)                                      # [9, N, C]
        grad_A = _normalized_gradient(torch.mm(basis.T, grad_A.view(9, -1)), A, A_norm)  # [9, L]
        grad_M = _anticommutator(_matrices(grad_A), _transposed(Y))                 # [9, L]
        grad_Y = _anticommutator(_transposed(M), _matrices(grad_A))                 # [9, L]
        grad_m = torch.mm(basis, grad_M).view(9, N, C).transpose(0, 1).contiguous()  # [N, 9, C]
        # the pair convolution's backward: gradients of the weights and of y (both directions)
        grad_messages = torch.index_select(grad_m, 0, torch.cat([pair_i, pair_j]), out=workspace("gathered", (2 * P, 9, C), y))
        products = torch.index_select(y, 0, torch.cat([pair_j, pair_i]), out=workspace("products", (2 * P, 9, C), y))
        products = products.mul_(grad_messages).view(2, P, 9, C)                    # [2, P, 9, C]
        products = torch.add(products[0], products[1], out=workspace("summed", (P, 9, C), y))  # [P, 9, C]
        grad_f = sum_parts(products, PART_SLICES)                                   # [P, 3, C]
        scale_parts(grad_messages.view(2, P, 9, C), f, PART_SLICES)                 # [2P, 9, C]
        grad_y = torch.addcmul(torch.zeros_like(y).index_add_(0, torch.cat([pair_j, pair_i]), grad_messages),
                               self_weights, grad_m)                                # [N, 9, C]
        grad_u = torch.addmm(grad_y.transpose(0, 1).reshape(9, -1), basis, grad_Y)  # [9, L] components
        grad_X_hat = _linear_by_part(grad_u.view(9, N, C), layer.linear_in.weight, adjoint=True)
        grad_X_hat = torch.addmm(grad, basis.T, grad_X_hat.view(9, -1))             # [9, L] entries
        grad_X = _normalized_gradient(grad_X_hat, X.reshape(-1, 9).T, X_norm)       # [9, L]
        grad_f = grad_f.view(P, 3 * C)                                              # [P, 3C]
        grad_envelope = (grad_f * h).sum(1) if needs[2] else None                   # [P]
        grad_rbf = _dense_chain_backward(layer.radial, grad_f * edge_envelope[:, None], pre_activations)
        return (grad_X.T.reshape(N, C, 3, 3) if needs[0] else None, grad_rbf if needs[1] else None,
                grad_envelope, None, None, None, None)


class FrozenEmbedding(torch.autograd.Function):
    """``TensorEmbedding`` with frozen weights as one autograd node (paper Eqs. 4-6):

        X_i = Σ_pairs Z_ij ∘ f_ij ∘ c(r̂_ij) (+ the message to j with Z_ji and c(-r̂_ij)) + f_I(0) Z_ii δ
        out = gates ∘ L(X),   gates = SiLU(MLP(LayerNorm(||X||)))

    (c(r̂): ``DirectionComponents``, f = φ W_f e(r) + b_f). Backward, from g = ∂L/∂out in
    components (v = L(X), s = the gates spread over the components):

        g_s = g ∘ v,   g_X = Lᵀ(g ∘ s) + 2 X (LayerNorm and MLP backward of Σ_parts g_s)
        g_c(pair e) = Σ_C G_e ∘ w_e,   g_w(pair e) = Σ_(rows of a part) c_e G_e   (G_e = g_X at
        the receiving atom), then through f to e(r) and φ, and through c(r̂) to r̂.

    The species terms Z do not depend on the geometry: no gradient is formed for them.

    Shapes:
        edge_rbf [P, K], edge_envelope [P], edge_unit [P, 3], species [N], pair_i [P], pair_j [P],
        self_rbf [1, K], layer  ->  [N, C, 3, 3]
    """

    @staticmethod
    def forward(ctx: Any, edge_rbf: Tensor, edge_envelope: Tensor, edge_unit: Tensor, species: Tensor,
                pair_i: Tensor, pair_j: Tensor, self_rbf: Tensor, layer: nn.Module) -> Tensor:
        N, P, C = species.shape[0], edge_rbf.shape[0], layer.num_channels
        basis = layer.basis(edge_rbf).flatten(1)                                    # [9, 9]
        z = layer.species_embedding(species)                                        # [N, C]
        z_receiver, z_sender = layer.pair_receiver(z), layer.pair_sender(z)         # [N, C]
        pairs = torch.cat([pair_i, pair_j])                                         # [2P]: receiving atoms
        z_pair = z_receiver.index_select(0, pairs) + z_sender.index_select(0, torch.cat([pair_j, pair_i]))  # [2P, C]
        radial = F.linear(edge_rbf, layer.radial.weight, layer.radial.bias)         # [P, 3C]
        f = (radial * edge_envelope[:, None]).view(P, 3, C)                         # [P, 3, C]
        geometry = layer.direction(edge_unit)                                       # [P, 9]
        geometry = torch.cat([geometry, geometry * layer.component_parity])         # [2P, 9]: to i, to j
        weights = torch.mul(f, z_pair.view(2, P, 1, C)).view(2 * P, 3, C)           # [2P, 3, C]
        messages = scale_parts(geometry[:, :, None], weights, PART_SLICES, out=workspace("messages", (2 * P, 9, C), f))  # [2P, 9, C]
        X = torch.zeros(N, 9, C, dtype=f.dtype, device=f.device).index_add_(0, pairs, messages)  # [N, 9, C]
        self_scalar = F.linear(self_rbf, layer.radial.weight[:C], layer.radial.bias[:C]) * (z_receiver + z_sender)
        X[:, 0] += math.sqrt(3.0) * self_scalar                                     # + s δ: c_0(δ) = √3
        X = X.transpose(0, 1)                                                       # [9, N, C] components
        norm = X.square().sum(0)                                                    # [N, C] = ||X||
        normalized, mean, rstd = torch.native_layer_norm(norm, [C], layer.norm.weight, layer.norm.bias,
                                                         layer.norm.eps)            # [N, C]
        pre_activations: List[Tensor] = []
        gates = _dense_chain(layer.gates, normalized, pre_activations)              # [N, 3C]
        scales = spread_over_rows(gates.view(N, 3, C), PART_SLICES).transpose(0, 1)  # [9, N, C]
        v = _linear_by_part(X, layer.linear.weight)                                 # [9, N, C]
        out = torch.mm(basis.T, (v * scales).view(9, -1))                           # [9, L] entries
        ctx.layer, ctx.constants = layer, (species, self_rbf)  # no gradient; pair_i, pair_j are saved
        ctx.save_for_backward(edge_rbf, edge_envelope, edge_unit, pair_i, pair_j, basis, z_pair, radial, geometry,
                              weights, X, norm, mean, rstd, scales, v, *pre_activations)
        return out.T.reshape(N, C, 3, 3)                                            # [N, C, 3, 3]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (edge_rbf, edge_envelope, edge_unit, pair_i, pair_j, basis, z_pair, radial, geometry, weights, X, norm,
         mean, rstd, scales, v, *pre_activations) = ctx.saved_tensors
        layer, needs = ctx.layer, ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # a graph of the backward is wanted: through the reference
            species, self_rbf = ctx.constants
            return reference_gradients(
                lambda e, u, r: layer._reference(species, e, u, r, pair_i, pair_j, self_rbf),
                [edge_rbf, edge_envelope, edge_unit], needs, grad, num_args=8)
        (_, N, C), P = X.shape, edge_rbf.shape[0]
        grad = torch.mm(basis, grad.reshape(-1, 9).T).view(9, N, C)                 # [9, N, C] components
        grad_gates = sum_parts((grad * v).transpose(0, 1), PART_SLICES).view(N, 3 * C)  # [N, 3C]
        grad_normalized = _dense_chain_backward(layer.gates, grad_gates, pre_activations)  # [N, C]
        grad_norm = torch.ops.aten.native_layer_norm_backward(
            grad_normalized, norm, [C], mean, rstd, layer.norm.weight, layer.norm.bias, [True, False, False])[0]
        grad_X = _linear_by_part(grad * scales, layer.linear.weight, adjoint=True)  # [9, N, C]
        grad_X = torch.addcmul(grad_X, X, grad_norm, value=2.0).transpose(0, 1)     # [N, 9, C]
        # the scatter of outer products: G_e = grad_X at each pair's receiving atom (both directions)
        G = torch.index_select(grad_X, 0, torch.cat([pair_i, pair_j]), out=workspace("gathered", (2 * P, 9, C), grad_X))
        grad_geometry = scale_parts(G, weights, PART_SLICES, out=workspace("products", (2 * P, 9, C), grad_X)).sum(2)  # [2P, 9]
        grad_geometry = torch.addcmul(grad_geometry[:P], layer.component_parity, grad_geometry[P:])  # [P, 9]
        grad_weights = sum_parts(G.mul_(geometry[:, :, None]), PART_SLICES)        # [2P, 3, C]
        grad_f = (grad_weights.mul_(z_pair[:, None]).view(2, P, 3 * C).sum(0))      # [P, 3C]
        grad_envelope = (grad_f * radial).sum(1) if needs[1] else None              # [P]
        grad_rbf = (grad_f * edge_envelope[:, None]) @ layer.radial.weight if needs[0] else None  # [P, K]
        grad_unit = None
        if needs[2]:  # c(r̂) = c_0 + [r̂, r̂ r̂ᵀ] K: back through the constant matrix K [12, 9]
            grad_terms = grad_geometry @ layer.direction.coefficients.T                # [P, 12]
            grad_outer = grad_terms[:, 3:].view(P, 3, 3)                               # [P, 3, 3]
            grad_unit = grad_terms[:, :3] + torch.bmm(grad_outer + grad_outer.transpose(1, 2),
                                                      edge_unit[:, :, None]).squeeze(2)  # [P, 3]
        return grad_rbf, grad_envelope, grad_unit, None, None, None, None, None
