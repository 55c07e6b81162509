"""Evaluation kernels of the real spherical harmonics (private): Eq. (1)-(2) in plain
differentiable ops, the eager CPU kernels in cache-sized blocks of edges (the recursion, and
the polynomials of Eq. (3) for unit vectors), the autograd Function that joins them, and the
choice between them (``_evaluate``). The equations are those of the module docstring of
``layers.spherical_harmonics``; the coefficient tensors come from ``_sh_coefficients``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------
def _chunk_size(lmax: int) -> int:
    """Edges per block of the eager kernels: the [3(2l-1), chunk] intermediates stay in cache,
    yet each op is large enough to amortize its launch cost (measured on CPU)."""
    return max(1024, 196608 // (6 * lmax - 3)) if lmax > 0 else 1 << 30


_EPS = 1e-12  # r / max(|r|, eps), as torch.nn.functional.normalize and e3nn
_CLAMPED = 0.9999 / _EPS  # inverse norms from here on are clamped: u = r / eps is not unit


def _overflow_scale(vectors: Tensor) -> Tensor:
    """1, or b / max_k |r_k| for vectors longer than b = tiny^(-1/4) (3e9 in float32, 8e76 in
    float64): u = r / |r| does not change when r is scaled, so the scaled vector normalizes to
    the same u, with a finite squared norm (it overflows above 1.8e19 in float32, 1.3e154 in
    float64) and a first derivative whose |r|^-3 does not underflow. Detached: a constant
    factor c has du/dr = c J(c r) = J(r), the exact Jacobian. Five elementwise ops, fused
    under torch.compile. [E, 3] -> [E, 1]"""
    big = torch.finfo(vectors.dtype).tiny ** -0.25
    largest = vectors.detach().abs().amax(dim=-1, keepdim=True)                 # [E, 1]
    return big / largest.clamp_min(big)  # exactly 1 unless largest > big        # [E, 1]


def _normalize(vectors: Tensor) -> Tensor:
    """r / max(|r|, eps) in differentiable ops, through the clamped squared norm, so that
    second derivatives at r = 0 are finite too (those of F.normalize are NaN there). Vectors
    whose squared norm would overflow are scaled down first (``_overflow_scale``)."""
    vectors = vectors * _overflow_scale(vectors)                                # [E, 3]
    squared = (vectors * vectors).sum(dim=-1, keepdim=True)                     # [E, 1]
    return vectors * torch.rsqrt(squared.clamp_min(_EPS * _EPS))                # [E, 3]


def _normalize_backward(vectors: Tensor, grad_u: Tensor) -> Tensor:
    """Vector-Jacobian product of ``_normalize``: (g - (g.u) u) / |r|, or g / eps where the
    norm is clamped; differentiable (double backward)."""
    scale = _overflow_scale(vectors)                                            # [E, 1]
    vectors = vectors * scale                                                   # [E, 3]
    squared = (vectors * vectors).sum(dim=-1, keepdim=True)                     # [E, 1]
    inv_norm = torch.rsqrt(squared.clamp_min(_EPS * _EPS))                      # [E, 1]
    u = vectors * inv_norm                                                      # [E, 3]
    radial = (grad_u * u).sum(dim=-1, keepdim=True) * (squared > _EPS * _EPS)   # [E, 1]
    return (grad_u - radial * u) * (inv_norm * scale)                           # [E, 3]


def _forward_reference(u: Tensor, lmax: int, y0: Tensor, forward_t: Sequence[Tensor]) -> Tensor:
    """Eq. (1) on unit (or raw) vectors u, in plain differentiable ops, component-major (the
    layout in which every op runs along the long edge axis). Used under torch.compile, on GPUs
    and as the test reference of the blocked CPU kernels."""
    u_t = u.t()                                                                 # [3, E]
    y = y0.expand(1, u.shape[0])                                                # [1, E]
    blocks = [y]
    for a in forward_t:
        outer = (y[:, None, :] * u_t[None, :, :]).reshape(3 * y.shape[0], u.shape[0])  # [3(2l-1), E]
        y = a @ outer                                                           # [2l+1, E]
        blocks.append(y)
    return torch.cat(blocks, dim=0).t().contiguous()                            # [E, M]


def _forward_plain(vectors: Tensor, lmax: int, normalize: bool, tensors: Tuple[Tensor, ...]) -> Tensor:
    """Y(r / |r|) (or Y(r)) in plain differentiable ops: normalization, then Eq. (1). [E, 3] -> [E, M]"""
    u = _normalize(vectors) if normalize else vectors                           # [E, 3]
    return _forward_reference(u, lmax, tensors[0], tensors[1:lmax + 1])


def _backward_reference(grad_sh: Tensor, sh: Tensor, lmax: int,
                        backward_t: Sequence[Tensor]) -> Tensor:
    """Eq. (2) in plain differentiable ops: dL/du_k = sum_{l,i,j} G_l^i B_l[(j,k), i] Y_{l-1}^j.
    Differentiable in ``grad_sh`` and ``sh``, which gives double backward."""
    num_lower = lmax * lmax
    grad_t = grad_sh.t()                                                        # [M, E]
    weighted = torch.cat([b @ grad_t[l * l:(l + 1) ** 2]
                          for l, b in enumerate(backward_t, start=1)])          # [3 M', E]
    weighted = weighted.view(num_lower, 3, sh.shape[0])                         # [M', 3, E]
    return (weighted * sh.t()[:num_lower, None, :]).sum(0).t()                  # [E, 3]


def _unit_block(vectors: Tensor, start: int, n: int, normalize: bool, u_buffer: Tensor,
                norm_buffer: Tensor) -> Tuple[Tensor, Tensor]:
    """Edges start..start+n of the (normalized) vectors, component-major [3, n] in u_buffer,
    and their inverse clamped norms 1 / max(|r|, eps) [n] (in cache: cheaper than normalizing
    the [E, 3] layout). The transposition is, in float32, a matmul with the identity, several
    times faster than a strided copy, and otherwise a stack of the three columns (2.5x faster
    than that matmul in float64; measured on CPU at 1e3-1e4 vectors); the norm is not
    linalg.vector_norm(dim=0), two orders of magnitude slower here, nor sqrt, which with 2
    OpenMP threads stalls for milliseconds on a busy CPU (rsqrt does not). Where the squared
    norm overflows (rsqrt gives 0; |r| above about 1.8e19 in float32), those vectors are
    normalized again after division by their largest component (eager CPU only: a host sync)."""
    u_t, inv_norm = u_buffer[:, :n], norm_buffer[:n]                            # [3, c], [c]
    block = vectors[start:start + n]                                            # [c, 3]
    if vectors.dtype == torch.float32:
        torch.mm(torch.eye(3, dtype=vectors.dtype, device=vectors.device), block.t(), out=u_t)
    else:
        torch.stack(block.unbind(1), out=u_t)
    if normalize:
        torch.sum(u_t * u_t, dim=0, out=inv_norm)
        torch.rsqrt(inv_norm.clamp_min_(_EPS * _EPS), out=inv_norm)
        u_t.mul_(inv_norm)
        if float(inv_norm.min()) == 0.0:  # |r|^2 overflowed: rsqrt(inf) = 0, u = 0
            huge = (inv_norm == 0.0).nonzero()[:, 0]                            # [h]
            r = block.index_select(0, huge).t()                                 # [3, h]
            inv_largest = r.abs().amax(dim=0).reciprocal()                      # [h]
            scaled = r * inv_largest                                            # [3, h]
            inv_scaled_norm = torch.rsqrt((scaled * scaled).sum(0))             # [h]
            u_t[:, huge] = scaled * inv_scaled_norm
            inv_norm[huge] = inv_largest * inv_scaled_norm
    return u_t, inv_norm


def _unit_jacobian_block(grad_u: Tensor, u_t: Tensor, inv_norm: Tensor, any_short: bool = True) -> Tensor:
    """In place, the vector-Jacobian product of u = r / max(|r|, eps) on a component-major
    block: (g - (g.u) u) / |r|, or g / eps where the norm is clamped (there are none such when
    ``any_short`` is False). [3, c] -> [3, c]"""
    radial = (grad_u * u_t).sum(0)                                              # [c]
    if any_short:
        radial.masked_fill_(inv_norm >= _CLAMPED, 0.0)
    return grad_u.addcmul_(u_t, radial, value=-1.0).mul_(inv_norm)


def _to_edge_major(values: Tensor, out: Tensor) -> Tensor:
    """out [c, k] = values [k, c] transposed, by a matmul with the identity (a strided copy_
    is several times slower)."""
    eye = torch.eye(values.shape[0], dtype=values.dtype, device=values.device)
    return torch.mm(values.t(), eye, out=out)


def _forward_chunked(vectors: Tensor, lmax: int, normalize: bool, y0: Tensor,
                     forward_t: Sequence[Tensor]) -> Tensor:
    """Eq. (1) eagerly, in cache-sized blocks of edges with preallocated buffers."""
    num_edges, size = vectors.shape[0], (lmax + 1) ** 2
    out = vectors.new_empty(num_edges, size)                                    # [E, M]
    chunk = min(_chunk_size(lmax), max(num_edges, 1))
    y_buffer = vectors.new_empty(size, chunk)                                   # [M, c]
    outer_buffer = vectors.new_empty(max(3 * (2 * lmax - 1), 1) * chunk)
    u_buffer, norm_buffer = vectors.new_empty(3, chunk), vectors.new_empty(chunk)
    y_buffer[0].copy_(y0.expand(chunk))  # Y_0 is constant: written once, kept by every block
    for start in range(0, num_edges, chunk):
        n = min(chunk, num_edges - start)
        u_t, _ = _unit_block(vectors, start, n, normalize, u_buffer, norm_buffer)  # [3, c]
        y_t = y_buffer[:, :n]                                                   # [M, c]
        for l, a in enumerate(forward_t, start=1):
            outer = outer_buffer[:3 * (2 * l - 1) * n].view(2 * l - 1, 3, n)
            torch.mul(y_t[(l - 1) ** 2:l * l, None, :], u_t[None], out=outer)  # [2l-1, 3, c]
            torch.mm(a, outer.view(-1, n), out=y_t[l * l:(l + 1) ** 2])        # [2l+1, c]
        out[start:start + n].copy_(y_t.t())
    return out


def _backward_chunked(grad_sh: Tensor, sh: Tensor, vectors: Tensor, lmax: int, normalize: bool,
                      backward_t: Sequence[Tensor]) -> Tensor:
    """Eq. (2) and the normalization's Jacobian eagerly, in cache-sized blocks (first order)."""
    num_edges, num_lower = sh.shape[0], lmax * lmax
    grad_vectors = sh.new_empty(num_edges, 3)                                   # [E, 3]
    chunk = min(_chunk_size(lmax), max(num_edges, 1))
    w_buffer = sh.new_empty(3 * num_lower * chunk)
    y_buffer = sh.new_empty(num_lower * chunk)
    g_buffer = sh.new_empty((lmax + 1) ** 2 * chunk)
    u_buffer, norm_buffer = sh.new_empty(3, chunk), sh.new_empty(chunk)
    for start in range(0, num_edges, chunk):
        n = min(chunk, num_edges - start)
        weighted = w_buffer[:3 * num_lower * n].view(3 * num_lower, n)         # [3 M', c]
        y_t = y_buffer[:num_lower * n].view(num_lower, n)                       # [M', c]
        y_t.copy_(sh[start:start + n, :num_lower].t())
        grad_t = g_buffer[:(lmax + 1) ** 2 * n].view(-1, n)                     # [M, c]
        grad_t.copy_(grad_sh[start:start + n].t())
        for l, b in enumerate(backward_t, start=1):
            torch.mm(b, grad_t[l * l:(l + 1) ** 2], out=weighted[3 * (l - 1) ** 2:3 * l * l])
        grad_u = weighted.view(num_lower, 3, n).mul_(y_t[:, None, :]).sum(0)   # [3, c]
        if normalize:
            u_t, inv_norm = _unit_block(vectors, start, n, True, u_buffer, norm_buffer)
            grad_u = _unit_jacobian_block(grad_u, u_t, inv_norm)                # [3, c]
        _to_edge_major(grad_u, grad_vectors[start:start + n])
    return grad_vectors


