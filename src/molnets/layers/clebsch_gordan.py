"""Real Clebsch-Gordan (Wigner-3j) coupling coefficients, computed exactly by molnets.

The complex Clebsch-Gordan coefficients come from Racah's closed formula in exact rational
arithmetic (Racah 1942, Phys. Rev. 62, 438, Eq. 16'; Varshalovich et al. 1988, Sec. 8.2.1):

    <l1 m1 l2 m2 | l3 m3> = delta(m1 + m2, m3) sqrt(A) sum_k (-1)^k / D_k

    A   = (2 l3 + 1) (l3+l1-l2)! (l3-l1+l2)! (l1+l2-l3)! / (l1+l2+l3+1)!
          * (l3+m3)! (l3-m3)! (l1-m1)! (l1+m1)! (l2-m2)! (l2+m2)!
    D_k = k! (l1+l2-l3-k)! (l1-m1-k)! (l2+m2-k)! (l3-l2+m1+k)! (l3-l1-m2+k)!

and are rotated to the real basis of the real spherical harmonics with e3nn's change of basis
(the complex -> real matrix of the "Real form" of spherical harmonics, times (-i)^l so that
the real coefficients are real), then normalised to unit Frobenius norm. This is exactly
e3nn's convention (``e3nn.o3.wigner_3j``), which molnets adopts; the tests pin it.

Every real coefficient is ``± sqrt(q)`` with ``q`` rational: for fixed real indices
(m1, m2, m3) only the complex pairs (m1, m2, m3) and (-m1, -m2, -m3) contribute, and they share
the factor A. So the whole tensor, its norm included, is computed in rationals and a single
square root is rounded at the end.
"""

from __future__ import annotations

import functools
from decimal import Context, Decimal
from fractions import Fraction
from math import factorial
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["wigner_3j"]

# A Gaussian rational a + i b, as a pair of Fractions.
_Gauss = Tuple[Fraction, Fraction]


def _triangle(l1: int, l2: int, l3: int) -> bool:
    return abs(l1 - l2) <= l3 <= l1 + l2


def _complex_cg(l1: int, m1: int, l2: int, m2: int, l3: int, m3: int) -> Tuple[Fraction, Fraction]:
    """Complex CG coefficient <l1 m1 l2 m2 | l3 m3> = s * sqrt(A), returned as (s, A), exact."""
    f = factorial
    a = Fraction(
        (2 * l3 + 1) * f(l3 + l1 - l2) * f(l3 - l1 + l2) * f(l1 + l2 - l3)
        * f(l3 + m3) * f(l3 - m3) * f(l1 - m1) * f(l1 + m1) * f(l2 - m2) * f(l2 + m2),
        f(l1 + l2 + l3 + 1),
    )
    kmin = max(0, l2 - l3 - m1, l1 - l3 + m2)
    kmax = min(l1 + l2 - l3, l1 - m1, l2 + m2)
    s = Fraction(0)
    for k in range(kmin, kmax + 1):
        denominator = (
            f(k) * f(l1 + l2 - l3 - k) * f(l1 - m1 - k) * f(l2 + m2 - k)
            * f(l3 - l2 + m1 + k) * f(l3 - l1 - m2 + k)
        )
        s += Fraction((-1) ** k, denominator)
    return s, a


def _real_to_complex(l: int) -> Dict[Tuple[int, int], Tuple[int, int]]:
    """e3nn's complex <- real change of basis for degree l, without its 1/sqrt(2) factors.

    Returns {(m_complex, m_real): (re, im)}, a Gaussian integer; the entry's true value is that
    number times (-i)^l, divided by sqrt(2) when m != 0.
    """
    phase_l = [(1, 0), (0, -1), (-1, 0), (0, 1)][l % 4]  # (-i)^l
    entries: Dict[Tuple[int, int], Tuple[int, int]] = {(0, 0): (1, 0)}
    for m in range(1, l + 1):
        sign = (-1) ** m
        entries[(-m, m)] = (1, 0)
        entries[(-m, -m)] = (0, -1)
        entries[(m, m)] = (sign, 0)
        entries[(m, -m)] = (0, sign)
    return {key: _gauss_mul(value, phase_l) for key, value in entries.items()}


def _gauss_mul(x: Tuple[int, int], y: Tuple[int, int]) -> Tuple[int, int]:
    return (x[0] * y[0] - x[1] * y[1], x[0] * y[1] + x[1] * y[0])


