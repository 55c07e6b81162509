"""Fused forward/backward of the weighted channelwise tensor product (private kernel).

The composable formulation in ``tensor_product.py`` is the reference; this kernel computes the
same thing for its most common case (every path weighted, one channel in x2, one path per
output irrep: the MACE message) with fewer passes over the big [E, C, K] memory:

    out_p[e, u, k] = w_p[e, u] sum_i h[e, u, i] T_p[e, i, k]

The forward does one batched matmul per input irrep for all its paths, y = h @ [T_p1 | T_p2 | ..],
and one elementwise kernel per path writes w_p y_p straight into the path's block of the output.
In eager mode it runs over chunks of edges, with y in one small reused buffer: y then stays in
cache and costs no page faults, so the output is the only full-size memory touched.

The backward only reads the output gradient g. Per input irrep, with the output gradient of its
paths gathered into G = [g_p1 | g_p2 | ..] ([E, C, K], like y) and the weights spread over the
columns of their path, W[e, u, (p, k)] = w_p[e, u]:

    dh = (W G) T^T,   dT = h^T (W G),   dw_p = sum_{k in p} G y,

three batched matmuls and two products per irrep for all its paths (chunked over edges like the
forward, into reused buffers). Where a graph of the backward is wanted (create_graph, double
backward) or the compiler traces it, the backward runs per path in differentiable operations,
without ``out=``:

    S_p = g_p T_p^T,   dh = sum_p w_p S_p,   dw_p = sum_i S_p h,   dT_p = (w_p h)^T g_p.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

# edges per chunk: about this many numbers per thread in the largest [chunk, C, K] buffer (1 MiB
# in float32), small enough to stay in cache between the matmul that writes it and the products
# that read it, large enough that each thread's share of an operation outweighs the per-call cost
CHUNK_NUMEL = 1 << 18


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


def _widest(groups: Sequence[KernelGroup]) -> int:
    """C K of the widest group: the numbers per edge of the largest [chunk, C, K] buffer."""
    return max((g.mul * g.num_cols for g in groups), default=0)


def _chunk_size(groups: Sequence[KernelGroup], x: Tensor) -> int:
    """Edges per chunk on the CPU; on other devices all edges at once (a GPU wants few large
    kernels, not cache-sized blocks)."""
    if x.device.type != "cpu":
        return max(1, x.shape[0])
    numel = CHUNK_NUMEL * torch.get_num_threads()
    return max(1, numel // max(_widest(groups), 1))


def _forward_chunked(x1: Tensor, t_all: Tensor, weight: Tensor, groups: Sequence[KernelGroup],
                     out: Tensor) -> Tensor:
    """Eager forward into ``out`` [E, dim_out], chunk after chunk of edges (module docstring)."""
    num_edges = x1.shape[0]
    chunk = _chunk_size(groups, x1)
    buffer = x1.new_empty(min(chunk, num_edges) * _widest(groups))
    for start in range(0, num_edges, chunk):
        end = min(start + chunk, num_edges)
        for g in groups:
            h, t = _views(x1[start:end], t_all[start:end], g)                                     # [n, C, a], [n, a, K]
            y = buffer[:(end - start) * g.mul * g.num_cols].view(end - start, g.mul, g.num_cols)  # [n, C, K]
            torch.bmm(h, t, out=y)
            for p in g.paths:
                w = weight[start:end, p.w_start:p.w_start + g.mul].unsqueeze(-1)                   # [n, C, 1]
                out_p = _block(out[start:end], p.out_start, g.mul, p.dim_out)                     # [n, C, k]
                torch.mul(y[:, :, p.col:p.col + p.dim_out], w, out=out_p)
    return out


def _weights_consecutive(g: KernelGroup) -> bool:
    """The weights of the group's paths lie side by side, path after path, as [E, P, C]."""
    return all(p.w_start == g.paths[0].w_start + j * g.mul for j, p in enumerate(g.paths))