# Eq. (3) up to these lmax (normalize=True), Eq. (1) / (2) above, where they are faster (CPU,
# 1e3-1e5 vectors: the dense A and D A grow as (lmax+1)^4, the recursion as (lmax+1)^2)
_POLYNOMIAL_LMAX, _POLYNOMIAL_BACKWARD_LMAX = 6, 4


def _fill_sphere_monomials(z: Tensor, lmax: int) -> None:
    """Rows of z [M, c] for degrees 2..lmax from rows 0..3 (1, x, y, z), in the order of
    ``_sphere_monomials``: the degree-d block (rows d^2 .. (d+1)^2) is x * (degree d-1 block),
    then y * (its last two rows)."""
    for d in range(2, lmax + 1):
        previous, block = z[(d - 1) ** 2:d * d], z[d * d:(d + 1) ** 2]
        torch.mul(previous, z[1:2], out=block[:2 * d - 1])
        torch.mul(previous[-2:], z[2:3], out=block[2 * d - 1:])


def _short_vectors(inv_norm: Tensor) -> Optional[Tensor]:
    """Positions of the vectors shorter than eps (u = r / eps is not on the sphere), or None."""
    return (inv_norm >= _CLAMPED).nonzero()[:, 0] if float(inv_norm.max()) >= _CLAMPED else None


