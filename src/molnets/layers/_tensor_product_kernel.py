"""Fused forward/backward of the weighted channelwise tensor product (private kernel).

The composable formulation in ``tensor_product.py`` is the reference; this kernel computes the
same thing for its most common case (every path weighted, one channel in x2, one path per
output irrep: the MACE message) with fewer passes over the big [E, C, K] memory:

    out_p[e, u, k] = w_p[e, u] sum_i h[e, u, i] T_p[e, i, k]

the forward does one batched matmul per input irrep for all its paths, y = h @ [T_p1 | T_p2 | ..],
and one elementwise kernel per path writes w_p y_p straight into the path's block of the output
(no concatenation, no zero-filled gradients); the backward only reads the output gradient:

    S_p = g_p T_p^T,   dh = w_p S_p,   dw_p = sum_i S_p h,   dT_p = (w_p h)^T g_p.

The backward is written with differentiable operations, so the product stays twice
differentiable (forces in a loss).
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor


class KernelPath(NamedTuple):
    col: int         # first column of the path in the group's y = h @ T (k columns)
    dim_out: int     # k = 2 l3 + 1
    out_start: int   # first column of the path's output block (C * k columns)
    w_start: int     # first of its C weights


class KernelGroup(NamedTuple):
    start1: int      # first column of the input-1 irrep in x1
    mul: int         # C
    dim1: int        # a = 2 l1 + 1
    t_start: int     # first column of the group's T in t_all, row-major [a, K]
    num_cols: int    # K: the k columns of all its paths
    paths: Tuple[KernelPath, ...]


def _views(x1: Tensor, t_all: Tensor, g: KernelGroup) -> Tuple[Tensor, Tensor]:
    num_edges = x1.shape[0]
    h = x1[:, g.start1:g.start1 + g.mul * g.dim1].reshape(num_edges, g.mul, g.dim1)               # [E, C, a]
    t = t_all[:, g.t_start:g.t_start + g.dim1 * g.num_cols].reshape(num_edges, g.dim1, g.num_cols)  # [E, a, K]
    return h, t


def _block(x: Tensor, start: int, mul: int, dim: int) -> Tensor:
    return x[:, start:start + mul * dim].view(x.shape[0], mul, dim)                               # [E, C, k]


class WeightedChannelwiseProduct(torch.autograd.Function):
    """out = concat_p w_p (h_p @ T_p), see the module docstring."""

    @staticmethod
    def forward(x1: Tensor, t_all: Tensor, weight: Tensor, groups: Sequence[KernelGroup], dim_out: int) -> Tensor:
        num_edges = x1.shape[0]
        compiling = torch.compiler.is_compiling()  # fixed while tracing: Dynamo rejects strided out=
        out = x1.new_empty(num_edges, dim_out)                                                   # [E, dim_out]
        blocks: List[Tuple[int, Tensor]] = []
        for g in groups:
            h, t = _views(x1, t_all, g)
            y = torch.bmm(h, t)                                                                  # [E, C, K]
            for p in g.paths:
                w = weight[:, p.w_start:p.w_start + g.mul].unsqueeze(-1)                         # [E, C, 1]
                y_p = y[:, :, p.col:p.col + p.dim_out]                                           # [E, C, k]
                if compiling:  # the compiler fuses the products into the concatenation itself
                    blocks.append((p.out_start, (y_p * w).reshape(num_edges, -1)))
                else:  # eager: an elementwise kernel writes the strided output block directly
                    torch.mul(y_p, w, out=_block(out, p.out_start, g.mul, p.dim_out))
        if compiling:
            out = torch.cat([block for _, block in sorted(blocks, key=lambda item: item[0])], dim=1)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        x1, t_all, weight, groups, _ = inputs
        ctx.save_for_backward(x1, t_all, weight)
        ctx.groups = groups

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        x1, t_all, weight = ctx.saved_tensors
        need_x1, need_t, need_w = ctx.needs_input_grad[:3]
        num_edges = x1.shape[0]
        grad_h: List[Tuple[int, Tensor]] = []
        grad_t: List[Tensor] = []
        grad_w: List[Tensor] = []
        for g in ctx.groups:
            h, t = _views(x1, t_all, g)
            grad_h_g: Optional[Tensor] = None
            grad_t_g: List[Tensor] = []
            for p in g.paths:
                w = weight[:, p.w_start:p.w_start + g.mul].unsqueeze(-1)                         # [E, C, 1]
                g_p = _block(grad_out, p.out_start, g.mul, p.dim_out)                           # [E, C, k]
                t_p = t[:, :, p.col:p.col + p.dim_out]                                           # [E, a, k]
                if need_x1 or need_w:
                    s = torch.bmm(g_p, t_p.transpose(1, 2))                                      # [E, C, a]
                    if need_x1:
                        grad_h_g = s * w if grad_h_g is None else grad_h_g + s * w               # [E, C, a]
                    if need_w:
                        grad_w.append((p.w_start, (s * h).sum(-1)))                              # [E, C]
                if need_t:
                    grad_t_g.append(torch.bmm((h * w).transpose(1, 2), g_p))                     # [E, a, k]
            if need_x1 and grad_h_g is not None:
                grad_h.append((g.start1, grad_h_g.reshape(num_edges, -1)))                       # [E, C a]
            if need_t:
                grad_t.append(torch.cat(grad_t_g, dim=2).reshape(num_edges, -1))                 # [E, a K]
        return (
            _place(grad_h, x1) if need_x1 else None,
            torch.cat(grad_t, dim=1) if need_t else None,
            _place(grad_w, weight) if need_w else None,
            None,
            None,
        )


def _place(pieces: List[Tuple[int, Tensor]], like: Tensor) -> Tensor:
    """Lay [E, width] pieces side by side at their column offsets in an [E, like.shape[1]] tensor."""
    num_edges, width = like.shape
    chunks: List[Tensor] = []
    position = 0
    for start, piece in sorted(pieces, key=lambda item: item[0]):
        if start > position:
            chunks.append(like.new_zeros(num_edges, start - position))
        chunks.append(piece)
        position = start + piece.shape[1]
    if position < width:
        chunks.append(like.new_zeros(num_edges, width - position))
    return torch.cat(chunks, dim=1)
