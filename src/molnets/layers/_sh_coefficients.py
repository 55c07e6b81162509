"""Exact coefficients of the real spherical harmonics (private): Y_l^m as exact polynomials
(Fractions), the recursion coefficients C_l of Eq. (1) and the sphere-monomial coefficients A
and D A of Eq. (3), with the output normalization folded in, built once and cached (numpy,
float64), and as tensors per dtype and device. The equations are those of the module docstring
of ``layers.spherical_harmonics``.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from fractions import Fraction
from typing import Dict, List, Literal, Tuple

import numpy as np
import torch
from torch import Tensor

Normalization = Literal["integral", "component", "norm"]
_Poly = Dict[Tuple[int, int, int], Fraction]


# ----------------------------------------------------------------------------------------
# exact polynomial form of Y_l^m and the recursion coefficients C_l (built once, cached)
# ----------------------------------------------------------------------------------------
def _poly_mul(a: _Poly, b: _Poly) -> _Poly:
    out: _Poly = defaultdict(Fraction)
    for ka, va in a.items():
        for kb, vb in b.items():
            out[(ka[0] + kb[0], ka[1] + kb[1], ka[2] + kb[2])] += va * vb
    return dict(out)


def _legendre_derivative(l: int, m: int) -> Dict[int, Fraction]:
    """d^m P_l / dz^m as {power of z: coefficient} (Rodrigues' formula expanded)."""
    out = {}
    for k in range(l // 2 + 1):
        p = l - 2 * k
        if p >= m:
            c = Fraction((-1) ** k * math.factorial(2 * l - 2 * k),
                         2**l * math.factorial(k) * math.factorial(l - k) * math.factorial(p))
            out[p - m] = c * Fraction(math.factorial(p), math.factorial(p - m))
    return out


def _standard_real_sh(l: int, m: int) -> Tuple[_Poly, Fraction]:
    """Real Y_l^m (no Condon-Shortley phase) as a homogeneous polynomial in (X, Y, Z) with the
    squared "component" normalization factor (2l+1) (l-|m|)!/(l+|m|)! (x2 if m != 0):

        Y_l^m = N_lm  d^|m| P_l/dz^|m| (Z, homogenized with r^2)  {Re, Im}(X + iY)^|m|
    """
    am = abs(m)
    r2: _Poly = {(2, 0, 0): Fraction(1), (0, 2, 0): Fraction(1), (0, 0, 2): Fraction(1)}
    legendre: _Poly = defaultdict(Fraction)
    for power, c in _legendre_derivative(l, am).items():
        term: _Poly = {(0, 0, power): c}
        for _ in range((l - am - power) // 2):
            term = _poly_mul(term, r2)
        for key, v in term.items():
            legendre[key] += v
    phase: _Poly = defaultdict(Fraction)  # Re (m > 0) or Im (m < 0) of (X + iY)^|m|
    for j in range(am + 1):
        real_part, sign = j % 2 == 0, (-1) ** (j // 2)
        if m == 0 or (m > 0) == real_part:
            phase[(am - j, j, 0)] += sign * math.comb(am, j)
    norm2 = Fraction((2 * l + 1) * math.factorial(l - am), math.factorial(l + am)) * (2 if m else 1)
    return _poly_mul(dict(legendre), dict(phase)), norm2


def _monomials(l: int) -> List[Tuple[int, int, int]]:
    return [(a, b, l - a - b) for a in range(l, -1, -1) for b in range(l - a, -1, -1)]


@functools.lru_cache(maxsize=None)
def _sh_polynomial_matrix(l: int) -> np.ndarray:
    """[2l+1, (l+1)(l+2)/2]: coefficients of e3nn's component-normalized Y_l on monomials
    x^a y^b z^c. e3nn's Y(x, y, z) is the standard table evaluated at (X, Y, Z) = (z, x, y)."""
    index = {mono: n for n, mono in enumerate(_monomials(l))}
    out = np.zeros((2 * l + 1, len(index)))
    for i, m in enumerate(range(-l, l + 1)):
        poly, norm2 = _standard_real_sh(l, m)
        for (a, b, c), v in poly.items():  # X^a Y^b Z^c = z^a x^b y^c
            out[i, index[(b, c, a)]] += float(v) * math.sqrt(norm2)
    return out


@functools.lru_cache(maxsize=None)
def _recursion_coefficients(l: int) -> np.ndarray:
    """C_l [2l-1, 3, 2l+1] of Eq. (1), component normalization, float64."""
    index = {mono: n for n, mono in enumerate(_monomials(l))}
    prev = _sh_polynomial_matrix(l - 1)
    products = np.zeros((2 * l - 1, 3, len(index)))  # Y_{l-1}^j r_k on degree-l monomials
    for n, mono in enumerate(_monomials(l - 1)):
        for k in range(3):
            shifted = tuple(p + (k == axis) for axis, p in enumerate(mono))
            products[:, k, index[shifted]] += prev[:, n]
    solution = np.linalg.lstsq(products.reshape(-1, len(index)).T,
                               _sh_polynomial_matrix(l).T, rcond=None)[0]
    solution[np.abs(solution) < 1e-13] = 0.0  # exact zeros of the 3j symbol
    return solution.reshape(2 * l - 1, 3, 2 * l + 1)


def _sphere_monomials(lmax: int) -> List[Tuple[int, int, int]]:
    """Exponents (a, b, c) of the monomials x^a y^b z^c with c <= 1, degree 0..lmax,
    degree-major: the degree-d block has 2d+1 of them and starts at row d^2. In the order
    ``_fill_sphere_monomials`` writes them: x times every monomial of degree d-1, then y times
    its last two (y^(d-1), y^(d-2) z), which puts y^d, y^(d-1) z last again."""
    out, block = [(0, 0, 0)], [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    for _ in range(lmax):
        out += block
        block = ([(a + 1, b, c) for a, b, c in block]
                 + [(a, b + 1, c) for a, b, c in block[-2:]])
    return out


def _reduce_on_sphere(poly: _Poly) -> _Poly:
    """The polynomial equal to ``poly`` on the unit sphere with no z^2: z^c -> z^(c-2) (1 - x^2
    - y^2) until every z exponent is 0 or 1 (exact)."""
    out: _Poly = defaultdict(Fraction)
    pending = list(poly.items())
    while pending:
        (a, b, c), v = pending.pop()
        if c < 2:
            out[(a, b, c)] += v
        else:
            pending += [((a, b, c - 2), v), ((a + 2, b, c - 2), -v), ((a, b + 2, c - 2), -v)]
    return {k: v for k, v in out.items() if v}


@functools.lru_cache(maxsize=None)
def _polynomial_coefficients(lmax: int) -> Tuple[np.ndarray, np.ndarray]:
    """A [M, M] and D A [3 M', M] of Eq. (3), component normalization, float64 (M = (lmax+1)^2,
    M' = lmax^2).

    A[a, (l, m)] is the coefficient of sphere monomial a (``_sphere_monomials``) in Y_l^m on the
    unit sphere; row (k, a') of the second holds the coefficients of d/du_k of every Y_l^m so
    written, on the sphere monomials a' of degree < lmax.
    """
    monomials = _sphere_monomials(lmax)
    index = {mono: n for n, mono in enumerate(monomials)}
    values = np.zeros((len(monomials), (lmax + 1) ** 2))
    for l in range(lmax + 1):
        for i, m in enumerate(range(-l, l + 1)):
            poly, norm2 = _standard_real_sh(l, m)
            e3nn_order = {(b, c, a): v for (a, b, c), v in poly.items()}  # X^a Y^b Z^c = z^a x^b y^c
            for mono, v in _reduce_on_sphere(e3nn_order).items():
                values[index[mono], l * l + i] += float(v) * math.sqrt(norm2)
    lower = {mono: n for n, mono in enumerate(monomials[:lmax * lmax])}
    gradients = np.zeros((3, len(lower), (lmax + 1) ** 2))
    for mono, row in index.items():
        for k in range(3):
            if mono[k]:  # d/du_k u^mono = mono[k] u^(mono - e_k), again a sphere monomial
                gradients[k, lower[tuple(p - (axis == k) for axis, p in enumerate(mono))]] += mono[k] * values[row]
    return values, gradients.reshape(3 * len(lower), (lmax + 1) ** 2)


def _scales(lmax: int, normalization: Normalization) -> List[float]:
    """Factor s_l turning component normalization into the requested one."""
    if normalization == "component":
        return [1.0] * (lmax + 1)
    if normalization == "integral":
        return [1.0 / math.sqrt(4 * math.pi)] * (lmax + 1)
    if normalization == "norm":
        return [1.0 / math.sqrt(2 * l + 1) for l in range(lmax + 1)]
    raise ValueError(f"unknown normalization {normalization!r}")


@functools.lru_cache(maxsize=None)
def _coefficients(lmax: int, normalization: Normalization) -> List[np.ndarray]:
    """[y0, A_1..A_lmax, B_1..B_lmax, A, DA], float64, with the output scale s_l folded in:
    A_l [2l+1, 3(2l-1)] = (C_l s_l/s_{l-1})^T for Eq. (1), B_l [3(2l-1), 2l+1] = l C_l s_l/s_{l-1}
    for Eq. (2) (rows/columns (j, k) ordered j-major); A [M, M] and DA [3M', M] for Eq. (3)."""
    s = _scales(lmax, normalization)
    scaled = [(_recursion_coefficients(l) * (s[l] / s[l - 1])).reshape(-1, 2 * l + 1)
              for l in range(1, lmax + 1)]
    column_scale = np.repeat(s, [2 * l + 1 for l in range(lmax + 1)])               # [M]
    values, gradients = _polynomial_coefficients(lmax)
    return ([np.array(s[0])] + [np.ascontiguousarray(c.T) for c in scaled]
            + [l * c for l, c in enumerate(scaled, start=1)]
            + [values * column_scale, gradients * column_scale])


_TENSORS: Dict[tuple, List[Tensor]] = {}


@torch.compiler.assume_constant_result  # built eagerly, once; a constant to torch.compile
def _coefficient_tensors(lmax: int, normalization: Normalization, dtype: torch.dtype,
                         device: torch.device) -> List[Tensor]:
    """``_coefficients`` as tensors, cached per dtype and device."""
    key = (lmax, normalization, dtype, device)
    if key not in _TENSORS:
        _TENSORS[key] = [torch.as_tensor(m, dtype=dtype, device=device)
                         for m in _coefficients(lmax, normalization)]
    return _TENSORS[key]
