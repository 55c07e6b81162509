"""The one scatter of molnets: native ``index_add`` with an explicit output size.

torch-scatter is not needed: ``Tensor.index_add`` is a fused kernel on CPU and CUDA, is
differentiable twice, and compiles under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["scatter_sum", "scatter_mean"]


def scatter_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Sum the rows of ``src`` into ``dim_size`` buckets: out[index[e]] += src[e].

    ``dim_size`` must come from a tensor *shape* (e.g. ``node_feats.shape[0]``), never from
    ``index.max()``: that would sync with the host and break ``torch.export``.

    Shapes:
        src [E, *F], index [E] (long, values in [0, dim_size))  ->  [dim_size, *F]

    >>> import torch
    >>> scatter_sum(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 2, 0]), dim_size=3)
    tensor([4., 0., 2.])
    """
    out = src.new_zeros((dim_size,) + tuple(src.shape[1:]))
    return out.index_add(0, index, src)


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
