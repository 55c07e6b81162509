"""Building blocks of the frozen TensorNet-style kernels (private): entry-major 3x3 products
(a stack of L matrices as [9, L] or a [3, 3, L] view: ``_add_product``, ``_anticommutator``),
the channel maps part by part (``_linear_by_part``), the dense chains of the filter and gate
networks with their input gradients, the normalization X / (||X|| + 1) and its gradient, and the
ranges of atoms and pairs that the kernels run chunk by chunk. The scheme is described in the
module docstring of ``_tensornet_kernel``; ``_tensornet_kernel`` (the interaction) and
``_tensornet_embedding_kernel`` (the embedding) use them.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import _native
from ..layers._message_kernels import _chunk_size
from ..layers.cartesian import PART_SLICES

# numbers in one [9, n C] array of a chunk of n atoms' node update (1 MiB in float64; the
# update's ~10 live temporaries of a chunk stay in the 32 MiB cache)
ATOM_CHUNK_NUMEL = 1 << 17

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


def _dense_chain_backward(layer: nn.Module, grad: Tensor, pre_activations: Sequence[Tensor],
                          out: Optional[Tensor] = None) -> Tensor:
    """The input gradient of ``_dense_chain`` from its output gradient (frozen weights), into
    ``out`` when given. [*, D_in]"""
    linears = [m for m in layer if type(m) is nn.Linear]
    for k, (linear, a) in enumerate(zip(reversed(linears), reversed(pre_activations))):
        last = k == len(linears) - 1
        grad = torch.mm(torch.ops.aten.silu_backward(grad, a), linear.weight, out=out if last else None)
    return grad


def _add_product(out: Tensor, P: Tensor, Q: Tensor, first: int = 0) -> Tensor:
    """out += Σ_(k >= first) P[:, k] Q[k, :] in place: with first = 0, out += P Q for entry-major
    stacks of 3x3 matrices, [3, 3, L] views (strided ones: transposes), as three multiply-adds of
    [3, 3, L] (a [3, 3, 3, L] product and a sum over k is 2.5x slower at L = 2688 in float64: a
    tensor three times larger). -> out"""
    for k in range(first, 3):
        out.addcmul_(P[:, k:k + 1], Q[k:k + 1])
    return out


def _anticommutator(P: Tensor, Q: Tensor, plus: Optional[Tensor] = None) -> Tensor:
    """P Q + Q P (+ plus, [9, L], when given), entry-major [3, 3, L] each: the compiled kernel in
    one pass where it runs (``_native_products``), else one product and five multiply-adds into
    one array (two products and their sum: ~15% slower at L = 2688). -> [9, L]"""
    L = P.shape[-1]
    out = P.new_empty(3, 3, L)
    if _native_products(out, P, Q, None if plus is None else _matrices(plus), symmetric=True):
        return out.view(9, L)
    if plus is None:
        torch.mul(P[:, 0:1], Q[0:1], out=out)
    else:
        torch.addcmul(_matrices(plus), P[:, 0:1], Q[0:1], out=out)
    return _add_product(_add_product(out, P, Q, first=1), Q, P).view(9, L)          # [9, L]


def _add_square(out: Tensor, D: Tensor) -> Tensor:
    """out += D D for entry-major [3, 3, L] views (``_add_product``; the compiled kernel where it
    runs). -> out"""
    return out if _native_products(out, D, D, out, symmetric=False) else _add_product(out, D, D)


def _native_products(out: Tensor, P: Tensor, Q: Tensor, plus: Optional[Tensor], symmetric: bool) -> bool:
    """out = plus + P Q (+ Q P where symmetric) by the compiled kernel (``molnets._native``) for
    [3, 3, L] views whose rows run along L with unit stride (P, Q, plus possibly transposed; out
    not, and overlapping none of P, Q; plus may be out); False, and nothing written, where it
    does not run."""
    layouts = [_row_layout(t) for t in (out, P, Q, out if plus is None else plus)]
    if any(layout is None for layout in layouts) or layouts[0][1] or not _native.applies(out, P, Q):
        return False
    (out_row, _), (p_row, p_t), (q_row, q_t), (plus_row, _) = layouts
    _native.call("matrix_products", out, out.data_ptr(), P.data_ptr(), Q.data_ptr(),
                 None if plus is None else plus.data_ptr(), out_row, p_row, q_row, plus_row, p_t, q_t,
                 int(symmetric), P.shape[2])
    return True


def _row_layout(M: Tensor) -> Optional[Tuple[int, int]]:
    """(row stride, transposed) of entry-major [3, 3, L] rows with unit stride along L (a view
    of [9, L] or its transpose), or None for any other layout."""
    s0, s1, s2 = M.stride()
    if s2 != 1 and M.shape[2] > 1:
        return None
    if s0 == 3 * s1:
        return s1, 0
    return (s0, 1) if s1 == 3 * s0 else None


def _matrices(entries: Tensor) -> Tensor:
    """[9, L] -> [3, 3, L] (a view)."""
    return entries.view(3, 3, entries.shape[-1])


def _transposed(entries: Tensor) -> Tensor:
    """The transposed matrices of [9, L] entries, as a [3, 3, L] view."""
    return _matrices(entries).transpose(0, 1)


def _normalized_gradient(grad: Tensor, X: Tensor, denominator: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """The gradient with respect to X of X / d, d = ||X|| + 1 per matrix, from the one of the
    result; entry-major [9, L], d [L]; into ``out`` when given. -> [9, L]"""
    inner = (grad * X).sum(0)                                                       # [L]
    return torch.sub(grad / denominator, (2 * inner / denominator.square()) * X, out=out)  # [9, L]


def _rows(x: Tensor, start: int, stop: int) -> Tensor:
    """x[start:stop], or x itself where that is all of it (a molecule's one chunk: no view made,
    whose dispatch costs as much as a small operation's)."""
    return x if start == 0 and stop == x.shape[0] else x[start:stop]


def _columns(x: Tensor, start: int, stop: int) -> Tensor:
    """x[:, start:stop], or x itself where that is all of it."""
    return x if start == 0 and stop == x.shape[1] else x[:, start:stop]


def _atom_chunks(num_atoms: int, num_channels: int) -> List[Tuple[int, int]]:
    """Ranges of atoms whose [9, n C] arrays hold at most ``ATOM_CHUNK_NUMEL`` numbers: the node
    updates of a large system run chunk by chunk in cache-sized temporaries; a molecule is one chunk."""
    return _ranges(num_atoms, max(1, ATOM_CHUNK_NUMEL // (9 * num_channels)))


def _pair_chunks(num_pairs: int, num_channels: int) -> List[Tuple[int, int]]:
    """Ranges of pairs whose messages both ways, [2p, 9, C], take one buffer of the message
    kernels' size (``_message_kernels._chunk_size``); a molecule's pairs are one chunk."""
    return _ranges(num_pairs, _chunk_size(9 * num_channels))


def _ranges(count: int, size: int) -> List[Tuple[int, int]]:
    """(start, stop) of consecutive ranges of ``size`` covering 0..count; one empty range when
    count is 0 (so that a kernel's loops run once, and keep what one chunk keeps)."""
    return [(a, min(a + size, count)) for a in range(0, max(count, 1), size)]


def _denominator(X: Tensor) -> Tensor:
    """d_X = ||X|| + 1 of X [n, C, 3, 3]. [n C]"""
    return X.square().sum((-2, -1)).view(-1) + 1                                    # [L]


def _normalized_entries(X: Tensor) -> Tuple[Tensor, Tensor]:
    """X̂ = X / d_X for X [n, C, 3, 3]. -> (X̂ [9, n C] entries, d_X [n C])"""
    X_norm = _denominator(X)                                                        # [L]
    return X.reshape(-1, 9).T / X_norm, X_norm                                      # [9, L], [L]