def _forward_polynomial(vectors: Tensor, lmax: int, values: Tensor, y0: Tensor,
                        forward_t: Sequence[Tensor], keep_unit: bool) -> Tuple[Tensor, Tensor, bool]:
    """Eq. (3), Y = P(u) A on the sphere monomials of the unit vectors u = r / |r|, eagerly, in
    cache-sized blocks of edges. The rare vectors shorter than eps (u = r / eps, not on the
    sphere) get Eq. (1) instead. Returns Y [E, M], the unit vectors and inverse clamped norms
    [4, E] (u_x, u_y, u_z, 1 / max(|r|, eps), kept for the backward; the u rows are written only
    if ``keep_unit``) and whether any vector was shorter than eps."""
    num_edges = vectors.shape[0]
    out = vectors.new_empty(num_edges, values.shape[1])                         # [E, M]
    unit = vectors.new_empty(4, num_edges)                                      # [4, E]
    chunk = min(_chunk_size(lmax), max(num_edges, 1))
    z_buffer = vectors.new_empty(values.shape[0], chunk)                        # [M, c]
    z_buffer[0].fill_(1.0)
    any_short = False
    for start in range(0, num_edges, chunk):
        n = min(chunk, num_edges - start)
        z = z_buffer[:, :n]                                                     # [M, n]
        _, inv_norm = _unit_block(vectors, start, n, True, z[1:4], unit[3, start:start + n])
        if keep_unit:
            unit[:3, start:start + n].copy_(z[1:4])
        _fill_sphere_monomials(z, lmax)
        torch.mm(z.t(), values, out=out[start:start + n])                      # [n, M]
        short = _short_vectors(inv_norm)
        if short is not None:
            any_short = True
            u = z[1:4].index_select(1, short).t()                               # [s, 3]
            out[start + short] = _forward_reference(u, lmax, y0, forward_t)
    return out, unit, any_short


