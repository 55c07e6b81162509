"""The product basis of a frozen layer: as compiled terms, or chunk by chunk of atoms (private; eager CPU).

Where the compiled kernels are built (``molnets._native``), ``NativeProductBasis`` (at the end
of this module) runs for every frozen layer of correlation 1 to 3, any number of atoms; the
chunked kernel below is what runs without them.

``ProductBasis`` in plain operations builds its monomials [C, N, T], the Horner polynomials
[C, N, M, S O] and their gradients for all N atoms at once and keeps them for the backward: on
2048 atoms of Cu in float32 tensors of 30-100 MB each, every one a fresh mapping whose pages are
faulted in at every call (``molnets.memory``), and gigabytes kept until the backward at 16384
atoms. With frozen weights (as calculators run a model) ``FrozenProductBasis`` computes the same
numbers chunk by chunk of atoms, every temporary cache-sized, and keeps only A: the backward
computes each chunk's monomials and polynomials again (a few products with the folded weights,
a small part of the cost). Correlation orders 1 to 3; ν = 4 runs the plain operations.

Per chunk, with x = A channels first [C, n, M], the monomials of degree 2 p_t = x_(a_t) x_(b_t)
(``ProductBasis.prefix2``, ``last2``), and the folded weights F (``ProductBasis._fold``; the
prefix q of the top degree is 1, x or p for ν_max = 1, 2, 3):

    B = x F_1 + p F_2 + Σ_d x_d H_d,   H = (q_low F_low | q F_last)        [C, n, S O] every species

then each atom's own species (``ProductBasis._select``). Backward, from g (zero but at the atom's
species):

    g_x = g F_1ᵀ + Σ_so H_(d, so) g_so + (the prefix's chain),   g_H = x ⊗ g,
    g_q = g_H,last F_lastᵀ + (g_H,low F_lowᵀ on the low monomials) + g F_2ᵀ,
    g_x += (g_q ∘ x_b) onto a + (g_q ∘ x_a) onto b          (ν_max = 3; ν_max = 2: g_x += g_q).

When a graph of the backward is wanted (double backward), the gradients are taken through the
plain operations instead. ``ProductBasis._plain_forward`` is the definition and the tests' oracle.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _native
from ._ace_coupling import irreps_slices, symmetric_coupling
from ._frozen import frozen_cached, frozen_on_cpu_eager, reference_gradients, traced

__all__ = ["FrozenProductBasis", "product_kernel_applies", "NativeProductBasis", "native_product_applies"]

# numbers of one chunk's largest temporaries together, per thread (16 MiB in float32 on two
# threads): the folded weights are read once per chunk, so chunks stay as large as the cache allows
# (A/B against the plain operations, MACE-style Cu 2048 float32, 2 threads, the whole call: ~66,
# ~132 and ~264 atoms a chunk 1.12x, 1.17x and 1.21x, within the noise of each other)
CHUNK_NUMEL = 1 << 21


def numbers_per_atom(layer: nn.Module) -> int:
    """One atom's numbers in a chunk's temporaries: the monomials (prefix, last factor and
    product, 3 T per channel) and the polynomials and their gradient (2 M S O per channel)."""
    T = layer.prefix2.shape[1] if layer.correlation == 3 else layer.irreps_A.dim
    return layer.num_channels * (3 * T + 2 * layer.irreps_A.dim * layer.num_species * layer.num_components_out)


def atoms_per_chunk(layer: nn.Module) -> int:
    """Atoms per chunk: ``CHUNK_NUMEL`` per thread over ``numbers_per_atom``."""
    return max(1, CHUNK_NUMEL * torch.get_num_threads() // numbers_per_atom(layer))


def product_kernel_applies(layer: nn.Module, A: Tensor) -> bool:
    """Whether ``FrozenProductBasis`` runs: frozen weights, eager on the CPU
    (``_frozen.frozen_on_cpu_eager``), correlation 1 to 3, and more atoms than one chunk (on a
    small molecule the plain operations are as fast). Shapes and flags only."""
    return (layer.correlation <= 3 and not traced() and A.shape[0] > atoms_per_chunk(layer)
            and frozen_on_cpu_eager(layer, A))


def _prefix(layer: nn.Module, x: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The top degree's prefix monomials q [C, n, T] and, at ν_max = 3, the factors x_a, x_b of
    the degree-2 monomials ([C, n, T] each)."""
    if layer.correlation == 1:
        return x.new_ones(x.shape[0], x.shape[1], 1), None, None  # the empty product
    if layer.correlation == 2:
        return x, None, None
    x_a, x_b = x @ layer.prefix2, x @ layer.last2                                   # [C, n, T]
    return x_a * x_b, x_a, x_b


