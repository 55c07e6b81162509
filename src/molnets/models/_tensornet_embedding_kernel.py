"""The frozen TensorNet-style embedding in one autograd node (private; CPU, eager, any size):
``FrozenEmbedding``, ``TensorEmbedding``'s forward without recording a graph and its backward as
written out in its docstring, with the entry-major layout, chunking and reused buffers of
``_tensornet_kernel`` (whose module docstring describes them), and the helpers of ``_tensornet_ops``.
``TensorEmbedding._reference`` is the oracle the tests compare it with.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import _native
from .._frozen import reference_gradients
from ..layers._message_kernels import scale_parts, spread_over_rows, sum_parts, workspace
from ..layers._scatter_outer_kernels import native_scatter_outer, scatter_outer_backward
from ..layers.cartesian import PART_SLICES
from ._tensornet_ops import (
    _atom_chunks,
    _columns,
    _dense_chain,
    _dense_chain_backward,
    _linear_by_part,
    _pair_chunks,
    _rows,
)

__all__ = ["FrozenEmbedding"]


class FrozenEmbedding(torch.autograd.Function):
    """``TensorEmbedding`` with frozen weights as one autograd node (paper Eqs. 4-6):

        X_i = Σ_pairs Z_ij ∘ f_ij ∘ c(r̂_ij) (+ the message to j with Z_ji and c(-r̂_ij)) + f_I(0) Z_ii δ
        out = gates ∘ L(X),   gates = SiLU(MLP(LayerNorm(||X||)))

    (c(r̂): ``DirectionComponents``, f = φ W_f e(r) + b_f). Backward, from g = ∂L/∂out in
    components (v = L(X), s = the gates spread over the components):

        g_s = g ∘ v,   g_X = Lᵀ(g ∘ s) + 2 X (LayerNorm and MLP backward of Σ_parts g_s)
        g_c(pair e) = Σ_C G_e ∘ w_e,   g_w(pair e) = Σ_(rows of a part) c_e G_e   (G_e = g_X at
        the receiving atom), then through f to e(r) and φ, and through c(r̂) to r̂.

    The species terms Z do not depend on the geometry: no gradient is formed for them. The
    pairs run chunk by chunk (both ways in one buffer of ``_message_kernels``), their filters and
    weights [2p, 3, C] formed per chunk, the node updates chunk by chunk of atoms; on a molecule
    (one chunk of each) the backward keeps what it needs, on more it computes each chunk again.

    Shapes:
        edge_rbf [P, K], edge_envelope [P], edge_unit [P, 3], species [N], pair_i [P], pair_j [P],
        self_rbf [1, K], layer  ->  [N, C, 3, 3]
    """

    @staticmethod
    def forward(ctx: Any, edge_rbf: Tensor, edge_envelope: Tensor, edge_unit: Tensor, species: Tensor,
                pair_i: Tensor, pair_j: Tensor, self_rbf: Tensor, layer: nn.Module) -> Tensor:
        N, C = species.shape[0], layer.num_channels
        basis = layer.basis(edge_rbf).flatten(1)                                    # [9, 9]
        z = layer.species_embedding(species)                                        # [N, C]
        z_receiver, z_sender = layer.pair_receiver(z), layer.pair_sender(z)         # [N, C]
        X = torch.zeros(N, 9, C, dtype=edge_rbf.dtype, device=edge_rbf.device)     # [N, 9, C]
        pair_chunks = _pair_chunks(pair_i.shape[0], C)
        for s, e in pair_chunks:
            inputs = (_rows(t, s, e) for t in (edge_rbf, edge_envelope, edge_unit, pair_i, pair_j))
            pair_terms = _pair_terms(layer, *inputs, z_receiver, z_sender)
            pairs, _, _, geometry, weights = pair_terms
            if _native.applies(geometry, weights):  # one pass, no [2p, 9, C] array
                native_scatter_outer(geometry, weights, pairs, PART_SLICES, X)
            else:
                messages = workspace("messages", (2 * (e - s), 9, C), X)             # [2p, 9, C]
                X.index_add_(0, pairs, scale_parts(geometry[:, :, None], weights, PART_SLICES, out=messages))
        self_scalar = F.linear(self_rbf, layer.radial.weight[:C], layer.radial.bias[:C]) * (z_receiver + z_sender)
        X[:, 0] += math.sqrt(3.0) * self_scalar                                     # + s δ: c_0(δ) = √3
        atom_chunks = _atom_chunks(N, C)
        out = X.new_empty(9, N * C)                                                 # entries
        for a, b in atom_chunks:
            node_terms = _gate_terms(layer, _rows(X, a, b).transpose(0, 1))
            scales, v = node_terms[3:5]
            torch.mm(basis.T, (v * scales).view(9, -1), out=_columns(out, a * C, b * C))
        kept = (pair_terms if len(pair_chunks) == 1 else ()) + (node_terms if len(atom_chunks) == 1 else ())
        ctx.layer, ctx.constants = layer, (species, self_rbf)  # no gradient; pair_i, pair_j are saved
        ctx.kept = len(pair_chunks) == 1, len(atom_chunks) == 1
        ctx.save_for_backward(edge_rbf, edge_envelope, edge_unit, pair_i, pair_j, basis, z_receiver, z_sender,
                              X, *kept)
        return out.T.view(N, C, 3, 3)  # entry-major, as the interactions read it

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (edge_rbf, edge_envelope, edge_unit, pair_i, pair_j, basis, z_receiver, z_sender, X,
         *kept) = ctx.saved_tensors
        layer, needs = ctx.layer, ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # a graph of the backward is wanted: through the reference
            species, self_rbf = ctx.constants
            return reference_gradients(
                lambda e, u, r: layer._reference(species, e, u, r, pair_i, pair_j, self_rbf),
                [edge_rbf, edge_envelope, edge_unit], needs, grad, num_args=8)
        pairs_kept, atoms_kept = ctx.kept
        pair_terms = kept[:5] if pairs_kept else ()
        node_terms = kept[5 if pairs_kept else 0:] if atoms_kept else ()
        (N, _, C), P = X.shape, edge_rbf.shape[0]
        grad_X = X.new_empty(N, 9, C)
        for a, b in _atom_chunks(N, C):
            X_rows = _rows(X, a, b).transpose(0, 1)                                 # [9, n, C]
            norm, mean, rstd, scales, v, *pre_activations = node_terms or _gate_terms(layer, X_rows)
            g = torch.mm(basis, _rows(grad, a, b).reshape(-1, 9).T).view(9, b - a, C)  # [9, n, C] components
            grad_gates = sum_parts((g * v).transpose(0, 1), PART_SLICES).view(b - a, 3 * C)  # [n, 3C]
            grad_normalized = _dense_chain_backward(layer.gates, grad_gates, pre_activations)  # [n, C]
            grad_norm = torch.ops.aten.native_layer_norm_backward(
                grad_normalized, norm, [C], mean, rstd, layer.norm.weight, layer.norm.bias, [True, False, False])[0]
            grad_rows = _linear_by_part(g * scales, layer.linear.weight, adjoint=True)  # [9, n, C]
            grad_X[a:b] = torch.addcmul(grad_rows, X_rows, grad_norm, value=2.0).transpose(0, 1)
        grad_rbf = edge_rbf.new_empty(P, edge_rbf.shape[1]) if needs[0] else None   # [P, K]
        grad_envelope = edge_envelope.new_empty(P) if needs[1] else None            # [P]
        grad_unit = edge_unit.new_empty(P, 3) if needs[2] else None                 # [P, 3]
        for s, e in _pair_chunks(P, C):
            p = e - s
            pairs, z_pair, radial, geometry, weights = pair_terms or _pair_terms(
                layer, *(_rows(t, s, e) for t in (edge_rbf, edge_envelope, edge_unit, pair_i, pair_j)), z_receiver,
                z_sender)
            # the scatter of outer products: G_e = grad_X at each pair's receiving atom (both directions)
            grad_geometry, grad_weights = scatter_outer_backward(grad_X, geometry, weights, pairs, PART_SLICES,
                                                                 True, True)  # [2p, 9], [2p, 3, C]
            grad_geometry = torch.addcmul(grad_geometry[:p], layer.component_parity, grad_geometry[p:])  # [p, 9]
            grad_f = grad_weights.mul_(z_pair[:, None]).view(2, p, 3 * C).sum(0)    # [p, 3C]
            if grad_envelope is not None:
                torch.sum(grad_f * radial, 1, out=_rows(grad_envelope, s, e))
            if grad_rbf is not None:
                torch.mm(grad_f * _rows(edge_envelope, s, e)[:, None], layer.radial.weight, out=_rows(grad_rbf, s, e))
            if grad_unit is not None:  # c(r̂) = c_0 + [r̂, r̂ r̂ᵀ] K: back through the constant matrix K [12, 9]
                grad_terms = grad_geometry @ layer.direction.coefficients.T             # [p, 12]
                grad_outer = grad_terms[:, 3:].view(p, 3, 3)                           # [p, 3, 3]
                grad_unit[s:e] = grad_terms[:, :3] + torch.bmm(grad_outer + grad_outer.transpose(1, 2),
                                                               edge_unit[s:e, :, None]).squeeze(2)  # [p, 3]
        return grad_rbf, grad_envelope, grad_unit, None, None, None, None, None


def _pair_terms(layer: nn.Module, edge_rbf: Tensor, edge_envelope: Tensor, edge_unit: Tensor, pair_i: Tensor,
                pair_j: Tensor, z_receiver: Tensor, z_sender: Tensor) -> Tuple[Tensor, ...]:
    """The terms of ``FrozenEmbedding``'s messages on p pairs, both ways: (receiving atoms [2p],
    Z [2p, C], the radial layer's output W_f e + b_f [p, 3C], c(r̂) and c(-r̂) [2p, 9], the weights
    Z ∘ f [2p, 3, C])."""
    p, C = edge_rbf.shape[0], layer.num_channels
    pairs = torch.cat([pair_i, pair_j])                                             # [2p]: receiving atoms
    z_pair = z_receiver.index_select(0, pairs) + z_sender.index_select(0, torch.cat([pair_j, pair_i]))  # [2p, C]
    radial = F.linear(edge_rbf, layer.radial.weight, layer.radial.bias)             # [p, 3C]
    f = (radial * edge_envelope[:, None]).view(p, 3, C)                             # [p, 3, C]
    geometry = layer.direction(edge_unit)                                           # [p, 9]
    geometry = torch.cat([geometry, geometry * layer.component_parity])             # [2p, 9]: to i, to j
    weights = torch.mul(f, z_pair.view(2, p, 1, C)).view(2 * p, 3, C)               # [2p, 3, C]
    return pairs, z_pair, radial, geometry, weights


def _gate_terms(layer: nn.Module, X: Tensor) -> Tuple[Tensor, ...]:
    """The gated channel map of ``FrozenEmbedding`` on n atoms' components X [9, n, C]:
    (||X|| [n, C], LayerNorm's mean and 1/std, the gates spread over the components [9, n, C],
    L(X) [9, n, C], the gate network's pre-activations)."""
    C = X.shape[2]
    norm = X.square().sum(0)                                                        # [n, C] = ||X||
    normalized, mean, rstd = torch.native_layer_norm(norm, [C], layer.norm.weight, layer.norm.bias,
                                                     layer.norm.eps)                # [n, C]
    pre_activations: List[Tensor] = []
    gates = _dense_chain(layer.gates, normalized, pre_activations)                  # [n, 3C]
    scales = spread_over_rows(gates.view(-1, 3, C), PART_SLICES).transpose(0, 1)    # [9, n, C]
    return (norm, mean, rstd, scales, _linear_by_part(X, layer.linear.weight), *pre_activations)