def _sqrt(x: Fraction) -> float:
    """Correctly rounded sqrt of a non-negative rational (40 significant digits, then float)."""
    ctx = Context(prec=40)
    return float(ctx.divide(ctx.sqrt(Decimal(x.numerator)), ctx.sqrt(Decimal(x.denominator))))


@functools.lru_cache(maxsize=None)
def _wigner_3j_float64(l1: int, l2: int, l3: int) -> Tensor:
    out = torch.zeros(2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1, dtype=torch.float64)
    if not _triangle(l1, l2, l3):
        return out
    q1, q2, q3 = _real_to_complex(l1), _real_to_complex(l2), _real_to_complex(l3)
    squares: Dict[Tuple[int, int, int], Fraction] = {}  # signed square of every nonzero entry
    for r1 in range(-l1, l1 + 1):
        for r2 in range(-l2, l2 + 1):
            for r3 in range(-l3, l3 + 1):
                total: _Gauss = (Fraction(0), Fraction(0))
                shared_a: Optional[Fraction] = None
                for c1 in {abs(r1), -abs(r1)}:
                    for c2 in {abs(r2), -abs(r2)}:
                        c3 = c1 + c2
                        if abs(c3) != abs(r3) or abs(c3) > l3:
                            continue
                        s, a = _complex_cg(l1, c1, l2, c2, l3, c3)
                        if s == 0:
                            continue
                        assert shared_a is None or shared_a == a  # see the module docstring
                        shared_a = a
                        # C_real[r1, r2, r3] = sum Q1[c1, r1] Q2[c2, r2] conj(Q3[c3, r3]) C[c1, c2, c3]
                        q3c = q3[(c3, r3)]
                        phase = _gauss_mul(_gauss_mul(q1[(c1, r1)], q2[(c2, r2)]), (q3c[0], -q3c[1]))
                        total = (total[0] + phase[0] * s, total[1] + phase[1] * s)
                if shared_a is None or total[0] == 0:
                    continue
                assert total[1] == 0, "the real basis must give real coefficients"
                num_sqrt2 = (r1 != 0) + (r2 != 0) + (r3 != 0)
                square = shared_a * total[0] ** 2 / 2**num_sqrt2
                squares[(r1, r2, r3)] = square if total[0] > 0 else -square
    norm2 = sum(abs(v) for v in squares.values())
    for (r1, r2, r3), square in squares.items():
        value = _sqrt(abs(square) / norm2)
        out[l1 + r1, l2 + r2, l3 + r3] = value if square > 0 else -value
    return out


def wigner_3j(
    l1: int, l2: int, l3: int, *, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None
) -> Tensor:
    """Real Wigner-3j (Clebsch-Gordan) coupling tensor C^{l3 m3}_{l1 m1, l2 m2}, e3nn convention.

    The real coefficients are the complex Clebsch-Gordan coefficients (Racah's formula,
    Racah 1942, Eq. 16') in the real spherical-harmonics basis of e3nn, normalised so that
    sum_{m1 m2 m3} C^2 = 1. They are invariant under rotations:

        C[a, b, c] = sum_{a' b' c'} C[a', b', c'] D^{l1}_{a' a}(R) D^{l2}_{b' b}(R) D^{l3}_{c' c}(R)

    Computed exactly in rational arithmetic and cached; identical to ``e3nn.o3.wigner_3j``
    (sign and normalisation included) to float64 rounding. Zero when (l1, l2, l3) violate the
    triangle rule |l1 - l2| <= l3 <= l1 + l2.

    Args:
        l1, l2, l3: degrees of the three irreps (any non-negative integers).
        dtype: output dtype (default: torch's default dtype).
        device: output device.

    Shapes:
        -> [2 l1 + 1, 2 l2 + 1, 2 l3 + 1], components in e3nn's order m = -l..l.

    >>> C = wigner_3j(1, 1, 0, dtype=torch.float64)
    >>> torch.allclose(C[:, :, 0], torch.eye(3, dtype=torch.float64) / 3**0.5)
    True
    """
    if min(l1, l2, l3) < 0:
        raise ValueError(f"degrees must be non-negative, got {(l1, l2, l3)}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    return _wigner_3j_float64(int(l1), int(l2), int(l3)).to(dtype=dtype, device=device, copy=True)