def _backward_chunked(grad_out: Tensor, x1: Tensor, t_all: Tensor, weight: Tensor,
                      groups: Sequence[KernelGroup]) -> Tuple[Tensor, Tensor, Tensor]:
    """Eager backward without a graph: (dx1, dt_all, dweight), see the module docstring."""
    num_edges = x1.shape[0]
    grad_x1, grad_t, grad_w = torch.zeros_like(x1), torch.empty_like(t_all), torch.zeros_like(weight)
    chunk = _chunk_size(groups, x1)
    n0 = min(chunk, num_edges)
    big = [x1.new_empty(n0 * _widest(groups)) for _ in range(3)]                 # G, W (then W G), y (then G y)
    small = x1.new_empty(n0 * max((max(g.mul * g.dim1, g.dim1 * g.num_cols, g.mul * len(g.paths)) for g in groups),
                                  default=0))
    # [K, P] indicator of the columns of each path: spreads weights over columns, sums columns per path
    indicators = []
    for g in groups:
        indicator = x1.new_zeros(g.num_cols, len(g.paths))                                       # [K, P]
        for j, p in enumerate(g.paths):
            indicator[p.col:p.col + p.dim_out, j] = 1
        indicators.append(indicator)
    for start in range(0, num_edges, chunk):
        end = min(start + chunk, num_edges)
        n = end - start
        for g, indicator in zip(groups, indicators):
            num_paths, mul, dim1, num_cols = len(g.paths), g.mul, g.dim1, g.num_cols
            h, t = _views(x1[start:end], t_all[start:end], g)                                     # [n, C, a], [n, a, K]
            G, W, y = (b[:n * mul * num_cols].view(n, mul, num_cols) for b in big)                # [n, C, K]
            for p in g.paths:
                G[:, :, p.col:p.col + p.dim_out].copy_(_block(grad_out[start:end], p.out_start, mul, p.dim_out))
            w0 = g.paths[0].w_start
            w_g = weight[start:end, w0:w0 + num_paths * mul].view(n, num_paths, mul)             # [n, P, C]
            torch.matmul(w_g.transpose(1, 2), indicator.T, out=W)                                # [n, C, K]
            torch.bmm(h, t, out=y)                                                               # [n, C, K]
            y.mul_(G)
            W.mul_(G)
            # dh = (W G) T^T
            dh = small[:n * mul * dim1].view(n, mul, dim1)                                       # [n, C, a]
            torch.bmm(W, t.transpose(1, 2), out=dh)
            grad_x1[start:end, g.start1:g.start1 + mul * dim1].copy_(dh.view(n, -1))
            # dT = h^T (W G)
            dt = small[:n * dim1 * num_cols].view(n, dim1, num_cols)                             # [n, a, K]
            torch.bmm(h.transpose(1, 2), W, out=dt)
            grad_t[start:end, g.t_start:g.t_start + dim1 * num_cols].copy_(dt.view(n, -1))
            # dw_p = sum over the path's columns of G y
            dw = small[:n * mul * num_paths].view(n, mul, num_paths)                             # [n, C, P]
            torch.matmul(y, indicator, out=dw)
            grad_w[start:end, w0:w0 + num_paths * mul].view(n, num_paths, mul).copy_(dw.transpose(1, 2))
    return grad_x1, grad_t, grad_w


class WeightedChannelwiseProduct(torch.autograd.Function):
    """out = concat_p w_p (h_p @ T_p), see the module docstring."""

    @staticmethod
    def forward(x1: Tensor, t_all: Tensor, weight: Tensor, groups: Sequence[KernelGroup], dim_out: int) -> Tensor:
        num_edges = x1.shape[0]
        if not torch.compiler.is_compiling():  # Dynamo rejects strided out=
            return _forward_chunked(x1, t_all, weight, groups, x1.new_empty(num_edges, dim_out))
        # the compiler fuses the products into the concatenation itself
        blocks: List[Tuple[int, Tensor]] = []
        for g in groups:
            h, t = _views(x1, t_all, g)
            y = torch.bmm(h, t)                                                                  # [E, C, K]
            for p in g.paths:
                w = weight[:, p.w_start:p.w_start + g.mul].unsqueeze(-1)                         # [E, C, 1]
                y_p = y[:, :, p.col:p.col + p.dim_out]                                           # [E, C, k]
                blocks.append((p.out_start, (y_p * w).reshape(num_edges, -1)))
        return torch.cat([block for _, block in sorted(blocks, key=lambda item: item[0])], dim=1)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        x1, t_all, weight, groups, _ = inputs
        ctx.save_for_backward(x1, t_all, weight)
        ctx.groups = groups

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        x1, t_all, weight = ctx.saved_tensors
        need_x1, need_t, need_w = ctx.needs_input_grad[:3]
        if (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and all(_weights_consecutive(g) for g in ctx.groups)):
            grad_x1, grad_t, grad_w = _backward_chunked(grad_out, x1, t_all, weight, ctx.groups)
            return (grad_x1 if need_x1 else None, grad_t if need_t else None, grad_w if need_w else None,
                    None, None)
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
