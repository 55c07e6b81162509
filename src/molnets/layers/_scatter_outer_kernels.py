"""Fused forward/backward of ``scatter.scatter_outer`` on the CPU (private kernels), with the
chunk size and reused buffers of ``_message_kernels``: the same numbers as the reference without
materializing the per-edge messages [E, n, C], edges processed in cache-sized chunks.

Scatter of outer products, out[r_e, n, c] += u_e[n] w_e[part(n), c], with G_e = g[r_e]:

    du_e[n] = Σ_c G_e[n, c] w_e[part(n), c],   dw_e[k] = Σ_{rows n of part k} u_e[n] G_e[n].

Without a graph of the backward, the gradients are computed chunk by chunk in one pass. With
one (create_graph: training on forces) du and dw are one autograd node computed chunk by chunk
too, ``ScatterOuterGradients``, whose own gradients are scatters and itself, so no per-edge
array is built at any order.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _native
from ._message_kernels import _chunk_size, _part_of_row, sum_parts, workspace


def scatter_outer_chunked(u: Tensor, weights: Tensor, index: Tensor, dim_size: int,
                          parts: Sequence[Tuple[int, int]]) -> Tensor:
    """out[r_e] += u_e ⊗ w_e part by part, chunk by chunk of edges (module docstring), or by the
    compiled kernel in one pass where it runs (``native_scatter_outer``). -> [N, n, C]"""
    num_edges, n, C = u.shape[0], u.shape[1], weights.shape[2]
    out = u.new_zeros(dim_size, n, C)                                               # [N, n, C]
    if _native.applies(u, weights):
        return native_scatter_outer(u, weights, index, parts, out)
    chunk = _chunk_size(n * C)
    buffer = workspace("messages", (min(chunk, num_edges), n, C), u)                 # [p, n, C]
    for start in range(0, num_edges, chunk):
        stop = min(start + chunk, num_edges)
        messages, u_c, w_c = buffer[:stop - start], u[start:stop], weights[start:stop]
        for k, (a, b) in enumerate(parts):
            torch.mul(u_c[:, a:b, None], w_c[:, k:k + 1], out=messages[:, a:b])
        out.index_add_(0, index[start:stop], messages)
    return out


def native_scatter_outer(u: Tensor, weights: Tensor, index: Tensor, parts: Sequence[Tuple[int, int]],
                         out: Tensor) -> Tensor:
    """out[r_e] += u_e ⊗ w_e part by part by the compiled kernel (``molnets._native``; where
    ``_native.applies``), one pass over the edges: no per-edge array. out [N, n, C] contiguous.
    -> out"""
    (N, n, C), (E, K) = out.shape, weights.shape[:2]
    _native.call("scatter_outer_forward", u, out, u.contiguous(), weights.contiguous(), _part_of_row(parts, u.device),
                 index.contiguous(), N, E, n, K, C)
    return out


def native_scatter_outer_backward(grad_out: Tensor, u: Tensor, weights: Tensor, index: Tensor,
                                  parts: Sequence[Tuple[int, int]], grad_u: Optional[Tensor],
                                  grad_w: Optional[Tensor]) -> None:
    """The backward of ``native_scatter_outer``: du written into ``grad_u`` [E, n], dw into
    ``grad_w`` [E, K, C] (contiguous; either may be None)."""
    (N, n, C), (E, K) = grad_out.shape, weights.shape[:2]
    _native.call("scatter_outer_backward", u, grad_u, grad_w, grad_out.contiguous(), u.contiguous(),
                 weights.contiguous(), _part_of_row(parts, u.device), index.contiguous(), N, E, n, K, C)


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
    """(du, dweights) of the module docstring chunk by chunk, no graph, or by the compiled kernel
    where it runs."""
    num_edges = u.shape[0]
    grad_u = u.new_empty(u.shape) if need_u else None                                # [E, n]
    grad_w = weights.new_empty(weights.shape) if need_weights else None              # [E, K, C]
    if _native.applies(grad_out, u, weights):
        native_scatter_outer_backward(grad_out, u, weights, index, parts, grad_u, grad_w)
        return grad_u, grad_w
    chunk = _chunk_size(grad_out.shape[1] * grad_out.shape[2])
    buffer = workspace("gathered", (min(chunk, num_edges),) + grad_out.shape[1:], grad_out)  # [p, n, C]
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
