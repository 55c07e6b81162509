"""Real spherical harmonics Y_l^m in e3nn's convention: by a recursion in l, or as exact polynomials.

Every Y_l is a homogeneous harmonic polynomial of degree l in (x, y, z), and the degree-l
part of the product Y_{l-1}(r) r is proportional to Y_l(r) (the l-component of the coupling
(l-1) x 1 -> l; Geiger & Smidt, "e3nn", arXiv:2207.09453, sec. on spherical harmonics):

    Y_l^i(r) = sum_{j, k} C_l[j, k, i] Y_{l-1}^j(r) r_k,                          (1)
    d Y_l^i / d r_k = l sum_j C_l[j, k, i] Y_{l-1}^j(r)        (Euler: r . grad Y_l = l Y_l)  (2)

C_l [(2l-1), 3, (2l+1)] is proportional to the Wigner-3j symbol (l-1, 1, l). molnets builds it
itself: Y_l is written as an exact polynomial (the associated-Legendre form of the real
harmonics, e.g. Limpanuparb & Milthorpe, arXiv:1410.1748, with e3nn's axis order y, z, x),
and C_l is the minimum-norm solution of (1) on the monomial coefficients, which is the
3j-proportional one (the other solutions differ by the (l-1)-component of Y_{l-1} x r, which
maps to zero).

Speed: the differentiable ops run the recursion component-major ([M, E]: every op is long
along the edge axis). The eager CPU kernels work in blocks of a few thousand edges whose
intermediates stay in cache and never run the autograd graph of the forward. For unit vectors
(normalize=True) and lmax <= 6 they evaluate the polynomials directly. On the sphere z^2 =
1 - x^2 - y^2, so every Y_l^m equals there a polynomial in the M = (lmax+1)^2 "sphere
monomials" x^a y^b z^c with c <= 1 and degree <= lmax (2d+1 of degree d: two products per
degree, component-major), and one matmul that also transposes to the [E, M] layout gives all
of them:

    Y(u) = P(u) A,     dL/du_k = sum_{a'} P_{a'}(u) (G (D_k A)^T)_{a'}                     (3)

with A [M, M] the exact coefficients of every Y_l^m on the sphere monomials and D_k the
derivative of the sphere monomials with respect to u_k (again sphere monomials, of degree <
lmax): the backward reads only the vectors and the output gradient. Off the sphere the
polynomial differs from Y, but only along u, which the normalization's Jacobian (I - u u^T)/|r|
removes; the rare vectors shorter than 1e-12 (u = r / 1e-12 is then not unit) get Eq. (1)-(2).
The backward uses Eq. (3) up to lmax 4 and Eq. (2) above, where D A (growing as (lmax+1)^4)
costs more than the recursion. Written in differentiable ops (used when create_graph=True,
under torch.compile and on GPUs), Eq. (1)-(2) give exact double backward.

Very long vectors: where |r|^2 would overflow (|r| above about 1.8e19 in float32, 1.3e154 in
float64) r is first divided by its largest component, so u = r / |r| stays a unit vector
(e3nn returns Y_{l>0} = 0 there).

The zero vector: with ``normalize=True`` it is normalized as ``torch.nn.functional.normalize``
and e3nn do, r / max(|r|, 1e-12), so Y_0 = 1 and Y_{l>0} = 0 there; first and second
derivatives are finite (no NaN; the first derivative of Y_1 at r = 0 is 1e12 times that of
r, as in e3nn, whose second derivative there is NaN). Vectors along the axes are ordinary
points of a polynomial: no NaN in any derivative.

The exact coefficients are built in ``_sh_coefficients``, the kernels are in ``_sh_kernels``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from e3nn import o3
from torch import Tensor, nn

from ._sh_coefficients import Normalization, _coefficient_tensors
from ._sh_kernels import _evaluate

__all__ = ["spherical_harmonics", "spherical_harmonics_l", "SphericalHarmonics"]


def spherical_harmonics(vectors: Tensor, lmax: int, *, normalize: bool = True,
                        normalization: Normalization = "component") -> Tensor:
    """Real spherical harmonics Y_l^m(r) for all l <= lmax, in e3nn's convention and order.

        Y_l^i(r) = sum_{j,k} C_l[j, k, i] Y_{l-1}^j(r) r_k,  Y_0 = 1           (module docstring, Eq. 1)

    Equal to ``e3nn.o3.spherical_harmonics(list(range(lmax + 1)), vectors, normalize,
    normalization)``. Components of each l are m = -l..l in e3nn's order (Y_1 ∝ (x, y, z)).

    Args:
        vectors: edge vectors r in Å (any length; only the direction matters if normalize).
        lmax: largest degree l.
        normalize: evaluate on r/|r| (zero vector -> Y_0 = 1, Y_{l>0} = 0, finite gradients).
            If False, Y_l is the homogeneous polynomial of degree l in r.
        normalization: "component" (|Y_l(r̂)|^2 = 2l+1), "norm" (|Y_l(r̂)| = 1) or "integral"
            (∫_{S^2} (Y_l^m)^2 dΩ = 1).

    Shapes:
        vectors [E, 3]  ->  [E, (lmax+1)^2]   (any leading dimensions: [..., 3] -> [..., M])

    Raises:
        ValueError: if lmax < 0.

    >>> spherical_harmonics(torch.tensor([[0.0, 0.0, 2.0]]), 1)
    tensor([[1.0000, 0.0000, 0.0000, 1.7321]])
    """
    if lmax < 0:  # a Python int: no check on tensor values
        raise ValueError(f"spherical_harmonics needs lmax >= 0, got lmax={lmax}")
    tensors = _coefficient_tensors(lmax, normalization, vectors.dtype, vectors.device)
    return _evaluate(vectors, lmax, normalize, tensors)


def spherical_harmonics_l(vectors: Tensor, ls: Sequence[int], *, normalize: bool = True,
                          normalization: Normalization = "component") -> Tensor:
    """The blocks Y_l of ``spherical_harmonics`` for the degrees in ``ls`` only, in that order.

    Equal to ``e3nn.o3.spherical_harmonics(ls, vectors, normalize, normalization)``.

    Args:
        vectors: edge vectors in Å.
        ls: degrees to keep, in any order, e.g. [0, 2, 4] or [2, 1] (repeats allowed).
        normalize, normalization: as in ``spherical_harmonics``.

    Shapes:
        vectors [E, 3]  ->  [E, sum_l (2l+1)]   (any leading dimensions: [..., 3] -> [..., sum_l (2l+1)])

    Raises:
        ValueError: if ``ls`` is empty or holds a negative degree.

    >>> spherical_harmonics_l(torch.zeros(4, 5, 3), [2, 0]).shape
    torch.Size([4, 5, 6])
    """
    ls = [int(l) for l in ls]
    if not ls or min(ls) < 0:
        raise ValueError(f"spherical_harmonics_l needs a non-empty ls of degrees >= 0, got ls={ls}")
    sh = spherical_harmonics(vectors, max(ls), normalize=normalize,
                             normalization=normalization)                       # [..., M]
    if ls == list(range(max(ls) + 1)):
        return sh
    return torch.cat([sh[..., l * l:(l + 1) ** 2] for l in ls], dim=-1)        # [..., sum 2l+1]


class SphericalHarmonics(nn.Module):
    """Module form of ``spherical_harmonics``: edge vectors -> Y_0..Y_lmax (e3nn convention).

    Args:
        lmax: largest degree.
        normalize: evaluate on unit vectors r/|r|.
        normalization: "component", "norm" or "integral" (see ``spherical_harmonics``).

    Attributes:
        irreps_out: ``o3.Irreps`` "1x0e + 1x1o + 1x2e + ..." (parity (-1)^l).

    Shapes:
        vectors [E, 3] (Å)  ->  [E, irreps_out.dim]
    """

    def __init__(self, lmax: int, *, normalize: bool = True,
                 normalization: Normalization = "component") -> None:
        super().__init__()
        if lmax < 0:
            raise ValueError(f"SphericalHarmonics needs lmax >= 0, got lmax={lmax}")
        self.lmax = int(lmax)
        self.normalize = bool(normalize)
        self.normalization: Normalization = normalization
        self.irreps_in = o3.Irreps("1x1o")
        self.irreps_out = o3.Irreps.spherical_harmonics(self.lmax)
        self._register_coefficients(torch.get_default_dtype(), torch.device("cpu"))

    def _register_coefficients(self, dtype: torch.dtype, device: torch.device) -> None:
        # Non-persistent buffers so that .to(device) moves them; always rebuilt from the float64
        # source (see _apply) so that .float().double() keeps float64 precision.
        for n, t in enumerate(_coefficient_tensors(self.lmax, self.normalization, dtype, device)):
            self.register_buffer(f"coefficients_{n}", t.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._register_coefficients(self.coefficients_0.dtype, self.coefficients_0.device)
        return self

    def forward(self, vectors: Tensor) -> Tensor:
        if vectors.dtype == self.coefficients_0.dtype:  # static under torch.compile
            tensors = [getattr(self, f"coefficients_{n}") for n in range(2 * self.lmax + 3)]
        else:
            tensors = _coefficient_tensors(self.lmax, self.normalization, vectors.dtype,
                                           vectors.device)
        return _evaluate(vectors, self.lmax, self.normalize, tensors)            # [E, M]

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, normalize={self.normalize}, normalization={self.normalization!r}"
