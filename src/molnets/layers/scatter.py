"""The one scatter of molnets: native ``index_add`` with an explicit output size, and its
transpose for gathering node features onto edges (``gather_rows``, an ``index_select``).
Compiled for the CPU they are ``scatter_add`` and ``gather`` instead (see
``_compiling_for_cpu``): the same numbers.

torch-scatter is not needed: ``Tensor.index_add`` is a fused kernel on CPU and CUDA, is
differentiable twice, and compiles under ``torch.compile(fullgraph=True)``. ``scatter_outer``
is the same sum for messages that are outer products (built chunk by chunk on the CPU, never
at full size); ``pairs.pair_convolution`` is its sibling for messages that gather node features.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._frozen import traced
from ._message_kernels import kernel_applies, spread_over_rows
from ._scatter_outer_kernels import ScatterOuter

__all__ = ["scatter_sum", "scatter_mean", "scatter_outer", "gather_rows"]


def scatter_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Sum the rows of ``src`` into ``dim_size`` buckets: out[index[e]] += src[e].

    ``dim_size`` must come from a tensor *shape* (e.g. ``node_feats.shape[0]``), never from
    ``index.max()``: that would sync with the host and break ``torch.export``.

    Index range: an index outside [0, dim_size) raises IndexError in eager mode on the CPU (ATen's
    ``index_add`` checks it, and the one-bucket shortcut below checks it itself) and on the
    compiled CPU path (ATen's ``scatter_add``: RuntimeError); on CUDA it is a device-side assert.
    The one exception is the one-bucket shortcut (``dim_size == 1``) under ``torch.compile`` /
    ``torch.export``, on other devices and under torch.func transforms: it sums every row
    whatever its index, because a check would need a host sync or a value-dependent branch.

    Shapes:
        src [E, *F], index [E] (long, values in [0, dim_size))  ->  [dim_size, *F]

    >>> import torch
    >>> scatter_sum(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 2, 0]), dim_size=3)
    tensor([4., 0., 2.])
    """
    if dim_size == 1:
        # One bucket (a single structure's energy): a plain sum. A shape, not a value, so no
        # sync; it also sidesteps torch 2.13's inductor CPU code generation, which fails on
        # an index_add into one row.
        # (eager on the CPU only, where reading the index costs no device sync)
        if index.device.type == "cpu" and not traced() and bool((index != 0).any()):  # as index_add raises
            raise IndexError("scatter_sum: index out of range [0, dim_size) with dim_size=1")
        return src.sum(0, keepdim=True)
    out = src.new_zeros((dim_size,) + tuple(src.shape[1:]))
    if _compiling_for_cpu(src):
        return out.scatter_add(0, _expand_index(index, src.shape[1:]), src)
    return out.index_add(0, index, src)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x[index] along the first dimension (``index_select``); its gradient is ``scatter_sum``.

    Shapes:
        x [N, *F], index [E] (long, values in [0, N))  ->  [E, *F]
    """
    if _compiling_for_cpu(x):
        return x.gather(0, _expand_index(index, x.shape[1:]))
    return x.index_select(0, index)


def _expand_index(index: Tensor, feature_shape: Sequence[int]) -> Tensor:
    """index [E] as a view [E, *F] (stride 0 along F), the index of scatter_add and gather."""
    return index.view((-1,) + (1,) * len(feature_shape)).expand((index.shape[0],) + tuple(feature_shape))


def _compiling_for_cpu(like: Tensor) -> bool:
    """Whether this is compiled code for the CPU, where inductor generates ``index_add`` (and
    the backward of ``index_select``) as loops of atomic adds, several times slower than ATen's
    kernels for per-edge messages; ``scatter_add`` and ``gather`` (whose backward is a
    ``scatter_add``) stay calls of ATen's kernels there."""
    return torch.compiler.is_compiling() and like.device.type == "cpu"


def scatter_mean(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Mean of the rows of ``src`` per bucket; empty buckets give zero.

    Shapes:
        src [E, *F], index [E]  ->  [dim_size, *F]

    >>> import torch
    >>> scatter_mean(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 2, 0]), dim_size=3)
    tensor([2., 0., 2.])
    """
    total = scatter_sum(src, index, dim_size)                                # [dim_size, *F]
    count = scatter_sum(src.new_ones(index.shape), index, dim_size)         # [dim_size]
    count = count.clamp(min=1).reshape((dim_size,) + (1,) * (src.dim() - 1))
    return total / count


def scatter_outer(u: Tensor, weights: Tensor, index: Tensor, dim_size: int,
                  parts: Optional[Sequence[Tuple[int, int]]] = None) -> Tensor:
    """Sum outer products per bucket: out[index[e], n, c] += u[e, n] weights[e, part(n), c].

    A geometric factor per edge (n numbers, e.g. the components of r̂ r̂ᵀ) times channel
    weights per edge and part: the TensorNet embedding (Simeon & De Fabritiis 2023, Eq. 4). The
    rows n are split into K parts (rows a..b-1 of part k) with their own weights.

    On the CPU in eager mode a fused kernel (``_scatter_outer_kernels``) computes the same numbers
    without the per-edge products [E, n, C] in memory (differentiable twice), when they exceed one
    chunk (shapes only). Otherwise, and under ``torch.compile`` and on other devices, this runs:
    ``scatter_sum(u[:, :, None] * weights[:, part], index, dim_size)``.

    Args:
        u: [E, n]. weights: [E, K, C]. index: bucket of each edge [E]. dim_size: N (from a shape).
        parts: K slices (a, b) of the n rows, contiguous and covering them; default one part.

    Shapes:
        u [E, n], weights [E, K, C], index [E]  ->  [dim_size, n, C]

    >>> import torch
    >>> u, w = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[[1.0]], [[10.0]]])
    >>> scatter_outer(u, w, torch.tensor([1, 1]), dim_size=2).flatten()
    tensor([ 0.,  0., 31., 42.])
    """
    parts = tuple(parts) if parts is not None else ((0, u.shape[1]),)
    if kernel_applies(u.shape[0], u.shape[1] * weights.shape[2], u):
        return ScatterOuter.apply(u, weights, index, dim_size, parts)
    return _scatter_outer_reference(u, weights, index, dim_size, parts)


def _scatter_outer_reference(u: Tensor, weights: Tensor, index: Tensor, dim_size: int,
                             parts: Sequence[Tuple[int, int]]) -> Tensor:
    """``scatter_outer`` in differentiable torch operations: the oracle of the kernel."""
    w = spread_over_rows(weights, parts)                                            # [E, n or 1, C]
    return scatter_sum(u[:, :, None] * w, index, dim_size)                          # [N, n, C]
