"""Fused forward/backward of the message scatters on the CPU (private kernels).

Each computes the same numbers as its reference (``pairs.pair_convolution`` here,
``scatter.scatter_outer`` in ``_scatter_outer_kernels``) without materializing the per-edge
messages [E, n, C], the largest tensors of the SchNet- and TensorNet-style models on crystals,
whose writing and reading at full size was most of their time: edges are processed in
cache-sized chunks, each message block built in one small reused buffer and added into the
output. The chunk size and the rule of when a kernel runs (``CHUNK_NUMEL``, ``kernel_applies``)
are shared with the scatter of outer products' kernels (``_scatter_outer_kernels``) and the ACE
atomic basis' kernels (``_atomic_basis_kernels``).

Pair convolution, w_p spread over the rows of its part:

    out[i_p] += w_p ∘ x[j_p],   out[j_p] += w_p ∘ x[i_p].

Linear in x with a symmetric pattern (each pair sends the same weights both ways), so with the
output gradient g

    dx = pair_convolution(w, g),   dw_p[k] = Σ_{rows n of part k} g[i_p, n] x[j_p, n] + g[j_p, n] x[i_p, n].

Without a graph of the backward, the gradients are computed chunk by chunk in one pass. With
one (create_graph: training on forces) they are autograd nodes computed chunk by chunk too, whose
own gradients are again these kernels, so no per-edge array is built at any order: dx of the
convolution is the convolution again, its dw ``PairWeightGradient`` (gradients: convolutions).

Also here, for frozen models on large systems: the filter networks W = σ(network(e)) u chunk by
chunk of edges (``FrozenFilter``, behind ``mlp.radial_filter``), whose backward recomputes each
chunk instead of keeping every hidden activation of every edge.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import _native
from .._frozen import frozen_on_cpu_eager, reference_gradients
from ..memory import freed_memory_is_reused

# numbers per thread in the largest [chunk, n, C] buffer (1 MiB in float32): stays in cache
# between the gather that writes it and the product and index_add that read it
CHUNK_NUMEL = 1 << 18


# messages of at least this many bytes take the kernels even within one chunk. A/B, training
# steps (where the kernels' backward is chunked to every order): SchNet-style 16 aspirins
# (2400 pairs, 1.2 MB in float32) 1.17x best call, TensorNet-style aspirin float64 (1.4 MB)
# 1.01x best / 1.07x median; inference of the 16 aspirins (SchNet-style) 1.04x / 1.14x
KERNEL_MIN_BYTES = 1 << 20


_WORKSPACES = threading.local()


def workspace(slot: str, shape: Tuple[int, ...], like: Tensor) -> Tensor:
    """A reused buffer of ``shape`` (like's dtype and device) for a kernel's temporaries, kept
    per thread between calls under the name ``slot`` and grown when too small. A kernel's
    temporaries of a megabyte or more, allocated fresh at every call, are often fresh pages of
    memory from the C library (``molnets.memory``), faulted in on first touch, at a cost that can
    exceed the work that writes them (TensorNet-style aspirin, float64: 0.8 ms per gather). Only
    for temporaries that live within one forward or one backward (never saved for a backward,
    never returned), and never two at once under one name. Each buffer is at most one chunk of
    ``CHUNK_NUMEL`` numbers per thread (4 MiB in float64 with 2 threads) or a kernel's one-chunk
    [2P, 9, C]: a few such buffers per thread and dtype stay in memory."""
    buffers = getattr(_WORKSPACES, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACES.buffers = {}
    key = (slot, like.dtype, like.device)
    numel = math.prod(shape)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # reusable outside inference mode too
            buffer = buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buffer[:numel].view(shape)


def kernel_applies(num_edges: int, message_numel: int, like: Tensor, min_bytes: float = KERNEL_MIN_BYTES) -> bool:
    """Whether the chunked kernels run for num_edges messages of n C numbers each: eager on
    the CPU with more than one chunk of messages or at least ``min_bytes`` of them. Otherwise
    the references: compiled (the compiler fuses them itself), on other devices (which want few
    large kernels), or for small messages (a small molecule: the kernel's Python costs more
    there). The choice depends on shapes only."""
    return (not torch.compiler.is_compiling() and like.device.type == "cpu"
            and (num_edges > _chunk_size(message_numel)
                 or num_edges * message_numel * like.element_size() >= min_bytes))


def spread_over_rows(weights: Tensor, parts: Sequence[Tuple[int, int]]) -> Tensor:
    """weights[:, part(n)] for every row n: [E, K, C] -> [E, n, C] (a view for one part). An
    index_select, whose backward is an index_add (indexing with a list would accumulate with
    index_put, several times slower). Compiled, each part's column expanded and concatenated:
    its backward is a sum, where the compiler would turn the index_add into atomic adds."""
    if len(parts) == 1:
        return weights                                                              # [E, 1, C]
    if torch.compiler.is_compiling():
        return torch.cat([weights[:, k:k + 1].expand(-1, b - a, -1) for k, (a, b) in enumerate(parts)], dim=1)
    return weights.index_select(1, _part_of_row(parts, weights.device))              # [E, n, C]


def sum_parts(rows: Tensor, parts: Sequence[Tuple[int, int]], out: Optional[Tensor] = None) -> Tensor:
    """Σ over the rows of each part, the adjoint of ``spread_over_rows``: one index_add over the
    row axis (1.3-2x faster than a sum per part at [150-300, 9, 128]); differentiable, or into
    ``out`` (overwritten). Used by the kernels (eager).

    Shapes:
        rows [..., n, C]  ->  [..., K, C]
    """
    out = rows.new_zeros(rows.shape[:-2] + (len(parts), rows.shape[-1])) if out is None else out.zero_()
    index = _part_of_row(parts, rows.device)                                        # [n]
    return out.index_add_(-2, index, rows)


_PART_OF_ROW: Dict[Tuple[Tuple[Tuple[int, int], ...], torch.device], Tensor] = {}


def _part_of_row(parts: Sequence[Tuple[int, int]], device: torch.device) -> Tensor:
    """The part k of every row n, [n] (long), kept per parts and device."""
    key = (tuple((int(a), int(b)) for a, b in parts), torch.device(device))
    index = _PART_OF_ROW.get(key)
    if index is None:
        with torch.inference_mode(False):  # usable outside inference mode (saved for a backward)
            index = _PART_OF_ROW[key] = torch.tensor(
                [k for k, (a, b) in enumerate(key[0]) for _ in range(a, b)], device=device)
    return index


def _chunk_size(message_numel: int) -> int:
    """Edges per chunk for messages of n C numbers each."""
    return max(1, CHUNK_NUMEL * torch.get_num_threads() // max(message_numel, 1))


def scale_parts(rows: Tensor, weights: Tensor, parts: Sequence[Tuple[int, int]],
                out: Optional[Tensor] = None) -> Tensor:
    """out[..., a:b, :] = rows[..., a:b, :] * weights[..., k, :] for part k = (a, b): each part's
    filter on its rows, slice by slice, never spread over the n rows first (a [.., n, C] tensor
    written and read again). In place when ``out`` is None (or is ``rows``).

    Shapes:
        rows [..., n, C or 1], weights [..., K, C], broadcastable to out [..., n, C]  ->  out
    """
    out = rows if out is None else out
    for k, (start, stop) in enumerate(parts):
        torch.mul(rows[..., start:stop, :], weights[..., k:k + 1, :], out=out[..., start:stop, :])
    return out


def native_convolution(weights: Tensor, x: Tensor, pair_i: Tensor, pair_j: Tensor,
                       parts: Sequence[Tuple[int, int]], out: Tensor) -> Tensor:
    """out += the pair convolution (module docstring) by the compiled kernel (``molnets._native``;
    where ``_native.applies``), in one pass over the pairs: no per-pair array. out [N, n, C]
    contiguous. -> out"""
    (N, n, C), (P, K) = x.shape, weights.shape[:2]
    _native.call("pair_convolution_forward", x, out, x.contiguous(), weights.contiguous(),
                 _part_of_row(parts, x.device), pair_i.contiguous(), pair_j.contiguous(), N, P, n, K, C)
    return out


def native_convolution_backward(grad_out: Tensor, weights: Tensor, x: Tensor, pair_i: Tensor, pair_j: Tensor,
                                parts: Sequence[Tuple[int, int]], grad_x: Optional[Tensor],
                                grad_w: Optional[Tensor]) -> None:
    """The backward of ``native_convolution`` in one pass over the pairs: dx added into
    ``grad_x`` [N, n, C], dw written into ``grad_w`` [P, K, C] (contiguous; either may be None)."""
    (N, n, C), (P, K) = x.shape, weights.shape[:2]
    _native.call("pair_convolution_backward", x, grad_x, grad_w, grad_out.contiguous(), x.contiguous(),
                 weights.contiguous(), _part_of_row(parts, x.device), pair_i.contiguous(), pair_j.contiguous(),
                 N, P, n, K, C)


def forward_chunked(weights: Tensor, x: Tensor, pair_i: Tensor, pair_j: Tensor,
                    parts: Sequence[Tuple[int, int]]) -> Tensor:
    """The convolution chunk by chunk of pairs (module docstring), or by the compiled kernel
    where it runs. -> [N, n, C]"""
    if _native.applies(weights, x):
        return native_convolution(weights, x, pair_i, pair_j, parts, x.new_zeros(x.shape))
    num_pairs = pair_i.shape[0]
    out = torch.zeros_like(x)                                                        # [N, n, C]
    chunk = _chunk_size(x.shape[1] * x.shape[2])
    buffer = workspace("messages", (min(chunk, num_pairs),) + x.shape[1:], x)         # [p, n, C]
    for start in range(0, num_pairs, chunk):
        stop = min(start + chunk, num_pairs)
        i, j, w = pair_i[start:stop], pair_j[start:stop], weights[start:stop]
        messages = buffer[:stop - start]                                             # [p, n, C]
        for source, target in ((j, i), (i, j)):
            torch.index_select(x, 0, source, out=messages)
            scale_parts(messages, w, parts)
            out.index_add_(0, target, messages)
    return out


def backward_chunked(grad_out: Tensor, weights: Tensor, x: Tensor, pair_i: Tensor, pair_j: Tensor,
                     parts: Sequence[Tuple[int, int]], need_weights: bool, need_x: bool
                     ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(dweights, dx) in one pass over chunks of pairs, no graph (module docstring), or by the
    compiled kernel where it runs."""
    num_pairs = pair_i.shape[0]
    grad_w = weights.new_empty(weights.shape) if need_weights else None              # [P, K, C]
    grad_x = x.new_zeros(x.shape) if need_x else None                               # [N, n, C]
    if _native.applies(grad_out, weights, x):
        native_convolution_backward(grad_out, weights, x, pair_i, pair_j, parts, grad_x, grad_w)
        return grad_w, grad_x
    chunk = _chunk_size(x.shape[1] * x.shape[2])
    shape = (min(chunk, num_pairs),) + x.shape[1:]
    slots = ("gathered", "gathered_2", "rows", "rows_2")
    g_i, g_j, x_i, x_j = (workspace(slot, shape, x) for slot in slots)              # [p, n, C]
    for start in range(0, num_pairs, chunk):
        stop = min(start + chunk, num_pairs)
        p = stop - start
        i, j, w = pair_i[start:stop], pair_j[start:stop], weights[start:stop]
        gi, gj = torch.index_select(grad_out, 0, i, out=g_i[:p]), torch.index_select(grad_out, 0, j, out=g_j[:p])
        if grad_w is not None:
            xi, xj = torch.index_select(x, 0, i, out=x_i[:p]), torch.index_select(x, 0, j, out=x_j[:p])
            sum_parts(xj.mul_(gi).addcmul_(gj, xi), parts, out=grad_w[start:stop])   # [p, K, C]
        if grad_x is not None:
            scale_parts(gj, w, parts)
            grad_x.index_add_(0, i, gj)
            scale_parts(gi, w, parts)
            grad_x.index_add_(0, j, gi)
    return grad_w, grad_x


class PairWeightGradient(torch.autograd.Function):
    """dw of the pair convolution (module docstring) chunk by chunk, for a backward that must
    itself be differentiable (training on forces). dw is bilinear in g and x and each pair acts
    the same way in both directions, so with h = ∂L/∂dw [P, K, C]

        ∂L/∂g = pair_convolution(h, x),   ∂L/∂x = pair_convolution(h, g):

    two more chunked convolutions, and no per-pair [P, n, C] array is built at any order.
    ``weights`` gives dw's shape only (it gets no gradient here).

    Shapes:
        grad_out [N, n, C], x [N, n, C], weights [P, K, C], pair_i [P], pair_j [P]  ->  [P, K, C]
    """

    @staticmethod
    def forward(grad_out: Tensor, x: Tensor, weights: Tensor, pair_i: Tensor, pair_j: Tensor,
                parts: Sequence[Tuple[int, int]]) -> Tensor:
        return backward_chunked(grad_out.contiguous(), weights, x, pair_i, pair_j, parts, True, False)[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        grad_out, x, _, pair_i, pair_j, parts = inputs
        ctx.save_for_backward(grad_out, x, pair_i, pair_j)
        ctx.parts = parts

    @staticmethod
    def backward(ctx: Any, h: Tensor) -> Tuple[Optional[Tensor], ...]:
        grad_out, x, pair_i, pair_j = ctx.saved_tensors
        need_grad_out, need_x = ctx.needs_input_grad[:2]
        grad_grad_out = PairConvolution.apply(h, x, pair_i, pair_j, ctx.parts) if need_grad_out else None
        grad_x = PairConvolution.apply(h, grad_out, pair_i, pair_j, ctx.parts) if need_x else None
        return grad_grad_out, grad_x, None, None, None, None


class PairConvolution(torch.autograd.Function):
    """``pairs.pair_convolution`` with the chunked forward and backward of the module docstring."""

    @staticmethod
    def forward(weights: Tensor, x: Tensor, pair_i: Tensor, pair_j: Tensor,
                parts: Sequence[Tuple[int, int]]) -> Tensor:
        return forward_chunked(weights, x, pair_i, pair_j, parts)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        weights, x, pair_i, pair_j, parts = inputs
        ctx.save_for_backward(weights, x, pair_i, pair_j)
        ctx.parts = parts

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        weights, x, pair_i, pair_j = ctx.saved_tensors
        need_weights, need_x = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # a graph of the backward is wanted
            grad_w = (PairWeightGradient.apply(grad_out, x, weights, pair_i, pair_j, ctx.parts)
                      if need_weights else None)
            grad_x = PairConvolution.apply(weights, grad_out, pair_i, pair_j, ctx.parts) if need_x else None
        else:
            grad_w, grad_x = backward_chunked(grad_out.contiguous(), weights, x, pair_i, pair_j, ctx.parts,
                                              need_weights, need_x)
        return grad_w, grad_x, None, None, None


# ------------------------------------------------- filter networks of frozen models, chunk by chunk


_WIDEST: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def _widest(network: nn.Module) -> int:
    """The widest output of a dense layer of ``network`` (its widest activation), kept per
    network (a module's layers do not change width; looked up at every call)."""
    widest = _WIDEST.get(network)
    if widest is None:
        widest = _WIDEST[network] = max(m.out_features for m in network.modules() if isinstance(m, nn.Linear))
    return widest


# glibc's malloc serves a block above its largest mmap threshold (32 MiB) with a fresh mapping,
# faulted in page by page at every call (molnets.memory): the filter activations above this size
# are what FrozenFilter saves. Measured (TensorNet-style, fcc Cu, 2 threads, A/B in one process):
# widest activation 136 MB 1.48x, 57-68 MB 1.19x, 29 MB 1.00x, 8-17 MB 0.94x (the recomputation);
# with freed memory reused (no fresh mappings) 0.89x at 68 MB, so then it does not run.
FRESH_MAPPING_BYTES = 32 << 20


def filter_kernel_applies(network: nn.Module, radial: Tensor) -> bool:
    """Whether ``FrozenFilter`` runs: eager on the CPU, the network's weights frozen
    (``molnets._frozen.frozen_on_cpu_eager``), its widest activation over all rows larger than
    ``FRESH_MAPPING_BYTES`` (below that, the backward's recomputation costs more than the
    activations it avoids keeping), and freed memory not kept for reuse
    (``molnets.memory.freed_memory_is_reused``: then there are no fresh blocks to avoid).
    Shapes and flags only."""
    # the cheap tests first: on a small molecule this runs per layer and call
    return (radial.device.type == "cpu" and not torch.compiler.is_compiling()
            and radial.shape[0] * _widest(network) * radial.element_size() > FRESH_MAPPING_BYTES
            and not freed_memory_is_reused() and frozen_on_cpu_eager(network, radial))


def network_output(network: nn.Module, activation: Optional[Callable[[Tensor], Tensor]], radial: Tensor) -> Tensor:
    """σ(network(e)), or network(e) without an activation (``mlp.radial_filter`` before the
    envelope). [rows, D]"""
    out = network(radial)
    return out if activation is None else activation(out)


class FrozenFilter(torch.autograd.Function):
    """W = σ(network(e)) u, a frozen filter network on many edges, chunk by chunk of rows.

    Plain operations keep every hidden activation of every edge for the backward ([E, width]
    each, hundreds of MB on a crystal of thousands of atoms, each a fresh block faulted in page by
    page at every call). Here the forward keeps none: it runs chunk by chunk into the output, and
    the backward runs each chunk's forward again (one more forward of the network) and takes the
    chunk's input gradients from it, in memory of one chunk. With frozen weights the network's
    parameters need no gradient, so only e and u get one. When a graph of the backward is wanted
    (create_graph) the gradients come from the plain operations (differentiable again).

    Shapes:
        radial e [E, K], envelope u [E] or None (u = 1), network (frozen), activation σ or None
        ->  [E, D]
    """

    @staticmethod
    def forward(ctx: Any, radial: Tensor, envelope: Optional[Tensor], network: nn.Module,
                activation: Optional[Callable[[Tensor], Tensor]]) -> Tensor:
        rows = _chunk_size(_widest(network))
        out = None
        for start in range(0, radial.shape[0], rows):
            chunk = network_output(network, activation, radial[start:start + rows])  # [p, D]
            if out is None:
                out = chunk.new_empty(radial.shape[0], chunk.shape[1])               # [E, D]
            if envelope is None:
                out[start:start + rows] = chunk
            else:
                torch.mul(chunk, envelope[start:start + rows, None], out=out[start:start + rows])
        ctx.save_for_backward(radial, envelope)
        ctx.network, ctx.activation = network, activation
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        radial, envelope = ctx.saved_tensors
        network, activation = ctx.network, ctx.activation
        needs = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # a graph of the backward is wanted: through the plain operations
            if envelope is None:
                return reference_gradients(lambda e: network_output(network, activation, e), [radial], needs[:1],
                                           grad, num_args=4)
            return reference_gradients(lambda e, u: network_output(network, activation, e) * u[:, None],
                                       [radial, envelope], needs, grad, num_args=4)
        grad_radial = torch.empty_like(radial) if needs[0] else None                # [E, K]
        grad_envelope = torch.empty_like(envelope) if needs[1] else None             # [E]
        rows = _chunk_size(_widest(network))
        for start in range(0, radial.shape[0], rows):
            stop = min(start + rows, radial.shape[0])
            with torch.enable_grad():
                e = radial[start:stop].detach().requires_grad_(needs[0])              # [p, K]
                chunk = network_output(network, activation, e)                       # [p, D]
            if grad_envelope is not None:
                torch.sum(grad[start:stop] * chunk.detach(), dim=1, out=grad_envelope[start:stop])
            if grad_radial is not None:
                grad_chunk = grad[start:stop] if envelope is None else grad[start:stop] * envelope[start:stop, None]
                (grad_radial[start:stop],) = torch.autograd.grad(chunk, [e], grad_chunk)
        return grad_radial, grad_envelope, None, None
