"""Radial bases e_k(r) and smooth cutoff envelopes u(r) for edge lengths r in Å.

A basis maps lengths to K features, an envelope to one factor that switches the edge off
at the cutoff r_c; ``RadialEmbedding(basis, envelope)`` is their product, the one way they
are composed:

    R_k(r) = e_k(r) u(r),   r < r_c;     R_k(r) = 0,   r >= r_c.

Smoothness at r_c. By the product rule, R, R' and R'' vanish at r_c whenever u, u', u'' do,
for any smooth basis. ``PolynomialEnvelope`` (any p >= 1) and ``CosineEnvelope(power >= 2)``
guarantee this (C^2 energies: forces and their derivatives continuous as an atom crosses the
cutoff). The classic cosine cutoff ``CosineEnvelope(power=1)`` (Behler 2011; SchNet,
torchmd-net) is the default of ``CosineEnvelope`` because peer models use it: it gives
R = R' = 0 at r_c but u''(r_c) = pi^2 / (2 r_c^2) != 0 (continuous forces, discontinuous
force derivatives). Every envelope is exactly 0 beyond r_c, with zero gradients there.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn

from molnets._constants import register_constant, restore_constants

__all__ = [
    "BesselBasis",
    "GaussianBasis",
    "ExpNormalBasis",
    "PolynomialEnvelope",
    "CosineEnvelope",
    "RadialEmbedding",
]


def _check_cutoff(owner: str, cutoff: float) -> None:
    if not cutoff > 0:  # also rejects NaN
        raise ValueError(f"{owner} needs cutoff > 0 (Å), got cutoff={cutoff}")


def _check_num_basis(owner: str, num_basis: int, least: int = 1) -> None:
    if num_basis < least:
        raise ValueError(f"{owner} needs num_basis >= {least}, got num_basis={num_basis}")


def _parameter_or_buffer(module: nn.Module, name: str, value: Tensor, trainable: bool) -> None:
    if trainable:
        module.register_parameter(name, nn.Parameter(value.to(torch.get_default_dtype())))
    else:
        register_constant(module, name, value)  # float64 master: exact after .double()


# sin(t)/t = 1 - t^2/(2*3) (1 - t^2/(4*5) (1 - t^2/(6*7) (1 - t^2/(8*9) (1 - t^2/(10*11))))) + O(t^12)
_SINC_SERIES_DIVISORS = (6.0, 20.0, 42.0, 72.0, 110.0)


def _sinc_series_limit(dtype: torch.dtype) -> float:
    """Below this t, BesselBasis takes sin(t)/t from its Taylor series. The first omitted term,
    -t^12 / 13!, makes the second derivative wrong by 12 * 11 t^10 / 13!, i.e. 396 t^10 / 13!
    relative to its limit -1/3; autograd through sin(t)/t loses about 4 eps / t^2 relative to
    cancellation. The two are equal at t^12 = 4 eps 13! / 396 (float32: 1.18, float64: 0.22).
    A Python float from the dtype alone: a constant under torch.compile."""
    return (4.0 * torch.finfo(dtype).eps * math.factorial(13) / 396.0) ** (1.0 / 12.0)


class BesselBasis(nn.Module):
    """Spherical Bessel (j_0) radial basis (Gasteiger, Groß, Günnemann, DimeNet, ICLR 2020, Eq. 7):

        e_k(r) = sqrt(2 / r_c) sin(w_k r) / r,   w_k = k pi / r_c,   k = 1..K

    finite at r -> 0 (limit sqrt(2 / r_c) w_k). sin(t)/t is evaluated by its 6-term Taylor
    series for t below a per-dtype threshold (about 1.2 in float32, 0.22 in float64) and
    directly above it: the series' truncation error in the second derivative grows as t^10 and
    the cancellation error of the direct formula's derivatives as eps / t^2, and both are
    near rounding level at the threshold. Values and autograd first and second derivatives
    are accurate to a few eps / t_threshold^2 relative (about 1e-6 in float32, 2e-14 in
    float64) for every r >= 0. The switch is a ``torch.where`` on a threshold fixed by the
    dtype: no value-dependent Python branch.

    Args:
        cutoff: r_c in Å (> 0).
        num_basis: K (>= 1).
        trainable: learn the frequencies w_k (initialized at k pi / r_c, in 1/Å), as in
            NequIP/MACE.

    Shapes:
        lengths [E] (Å, >= 0)  ->  [E, K] (1/Å^{3/2})

    >>> BesselBasis(5.0, 3)(torch.tensor([1.0])).shape
    torch.Size([1, 3])
    """

    def __init__(self, cutoff: float, num_basis: int = 8, *, trainable: bool = False) -> None:
        super().__init__()
        _check_cutoff("BesselBasis", cutoff)
        _check_num_basis("BesselBasis", num_basis)
        self.cutoff = float(cutoff)
        self.num_basis = self.out_dim = int(num_basis)
        self.prefactor = math.sqrt(2.0 / self.cutoff)
        freqs = torch.arange(1, num_basis + 1, dtype=torch.float64) * math.pi / self.cutoff
        _parameter_or_buffer(self, "frequencies", freqs, trainable)  # [K]

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        return restore_constants(super()._apply(fn, recurse))

    def forward(self, lengths: Tensor) -> Tensor:
        freqs = self.frequencies.to(lengths.dtype)                             # [K]
        t = lengths[:, None] * freqs                                           # [E, K]
        small = t.abs() < _sinc_series_limit(t.dtype)
        t_safe = torch.where(small, torch.ones_like(t), t)  # no 0/0, even in the unused branch
        t2 = t * t                                                             # [E, K]
        series = torch.ones_like(t)                                            # [E, K]
        for d in _SINC_SERIES_DIVISORS[::-1]:  # Horner: 1 - t^2/6 (1 - t^2/20 (1 - ...))
            series = 1.0 - t2 / d * series
        sinc = torch.where(small, series, torch.sin(t_safe) / t_safe)          # [E, K]
        return self.prefactor * freqs * sinc                                   # [E, K]

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, num_basis={self.num_basis}"


class GaussianBasis(nn.Module):
    """Gaussians on a uniform grid (Schütt et al., SchNet, J. Chem. Phys. 148, 241722 (2018), Eq. 9):

        e_k(r) = exp(-(r - mu_k)^2 / (2 sigma^2)),   mu_k = start + (k - 1) sigma,   k = 1..K

    with sigma = (r_c - start) / (K - 1), the grid spacing (as in SchNetPack / PyG).

    Args:
        cutoff: r_c in Å, the last center (> start).
        num_basis: K (>= 2).
        start: first center in Å (< cutoff).
        trainable: learn the centers mu_k (Å).

    Shapes:
        lengths [E] (Å)  ->  [E, K] (dimensionless)

    >>> GaussianBasis(5.0, 6)(torch.tensor([0.0, 1.0]))[:, 1]
    tensor([0.6065, 1.0000])
    """

    def __init__(self, cutoff: float, num_basis: int = 50, *, start: float = 0.0,
                 trainable: bool = False) -> None:
        super().__init__()
        _check_num_basis("GaussianBasis", num_basis, least=2)
        if not start < cutoff:  # also rejects NaN
            raise ValueError(f"GaussianBasis needs start < cutoff, got start={start}, cutoff={cutoff}")
        self.cutoff = float(cutoff)
        self.num_basis = self.out_dim = int(num_basis)
        self.width = (self.cutoff - start) / (num_basis - 1)
        centers = torch.linspace(start, self.cutoff, num_basis, dtype=torch.float64)
        _parameter_or_buffer(self, "centers", centers, trainable)  # [K]

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        return restore_constants(super()._apply(fn, recurse))

    def forward(self, lengths: Tensor) -> Tensor:
        offsets = lengths[:, None] - self.centers.to(lengths.dtype)            # [E, K]
        return torch.exp(offsets.square() * (-0.5 / self.width**2))            # [E, K]

    def with_derivative(self, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """e_k(r) and de_k/dr = -(r - mu_k) e_k(r) / sigma^2 (in 1/Å), for kernels with a
        hand-written backward. [E, K] each"""
        offsets = lengths[:, None] - self.centers.to(lengths.dtype)            # [E, K]
        values = torch.exp(offsets.square() * (-0.5 / self.width**2))          # [E, K]
        return values, offsets.mul_(values).mul_(-1.0 / self.width**2)        # [E, K]

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, num_basis={self.num_basis}, width={self.width:.4g}"


class ExpNormalBasis(nn.Module):
    """Exp-normal radial functions (Unke & Meuwly, PhysNet, JCTC 15, 3678 (2019), Eq. 7),
    parametrized as in torchmd-net (TorchMD-NET / TensorNet, Simeon & De Fabritiis 2023):

        e_k(r) = exp(-beta_k (exp(-alpha r) - mu_k)^2),   alpha = 5 / r_c,
        mu_k = linspace(exp(-r_c), 1, K),   beta_k = (2 (1 - exp(-r_c)) / K)^{-2}

    (r_c in Å enters the start exp(-r_c) as a number, as in torchmd-net.) No cutoff inside:
    compose with an envelope.

    Args:
        cutoff: r_c in Å (> 0).
        num_basis: K (>= 1).
        trainable: learn mu_k and beta_k (torchmd-net's default is trainable).

    Shapes:
        lengths [E] (Å)  ->  [E, K] (dimensionless)

    >>> ExpNormalBasis(5.0, 4)(torch.tensor([0.0]))[0, -1]
    tensor(1.)
    """

    def __init__(self, cutoff: float, num_basis: int = 32, *, trainable: bool = False) -> None:
        super().__init__()
        _check_cutoff("ExpNormalBasis", cutoff)
        _check_num_basis("ExpNormalBasis", num_basis)
        self.cutoff = float(cutoff)
        self.num_basis = self.out_dim = int(num_basis)
        self.alpha = 5.0 / self.cutoff
        start = math.exp(-self.cutoff)
        means = torch.linspace(start, 1.0, num_basis, dtype=torch.float64)
        betas = torch.full((num_basis,), (2.0 / num_basis * (1.0 - start)) ** -2, dtype=torch.float64)
        _parameter_or_buffer(self, "means", means, trainable)  # [K]
        _parameter_or_buffer(self, "betas", betas, trainable)  # [K]

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        return restore_constants(super()._apply(fn, recurse))

    def forward(self, lengths: Tensor) -> Tensor:
        decay = torch.exp(-self.alpha * lengths)[:, None]                      # [E, 1]
        diff = decay - self.means.to(lengths.dtype)                            # [E, K]
        return torch.exp(-self.betas.to(lengths.dtype) * diff * diff)          # [E, K]

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, num_basis={self.num_basis}"


class PolynomialEnvelope(nn.Module):
    """Polynomial cutoff envelope (Gasteiger et al., DimeNet, ICLR 2020, Eq. 8), x = r / r_c:

        u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^{p+1} - p(p+1)/2 x^{p+2},   x < 1;   0, x >= 1

    u(1) = u'(1) = u''(1) = 0 for every p, and u = 1 + O(x^p) near 0.

    Args:
        cutoff: r_c in Å (> 0).
        p: exponent p >= 1 (DimeNet and MACE use 5-6).

    Shapes:
        lengths [E] (Å)  ->  [E] (dimensionless)

    >>> PolynomialEnvelope(4.0, p=6)(torch.tensor([0.0, 4.0, 5.0]))
    tensor([1., 0., 0.])
    """

    def __init__(self, cutoff: float, p: int = 6) -> None:
        super().__init__()
        _check_cutoff("PolynomialEnvelope", cutoff)
        if p < 1:
            raise ValueError(f"PolynomialEnvelope needs p >= 1, got p={p}")
        self.cutoff = float(cutoff)
        self.p = int(p)

    def forward(self, lengths: Tensor) -> Tensor:
        p = self.p
        inside = lengths < self.cutoff                                         # [E]
        x = torch.where(inside, lengths / self.cutoff, torch.zeros_like(lengths))  # [E]
        xp = x**p
        u = 1.0 - xp * ((p + 1) * (p + 2) / 2 - x * (p * (p + 2) - x * (p * (p + 1) / 2)))
        return torch.where(inside, u, torch.zeros_like(u))                     # [E]

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, p={self.p}"


class CosineEnvelope(nn.Module):
    """Cosine cutoff envelope (Behler, J. Chem. Phys. 134, 074106 (2011), Eq. 4), raised to
    an integer power n, x = r / r_c:

        u(x) = [(cos(pi x) + 1) / 2]^n,   x < 1;   0,   x >= 1

    n = 1 (default) is the classic cutoff of SchNet and torchmd-net: u(1) = u'(1) = 0 but
    u''(1) = pi^2 / (2 r_c^2) != 0. n >= 2 makes u, u', u'' (and for n = 2 also u''') vanish
    at r_c, the guarantee ``PolynomialEnvelope`` gives.

    Args:
        cutoff: r_c in Å (> 0).
        power: n >= 1.

    Shapes:
        lengths [E] (Å)  ->  [E] (dimensionless)

    >>> CosineEnvelope(2.0)(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    tensor([1.0000, 0.5000, 0.0000, 0.0000])
    """

    def __init__(self, cutoff: float, *, power: int = 1) -> None:
        super().__init__()
        _check_cutoff("CosineEnvelope", cutoff)
        if power < 1:
            raise ValueError(f"CosineEnvelope needs power >= 1, got power={power}")
        self.cutoff = float(cutoff)
        self.power = int(power)

    def forward(self, lengths: Tensor) -> Tensor:
        inside = lengths < self.cutoff                                         # [E]
        u = 0.5 * (torch.cos(lengths * (math.pi / self.cutoff)) + 1.0)        # [E]
        if self.power > 1:
            u = u**self.power
        return torch.where(inside, u, torch.zeros_like(u))                     # [E]

    def with_derivative(self, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """u(r) and du/dr = -n (pi / (2 r_c)) sin(pi x) c^(n-1) (c = (cos(pi x) + 1) / 2; in 1/Å; 0
        beyond r_c), for kernels with a hand-written backward. [E] each"""
        outside = lengths >= self.cutoff                                       # [E]
        angle = lengths * (math.pi / self.cutoff)                              # [E]
        c = torch.cos(angle).add_(1.0).mul_(0.5)                               # [E]
        slope = torch.sin(angle).mul_(-0.5 * math.pi / self.cutoff * self.power)  # [E]
        if self.power > 1:
            slope = slope * c ** (self.power - 1)
            c = c**self.power
        return c.masked_fill_(outside, 0.0), slope.masked_fill_(outside, 0.0)  # [E], [E]

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, power={self.power}"


class RadialEmbedding(nn.Module):
    """A radial basis times a cutoff envelope: R_k(r) = e_k(r) u(r) (module docstring).

    Args:
        basis: a basis module, [E] -> [E, K], with ``cutoff`` and ``num_basis``.
        envelope: an envelope module, [E] -> [E], with the same ``cutoff``.

    Shapes:
        lengths [E] (Å)  ->  [E, K]

    >>> emb = RadialEmbedding(BesselBasis(5.0, 8), PolynomialEnvelope(5.0, p=6))
    >>> emb(torch.tensor([1.0, 5.0, 6.0])).abs().sum(dim=1)[1:]
    tensor([0., 0.])
    """

    def __init__(self, basis: nn.Module, envelope: nn.Module) -> None:
        super().__init__()
        if not math.isclose(basis.cutoff, envelope.cutoff):
            raise ValueError(f"basis cutoff {basis.cutoff} != envelope cutoff {envelope.cutoff}")
        self.basis = basis
        self.envelope = envelope
        self.cutoff = float(envelope.cutoff)
        self.num_basis = self.out_dim = int(basis.num_basis)

    def forward(self, lengths: Tensor) -> Tensor:
        return self.basis(lengths) * self.envelope(lengths)[:, None]          # [E, K]
