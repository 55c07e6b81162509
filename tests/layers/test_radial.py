"""Radial bases and envelopes: formulas (numpy), smoothness at the cutoff, finiteness at r -> 0."""

import math

import numpy as np
import pytest
import torch

from molnets.layers.radial import (
    BesselBasis,
    CosineEnvelope,
    ExpNormalBasis,
    GaussianBasis,
    PolynomialEnvelope,
    RadialEmbedding,
)

CUTOFF = 4.5
BASES = {
    "bessel": lambda: BesselBasis(CUTOFF, 5),
    "bessel_trainable": lambda: BesselBasis(CUTOFF, 5, trainable=True),
    "gaussian": lambda: GaussianBasis(CUTOFF, 6),
    "expnormal": lambda: ExpNormalBasis(CUTOFF, 6),
}
SMOOTH_ENVELOPES = {  # u, u', u'' vanish at the cutoff
    "poly1": lambda: PolynomialEnvelope(CUTOFF, p=1),
    "poly6": lambda: PolynomialEnvelope(CUTOFF, p=6),
    "cosine2": lambda: CosineEnvelope(CUTOFF, power=2),
}


pytestmark = pytest.mark.usefixtures("float64_default")  # float64 reference values (tests/conftest.py)


def derivatives(module, r):
    """Value, first and second derivative of every output column w.r.t. r, by autograd."""
    r = r.clone().requires_grad_(True)
    y = module(r)
    y = y[:, None] if y.dim() == 1 else y                                       # [E, K]
    d1, d2 = [], []
    for k in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, k].sum(), r, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), r, retain_graph=True, allow_unused=True)
        d1.append(g.detach())
        d2.append(torch.zeros_like(r) if h is None else h)
    return y.detach(), torch.stack(d1, 1), torch.stack(d2, 1)