def _polynomials(layer: nn.Module, q: Tensor) -> Tuple[Tensor, Tensor]:
    """The top degree's polynomials divided by A_d, on the low and last components d:
    ([C, n, d_low, S O], [C, n, M - d_low, S O])."""
    C, n = q.shape[:2]
    n_low, d_low = layer._coupling_shapes["U_top_low"][:2]
    SO = layer.num_species * layer.num_components_out
    low = torch.bmm(q[:, :, :n_low], layer._fold("U_top_low", layer.correlation))  # [C, n, d_low S O]
    last = torch.bmm(q, layer._fold("U_top_last", layer.correlation))              # [C, n, d_last S O]
    return low.view(C, n, d_low, SO), last.view(C, n, -1, SO)


def _every_species(layer: nn.Module, x: Tensor) -> Tensor:
    """B of every species for one chunk, x [C, n, M] -> [C, n, S O] (module docstring)."""
    q = _prefix(layer, x)[0]                                                        # [C, n, T]
    low, last = _polynomials(layer, q)
    d_low = low.shape[2]
    out = (low * x[:, :, :d_low, None]).sum(2) + (last * x[:, :, d_low:, None]).sum(2)  # [C, n, S O]
    if layer.correlation >= 2:
        out.baddbmm_(x, layer._fold("U1", 1))
    if layer.correlation == 3:
        out.baddbmm_(q, layer._fold("U2", 2))                                       # q: the degree-2 monomials
    return out


class FrozenProductBasis(torch.autograd.Function):
    """``ProductBasis.forward`` with frozen weights on many atoms, chunk by chunk (module docstring).

    Shapes:
        A [N, C, M], species [N], layer  ->  [N, irreps_out.dim]
    """

    @staticmethod
    def forward(ctx: Any, A: Tensor, species: Tensor, layer: nn.Module) -> Tensor:
        N, chunk = A.shape[0], atoms_per_chunk(layer)
        out = A.new_empty(N, layer.irreps_B.dim * layer.num_channels)               # [N, irreps_out.dim]
        for start in range(0, N, chunk):
            stop = min(start + chunk, N)
            x = A[start:stop].transpose(0, 1).contiguous()                          # [C, n, M]
            out[start:stop] = layer._select(_every_species(layer, x), species[start:stop])
        ctx.layer = layer
        ctx.save_for_backward(A, species)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        A, species = ctx.saved_tensors
        layer = ctx.layer
        if torch.is_grad_enabled():
            return _plain_gradients(layer, A, species, grad)
        (N, C), chunk = A.shape[:2], atoms_per_chunk(layer)
        grad_A = torch.empty_like(A)                                                # [N, C, M]
        for start in range(0, N, chunk):
            stop = min(start + chunk, N)
            n = stop - start
            x = A[start:stop].transpose(0, 1).contiguous()                          # [C, n, M]
            q, x_a, x_b = _prefix(layer, x)
            low, last = _polynomials(layer, q)
            d_low = low.shape[2]
            g = _unselect(layer, grad[start:stop], species[start:stop])             # [C, n, S O]
            g_rows = g.unsqueeze(2)                                                 # [C, n, 1, S O]
            grad_x = torch.cat([(low * g_rows).sum(3), (last * g_rows).sum(3)], 2)  # [C, n, M]
            grad_q = torch.bmm((x[:, :, d_low:, None] * g_rows).view(C, n, -1),
                               layer._fold("U_top_last", layer.correlation).transpose(1, 2))  # [C, n, T]
            n_low = layer._coupling_shapes["U_top_low"][0]
            grad_q[:, :, :n_low] += torch.bmm((x[:, :, :d_low, None] * g_rows).view(C, n, -1),
                                              layer._fold("U_top_low", layer.correlation).transpose(1, 2))
            if layer.correlation >= 2:
                grad_x.baddbmm_(g, layer._fold("U1", 1).transpose(1, 2))
            if layer.correlation == 2:
                grad_x += grad_q
            elif layer.correlation == 3:
                grad_q.baddbmm_(g, layer._fold("U2", 2).transpose(1, 2))
                grad_x += (grad_q * x_b) @ layer.prefix2.T + (grad_q * x_a) @ layer.last2.T
            grad_A[start:stop] = grad_x.transpose(0, 1)
        return grad_A, None, None