def _backward_polynomial(grad_sh: Tensor, sh: Tensor, unit: Tensor, any_short: bool, lmax: int,
                         gradients: Tensor, backward_t: Sequence[Tensor]) -> Tensor:
    """Eq. (3) backward, dL/du_k = sum_a' P_a'(u) (G (D_k A)^T)_a', and the normalization's
    Jacobian, eagerly in blocks (first order), from the forward's unit vectors and inverse norms
    ``unit`` [4, E]. The component of dL/du along u, where the sphere polynomial and Y differ off
    the sphere, is removed by the Jacobian (I - u u^T) / |r|; vectors shorter than eps get
    Eq. (2)."""
    num_edges, num_lower = unit.shape[1], gradients.shape[0] // 3
    grad_vectors = unit.new_empty(num_edges, 3)                                 # [E, 3]
    chunk = min(_chunk_size(lmax), max(num_edges, 1))
    z_buffer = unit.new_empty(max(num_lower, 4), chunk)                         # [M', c]
    h_buffer = unit.new_empty(gradients.shape[0] * chunk)
    z_buffer[0].fill_(1.0)
    for start in range(0, num_edges, chunk):
        n = min(chunk, num_edges - start)
        z, inv_norm = z_buffer[:, :n], unit[3, start:start + n]                 # [M', n], [n]
        z[1:4].copy_(unit[:3, start:start + n])
        _fill_sphere_monomials(z, lmax - 1)
        h = h_buffer[:gradients.shape[0] * n].view(3, num_lower, n)            # [3, M', n]
        torch.mm(gradients, grad_sh[start:start + n].t(), out=h.view(-1, n))
        grad_u = h.mul_(z[None, :num_lower]).sum(1)                             # [3, n]
        short = _short_vectors(inv_norm) if any_short else None
        if short is not None:
            rows = start + short
            grad_u[:, short] = _backward_reference(grad_sh[rows], sh[rows], lmax, backward_t).t()
        grad_u = _unit_jacobian_block(grad_u, z[1:4], inv_norm, short is not None)  # [3, n]
        _to_edge_major(grad_u, grad_vectors[start:start + n])
    return grad_vectors