def test_bessel_matches_numpy_formula():
    r = np.linspace(1e-3, CUTOFF * 1.2, 37)
    k = np.arange(1, 8)
    expected = np.sqrt(2 / CUTOFF) * np.sin(k[None] * np.pi * r[:, None] / CUTOFF) / r[:, None]
    got = BesselBasis(CUTOFF, 7)(torch.tensor(r)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # r -> 0 limit sqrt(2/rc) k pi / rc, and the Taylor branch joins the exact one
    small = BesselBasis(CUTOFF, 7)(torch.tensor([0.0, 1e-9, 1e-5])).numpy()
    limit = np.sqrt(2 / CUTOFF) * k * np.pi / CUTOFF
    np.testing.assert_allclose(small[0], limit, rtol=1e-15)
    t = 1e-5 * k * np.pi / CUTOFF
    np.testing.assert_allclose(small[2], limit * np.sin(t) / t, rtol=1e-14)


def test_gaussian_and_expnormal_match_numpy_formulas():
    r = np.linspace(0.0, CUTOFF, 23)
    mu = np.linspace(0.0, CUTOFF, 6)
    sigma = CUTOFF / 5
    expected = np.exp(-((r[:, None] - mu[None]) ** 2) / (2 * sigma**2))
    np.testing.assert_allclose(GaussianBasis(CUTOFF, 6)(torch.tensor(r)).numpy(), expected, rtol=1e-13)
    # torchmd-net's ExpNormalSmearing (cutoff_lower = 0) written out
    start = np.exp(-CUTOFF)
    means = np.linspace(start, 1, 6)
    beta = (2 / 6 * (1 - start)) ** -2
    expected = np.exp(-beta * (np.exp(-5 / CUTOFF * r)[:, None] - means[None]) ** 2)
    np.testing.assert_allclose(ExpNormalBasis(CUTOFF, 6)(torch.tensor(r)).numpy(), expected, rtol=1e-13)


def test_envelopes_match_formulas():
    r = np.linspace(0.0, 1.5 * CUTOFF, 31)
    x = r / CUTOFF
    p = 5
    poly = 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
    np.testing.assert_allclose(PolynomialEnvelope(CUTOFF, p=p)(torch.tensor(r)).numpy(),
                               np.where(x < 1, poly, 0.0), atol=1e-14)
    cos = 0.5 * (np.cos(np.pi * x) + 1)
    for n in (1, 2, 3):
        np.testing.assert_allclose(CosineEnvelope(CUTOFF, power=n)(torch.tensor(r)).numpy(),
                                   np.where(x < 1, cos**n, 0.0), atol=1e-14)


@pytest.mark.parametrize("envelope", sorted(SMOOTH_ENVELOPES))
@pytest.mark.parametrize("basis", sorted(BASES))
def test_value_and_two_derivatives_vanish_at_cutoff(basis, envelope):
    emb = RadialEmbedding(BASES[basis](), SMOOTH_ENVELOPES[envelope]())
    # approaching r_c from inside: R = O(d^3), R' = O(d^2), R'' = O(d), d = r_c - r
    d = torch.tensor([1e-2, 1e-3, 1e-4])
    y, d1, d2 = derivatives(emb, CUTOFF - d)
    scale = derivatives(emb, torch.tensor([CUTOFF * 0.5]))[0].abs().max()
    assert (y.abs().max(1).values / scale < 1e3 * d**3).all(), y
    assert (d1.abs().max(1).values / scale < 1e3 * d**2).all(), d1
    assert (d2.abs().max(1).values / scale < 1e3 * d).all(), d2
    assert (d2[2].abs() <= 0.2 * d2[1].abs() + 1e-12).all()  # linear decay, not a constant
    # at and beyond r_c: exactly zero, with zero derivatives
    for t in derivatives(emb, torch.tensor([CUTOFF, CUTOFF + 1e-9, 1.3 * CUTOFF, 50.0])):
        assert (t == 0).all()


@pytest.mark.parametrize("basis", sorted(BASES))
def test_classic_cosine_is_c1_with_known_second_derivative(basis):
    b = BASES[basis]()
    emb = RadialEmbedding(b, CosineEnvelope(CUTOFF))
    d = torch.tensor([1e-4, 1e-5])
    y, d1, d2 = derivatives(emb, CUTOFF - d)
    # R = O(d^2), R' = O(d): a tenfold smaller d gives 100x and 10x smaller values
    assert (y[1].abs() <= 0.0101 * y[0].abs() + 1e-15).all()
    assert (d1[1].abs() <= 0.101 * d1[0].abs() + 1e-15).all()
    # R''(r_c) = e(r_c) u''(r_c) = e(r_c) pi^2 / (2 r_c^2): not zero (documented)
    expected = b(torch.tensor([CUTOFF]))[0] * math.pi**2 / (2 * CUTOFF**2)
    torch.testing.assert_close(d2[1], expected, rtol=1e-3, atol=1e-4)  # (Bessel: e(r_c) = 0)
    assert expected.abs().max() > 0.01 or basis.startswith("bessel")


@pytest.mark.parametrize("envelope", sorted(SMOOTH_ENVELOPES) + ["cosine1"])
@pytest.mark.parametrize("basis", sorted(BASES))
def test_finite_at_tiny_r(basis, envelope):
    env = CosineEnvelope(CUTOFF) if envelope == "cosine1" else SMOOTH_ENVELOPES[envelope]()
    emb = RadialEmbedding(BASES[basis](), env)
    for t in derivatives(emb, torch.tensor([1e-9, 1e-12, 0.0])):
        assert torch.isfinite(t).all()
    if basis.startswith("bessel"):  # second derivative of sin(wr)/r at 0 is -w^3/3 * sqrt(2/rc)
        w = emb.basis.frequencies.detach()
        d2 = derivatives(emb.basis, torch.tensor([1e-9]))[2][0]
        torch.testing.assert_close(d2, -math.sqrt(2 / CUTOFF) * w**3 / 3, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("basis", sorted(BASES))
def test_gradcheck(basis):
    emb = RadialEmbedding(BASES[basis](), PolynomialEnvelope(CUTOFF, p=5))
    r = torch.tensor([1e-6, 0.3, 1.7, 3.9, 4.4, 5.0], requires_grad=True)
    assert torch.autograd.gradcheck(emb, r)
    assert torch.autograd.gradgradcheck(emb, r)
    params = [p for p in emb.parameters()]
    if params:  # trainable frequencies: gradient w.r.t. them too
        assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(
            emb, {"basis.frequencies": w}, (r.detach(),)), params[0].detach().clone().requires_grad_())


def test_mismatched_cutoffs_rejected_and_shapes():
    with pytest.raises(ValueError):
        RadialEmbedding(BesselBasis(5.0, 4), PolynomialEnvelope(4.0))
    emb = RadialEmbedding(GaussianBasis(5.0, 7), CosineEnvelope(5.0, power=2))
    assert emb(torch.rand(11) * 6).shape == (11, 7) and emb.num_basis == 7 and emb.cutoff == 5.0
    assert PolynomialEnvelope(5.0)(torch.tensor([0.0]))[0] == 1.0


@pytest.mark.parametrize("module", [lambda: GaussianBasis(CUTOFF, 6), lambda: CosineEnvelope(CUTOFF),
                                    lambda: CosineEnvelope(CUTOFF, power=3)],
                         ids=["gaussian", "cosine1", "cosine3"])
def test_with_derivative_equals_the_forward_and_its_autograd_derivative(module):
    """``with_derivative`` (for kernels with a hand-written backward): the forward's values and
    their derivative by autograd, inside the cutoff, at it and beyond (zero there)."""
    module = module()
    r = torch.tensor(np.r_[np.linspace(0.0, CUTOFF * 1.3, 41), CUTOFF])
    values, slopes = module.with_derivative(r)
    expected, first, _ = derivatives(module, r)
    torch.testing.assert_close(values, module(r), atol=1e-15, rtol=1e-14)
    torch.testing.assert_close(slopes, first.reshape(slopes.shape), atol=1e-14, rtol=1e-13)
    assert slopes.abs().max() > 0.1


def _sinc_series_derivatives(t):
    """sin(t)/t and its first two derivatives by 25 terms of the Taylor series, in float64:
    exact to rounding for |t| <= 2, and free of the cancellation of the closed form."""
    s0, s1, s2 = torch.zeros_like(t), torch.zeros_like(t), torch.zeros_like(t)
    for n in range(25):
        c = (-1) ** n / math.factorial(2 * n + 1)
        s0 = s0 + c * t ** (2 * n)
        if n:
            s1 = s1 + c * 2 * n * t ** (2 * n - 1)
            s2 = s2 + c * 2 * n * (2 * n - 1) * t ** (2 * n - 2)
    return s0, s1, s2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bessel_value_and_two_derivatives_near_zero_match_a_float64_series(dtype):
    """R, dR/dr and d2R/dr2 by autograd (double backward) for r in [0, 0.1] Å against the
    float64 Taylor series, in float32 and float64: with cutoff 2 Å and K = 8, t = w_k r runs
    over [0, 1.26], across the old threshold t = 1e-3 (where float32 derivatives were off by
    14 %) and the per-dtype one (about 1.2 in float32, 0.22 in float64)."""
    basis = BesselBasis(2.0, 8).to(dtype)
    w = torch.arange(1, 9, dtype=torch.float64) * math.pi / 2.0                 # [K]
    near_old = (1e-3 / w[:, None] * torch.tensor([0.99, 1.01, 2.0], dtype=torch.float64)).flatten()
    r = torch.cat([torch.linspace(0.0, 0.1, 1001, dtype=torch.float64), near_old]).to(dtype)
    y, d1, d2 = derivatives(basis, r)
    # the reference at the same (rounded) r and w_k as the module's float32 inputs
    w_in = basis.frequencies.double()                                           # [K]
    s0, s1, s2 = _sinc_series_derivatives(r.double()[:, None] * w_in)           # [E, K]
    pref = math.sqrt(2.0 / 2.0)
    expected = [pref * w_in * s0, pref * w_in**2 * s1, pref * w_in**3 * s2]
    rtol = 2e-6 if dtype == torch.float32 else 1e-13
    for got, ref in zip((y, d1, d2), expected):
        err = (got.double() - ref).abs()
        assert (err <= rtol * ref.abs() + 1e-30).all(), (err / ref.abs()).nan_to_num().max()


def test_bessel_compiles_without_graph_breaks():
    """The Taylor threshold is fixed by the dtype: no value-dependent Python branch."""
    torch._dynamo.reset()
    try:
        for dtype in (torch.float32, torch.float64):
            basis = BesselBasis(2.0, 4).to(dtype)
            compiled = torch.compile(basis, fullgraph=True, backend="eager")
            r = torch.tensor([0.0, 1e-4, 0.05, 1.5], dtype=dtype)
            torch.testing.assert_close(compiled(r), basis(r), rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("build, argument", [
    (lambda: BesselBasis(0.0), "cutoff"),
    (lambda: BesselBasis(-1.0), "cutoff"),
    (lambda: BesselBasis(float("nan")), "cutoff"),
    (lambda: BesselBasis(5.0, 0), "num_basis"),
    (lambda: GaussianBasis(5.0, 10, start=5.0), "start"),
    (lambda: GaussianBasis(5.0, 10, start=6.0), "start"),
    (lambda: GaussianBasis(5.0, 1), "num_basis"),
    (lambda: ExpNormalBasis(0.0), "cutoff"),
    (lambda: ExpNormalBasis(5.0, 0), "num_basis"),
    (lambda: PolynomialEnvelope(-1.0), "cutoff"),
    (lambda: PolynomialEnvelope(5.0, p=0), "p"),
    (lambda: CosineEnvelope(0.0), "cutoff"),
    (lambda: CosineEnvelope(5.0, power=0), "power"),
])
def test_constructors_reject_invalid_arguments(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()