def _plain_gradients(layer: nn.Module, A: Tensor, species: Tensor, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
    """A product basis kernel's backward when a graph of it is wanted (double backward): through
    the plain operations."""
    return reference_gradients(lambda a: layer._plain_forward(a, species), [A], [True], grad, num_args=3)


def _unselect(layer: nn.Module, grad: Tensor, species: Tensor) -> Tensor:
    """The adjoint of ``ProductBasis._select``: [n, irreps_out.dim] -> [C, n, S O], each atom's
    gradient at its own species, zero at the others."""
    n, C, S, O = grad.shape[0], layer.num_channels, layer.num_species, layer.num_components_out
    blocks, offset = [], 0
    for start, stop in layer.out_slices:  # e3nn layout: channel-major within each irrep
        blocks.append(grad[:, offset:offset + C * (stop - start)].view(n, C, stop - start))
        offset += C * (stop - start)
    g = torch.cat(blocks, 2).transpose(0, 1)                                        # [C, n, O]
    index = species.reshape(1, n, 1, 1).expand(C, n, 1, O)
    return grad.new_zeros(C, n, S, O).scatter_(2, index, g.unsqueeze(2)).view(C, n, S * O)


# ---------------------------------------------------------------------------------------------
# The product basis of a frozen layer by the compiled kernel (``molnets._native``), any size.
#
# The folded weights of the Horner scheme above are ~93% structural zeros (the couplings'
# selection rules), and it computes every species for every atom. The compiled kernel instead
# walks a list of terms: each a distinct monomial of degree ν <= ν_max and an output component
# o whose coupling is nonzero, with per species and channel its coefficient
# F[s, t, c] = Σ_k W^(ν)[s, k, c] U_t[k] (U_t the monomial's symmetric coupling, from
# ``_ace_coupling.symmetric_coupling``), so that for atom n of species s
#
#     B[n, c, o] = Σ_(t: o_t = o) F[s, t, c] Π_f A[n, c, a_tf],
#
# each atom's own species only, its monomials formed once per term (``_native.c``).


class NativeTerms(NamedTuple):
    """The product basis as terms (weights apart), built once per layer from its irreps."""

    factors: Tensor                 # [T, ν_max] long: the monomial's components, padded with M (the number 1)
    component: Tensor               # [T] long: o_t
    offset: Tensor                  # [O] long: where component o of channel 0 lands in an atom's row
    stride: Tensor                  # [O] long: and the step from one channel to the next
    couplings: Tuple[Tensor, ...]   # per ν: U_t [T_ν, K_ν] float64 of its terms (consecutive, in ν order)


def native_terms(layer: nn.Module) -> NativeTerms:
    """The layer's terms (kept on it: they depend on its irreps and ν_max only)."""
    terms = layer.__dict__.get("_native_terms")
    if terms is None:
        terms = layer.__dict__["_native_terms"] = _build_terms(layer)
    return terms


def _build_terms(layer: nn.Module) -> NativeTerms:
    M, top, C = layer.irreps_A.dim, layer.correlation, layer.num_channels
    factors: List[List[int]] = []
    component: List[int] = []
    couplings = []
    for nu, K in zip(range(1, top + 1), layer.num_couplings):
        rows, k0 = [], 0
        for start, stop, ir in irreps_slices(layer.irreps_B):
            try:
                monomials, coeffs = symmetric_coupling(layer.irreps_A, nu, ir)     # [T, ν], [T, O_L, K_L]
            except ValueError:
                continue  # no coupling of degree ν to this irrep (as ``contraction_plan``)
            for t, o in torch.nonzero(coeffs.abs().amax(2) > 0).tolist():
                row = torch.zeros(K, dtype=torch.float64)
                row[k0:k0 + coeffs.shape[2]] = coeffs[t, o]
                rows.append((monomials[t].tolist() + [M] * (top - nu), start + o, row))
            k0 += coeffs.shape[2]
        rows.sort(key=lambda r: (r[0], r[1]))  # terms of one monomial together
        factors += [r[0] for r in rows]
        component += [r[1] for r in rows]
        couplings.append(torch.stack([r[2] for r in rows]) if rows else torch.zeros(0, K, dtype=torch.float64))
    offset, stride = [], []
    for start, stop in layer.out_slices:  # e3nn layout: channel-major within each irrep
        offset += [C * start + o for o in range(stop - start)]
        stride += [stop - start] * (stop - start)
    long = dict(dtype=torch.long)
    return NativeTerms(torch.tensor(factors, **long).view(-1, top), torch.tensor(component, **long),
                       torch.tensor(offset, **long), torch.tensor(stride, **long), tuple(couplings))


def native_coefficients(layer: nn.Module) -> Tensor:
    """F [S, T, C] of the terms (in the weights' dtype), kept while the weights are frozen."""
    def build() -> Tensor:
        U = native_terms(layer).couplings
        return torch.cat([torch.einsum("tk,skc->stc", u.to(W.dtype), W) for u, W in zip(U, layer.weights)], 1).contiguous()
    return frozen_cached(layer._frozen_folds, "native", list(layer.weights), build)


def native_product_applies(layer: nn.Module, A: Tensor) -> bool:
    """Whether ``NativeProductBasis`` runs: frozen weights, eager on the CPU, correlation 1 to 3,
    float32 or float64, and the compiled kernels built (``_native.applies``). Flags only."""
    return layer.correlation <= 3 and _native.applies(A) and frozen_on_cpu_eager(layer, A)


class NativeProductBasis(torch.autograd.Function):
    """``ProductBasis.forward`` with frozen weights by the compiled kernel, as terms (above).

    Shapes:
        A [N, C, M], species [N], layer  ->  [N, irreps_out.dim]
    """

    @staticmethod
    def forward(ctx: Any, A: Tensor, species: Tensor, layer: nn.Module) -> Tensor:
        out = A.new_empty(A.shape[0], A.shape[1] * layer.num_components_out)       # [N, irreps_out.dim]
        _native.call("product_basis_forward", A, out, *_kernel_arguments(layer, A, species))
        ctx.layer = layer
        ctx.save_for_backward(A, species)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        A, species = ctx.saved_tensors
        layer = ctx.layer
        if torch.is_grad_enabled():
            return _plain_gradients(layer, A, species, grad)
        grad_A = A.new_empty(A.shape)                                               # [N, C, M]
        _native.call("product_basis_backward", A, grad_A, grad.contiguous(), *_kernel_arguments(layer, A, species))
        return grad_A, None, None


def _kernel_arguments(layer: nn.Module, A: Tensor, species: Tensor) -> tuple:
    """What the compiled forward and backward read after their outputs and output gradient:
    A, species, the coefficients and the terms, and the sizes (``_native.c``)."""
    (N, C, M), terms, coefficients = A.shape, native_terms(layer), native_coefficients(layer)  # F [S, T, C]
    return (A.contiguous(), species.contiguous(), coefficients, terms.factors, terms.component, terms.offset,
            terms.stride, N, C, M, layer.num_components_out, coefficients.shape[0], *terms.factors.shape)