def _sh_forward(vectors: Tensor, lmax: int, normalize: bool, tensors: Tuple[Tensor, ...],
                for_backward: bool = True) -> Tuple[Tensor, Optional[Tensor], bool]:
    """Y(r / |r|) [E, M] by Eq. (3) (blocked, lmax <= 6, normalize), Eq. (1) blocked, or Eq. (1)
    in plain differentiable ops (off the CPU); with Eq. (3) also the
    unit vectors for its backward (if ``for_backward``) and whether any vector was shorter than
    eps."""
    y0, matrices = tensors[0], tensors[1:]
    if vectors.device.type != "cpu":
        return _forward_plain(vectors, lmax, normalize, tensors), None, True
    if normalize and 0 < lmax <= _POLYNOMIAL_LMAX:
        return _forward_polynomial(vectors, lmax, matrices[2 * lmax], y0, matrices[:lmax], for_backward)
    return _forward_chunked(vectors, lmax, normalize, y0, matrices[:lmax]), None, True


class _SphericalHarmonicsFn(torch.autograd.Function):
    """Y(r / |r|) by ``_sh_forward``; its backward by Eq. (2) or (3) and the normalization's
    Jacobian, itself differentiable (double backward). The coefficient tensors are constants:
    they come in as one tuple (not autograd inputs) and are kept on ctx, not saved. (The
    forward(ctx, ...) form: its apply costs a third of the setup_context form's, ~8 vs ~26 us.)"""

    @staticmethod
    def forward(ctx, vectors: Tensor, lmax: int, normalize: bool, tensors: Tuple[Tensor, ...]) -> Tensor:
        output, unit, any_short = _sh_forward(vectors, lmax, normalize, tensors)
        ctx.lmax, ctx.normalize, ctx.tensors, ctx.any_short = lmax, normalize, tensors, any_short
        ctx.save_for_backward(vectors, output, unit)
        return output

    @staticmethod
    def backward(ctx, grad_sh: Tensor):
        vectors, sh, unit = ctx.saved_tensors
        lmax, normalize, matrices = ctx.lmax, ctx.normalize, ctx.tensors[1:]
        backward_t = matrices[lmax:2 * lmax]
        if lmax == 0:
            grad_vectors = torch.zeros_like(vectors)
        elif torch.is_grad_enabled() or vectors.device.type != "cpu":  # create_graph=True, or a GPU
            grad_vectors = _backward_reference(grad_sh, sh, lmax, backward_t)  # [E, 3]
            if normalize:
                grad_vectors = _normalize_backward(vectors, grad_vectors)
        elif unit is not None and lmax <= _POLYNOMIAL_BACKWARD_LMAX:
            grad_vectors = _backward_polynomial(grad_sh, sh, unit, ctx.any_short, lmax, matrices[-1],
                                                backward_t)
        else:
            grad_vectors = _backward_chunked(grad_sh, sh, vectors, lmax, normalize, backward_t)
        return grad_vectors, None, None, None


def _evaluate(vectors: Tensor, lmax: int, normalize: bool, tensors: List[Tensor]) -> Tensor:
    flat = vectors if vectors.dim() == 2 else vectors.reshape(-1, 3)  # no view node for [E, 3]
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        # Plain differentiable ops: the compiler derives the backward itself and fuses both
        # (and dynamo need not trace the autograd.Function, which torch 2.11's inductor
        # could not on CUDA); torch.func transforms (grad, jacrev, vmap) differentiate them too.
        sh = _forward_plain(flat, lmax, normalize, tuple(tensors))              # [E, M]
    elif torch.is_grad_enabled() and flat.requires_grad:
        sh = _SphericalHarmonicsFn.apply(flat, lmax, normalize, tuple(tensors))   # [E, M]
    else:  # no graph to record: skip the autograd.Function's own cost
        sh = _sh_forward(flat, lmax, normalize, tuple(tensors), for_backward=False)[0]  # [E, M]
    return sh if vectors.dim() == 2 else sh.reshape(vectors.shape[:-1] + (sh.shape[-1],))
