"""Spherical harmonics: equal to e3nn, equivariant under O(3), normalized, twice differentiable."""

import math

import numpy as np
import pytest
import torch
from e3nn import o3

from molnets.layers import _sh_coefficients, _sh_kernels
from molnets.layers.spherical_harmonics import (
    SphericalHarmonics,
    spherical_harmonics,
    spherical_harmonics_l,
)
from molnets.testing import random_orthogonal

NORMALIZATIONS = ["integral", "component", "norm"]


pytestmark = pytest.mark.usefixtures("float64_default")  # e3nn constants in float64 (tests/conftest.py)


def make_vectors(num=40, seed=0):
    """Random vectors of various lengths, plus +-axes and axis-plane diagonals."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.rand(num, 1, generator=g, dtype=torch.float64).add(0.2) * 3
    random = torch.randn(num, 3, generator=g, dtype=torch.float64) * lengths
    eye = torch.eye(3, dtype=torch.float64)
    diag = torch.tensor([[1.0, 1.0, 0.0], [0.0, -1.0, 1.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    return torch.cat([random, eye, -eye, 2.5 * eye, diag])


def reference(vectors, lmax, normalize, normalization):
    return o3.spherical_harmonics(list(range(lmax + 1)), vectors, normalize, normalization)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("lmax", range(9))
def test_equals_e3nn(lmax, normalization):
    v = make_vectors()
    got = spherical_harmonics(v, lmax, normalization=normalization)
    assert got.shape == (v.shape[0], (lmax + 1) ** 2)
    torch.testing.assert_close(got, reference(v, lmax, True, normalization), rtol=0, atol=1e-12)
    # normalize=False: homogeneous polynomials of the raw vector (relative to their size)
    raw = spherical_harmonics(v, lmax, normalize=False, normalization=normalization)
    expected = reference(v, lmax, False, normalization)
    assert ((raw - expected).abs() <= 1e-12 * expected.abs().amax(1, keepdim=True).clamp(min=1)).all()


def test_module_selected_ls_and_dtype_round_trip():
    v = make_vectors()
    m = SphericalHarmonics(5, normalization="norm")
    assert m.irreps_out == o3.Irreps("0e + 1o + 2e + 3o + 4e + 5o")
    assert m.irreps_out.dim == 36
    m = m.float().double()  # coefficients are rebuilt in float64, not rounded through float32
    torch.testing.assert_close(m(v), reference(v, 5, True, "norm"), rtol=0, atol=1e-12)
    torch.testing.assert_close(m(v.float()), reference(v, 5, True, "norm").float())
    got = spherical_harmonics_l(v, [3, 0, 6, 3], normalization="integral")
    expected = o3.spherical_harmonics([3, 0, 6, 3], v, True, "integral")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_equivariance_with_e3nn_wigner_d(seed):
    lmax = 8
    R = random_orthogonal(seed, inversion=seed % 2 == 1, dtype=torch.float64)  # odd seeds: det -1
    v = make_vectors(seed=seed)
    D = o3.Irreps.spherical_harmonics(lmax).D_from_matrix(R)                    # [M, M]
    for normalize in (True, False):
        rotated = spherical_harmonics(v @ R.T, lmax, normalize=normalize)
        expected = spherical_harmonics(v, lmax, normalize=normalize) @ D.T
        scale = expected.abs().amax(1, keepdim=True).clamp(min=1)
        assert ((rotated - expected).abs() <= 1e-12 * scale).all(), (R, normalize)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_normalization_by_quadrature(normalization):
    """Gauss-Legendre in cos(theta) x uniform phi: exact for polynomials of degree < 40."""
    lmax = 8
    z, wz = np.polynomial.legendre.leggauss(20)
    phi = np.arange(40) * 2 * np.pi / 40
    zz, pp = np.meshgrid(z, phi, indexing="ij")
    s = np.sqrt(1 - zz**2)
    points = torch.tensor(np.stack([s * np.cos(pp), s * np.sin(pp), zz], -1).reshape(-1, 3))
    weights = torch.tensor((wz[:, None] * np.full(40, 2 * np.pi / 40)[None]).reshape(-1))
    Y = spherical_harmonics(points, lmax, normalization=normalization)          # [P, M]
    gram = Y.T @ (Y * weights[:, None])                                         # [M, M]
    ls = torch.tensor([l for l in range(lmax + 1) for _ in range(2 * l + 1)], dtype=torch.float64)
    expected = {"integral": torch.ones_like(ls), "component": 4 * math.pi * torch.ones_like(ls),
                "norm": 4 * math.pi / (2 * ls + 1)}[normalization]
    torch.testing.assert_close(gram, torch.diag(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_gradcheck_and_gradgradcheck(normalize, normalization):
    v = make_vectors(num=6)[[0, 1, 2, 6, 9, 12, 15]].clone().requires_grad_(True)
    f = lambda x: spherical_harmonics(x, 4, normalize=normalize, normalization=normalization)  # noqa: E731
    assert torch.autograd.gradcheck(f, v)
    assert torch.autograd.gradgradcheck(f, v)


@pytest.mark.parametrize("normalize", [True, False])
def test_blocked_kernels_equal_reference(monkeypatch, normalize):
    """The cache-blocked eager paths (several blocks, a ragged last one): the polynomial kernels
    (Eq. 3, normalize=True, lmax <= 6 forward, <= 4 backward) and the recursion kernels (the
    rest) against e3nn and the plain ops."""
    monkeypatch.setattr(_sh_kernels, "_chunk_size", lambda lmax: 4)
    v = make_vectors()
    short = torch.tensor([[3e-13, -5e-13, 8e-13], [0.0, 0.0, 0.0]], dtype=torch.float64)  # |r| < eps
    v = torch.cat([v[:9], short, v[9:]]).requires_grad_(True)  # u = r / eps is not on the sphere
    assert (_sh_kernels._POLYNOMIAL_BACKWARD_LMAX, _sh_kernels._POLYNOMIAL_LMAX) == (4, 6)  # covered below
    gen = torch.Generator().manual_seed(11)
    for lmax in (0, 1, 2, 3, 4, 5, 6, 7):
        y = spherical_harmonics(v, lmax, normalize=normalize, normalization="integral")
        e3nn_y = reference(v, lmax, normalize, "integral")
        torch.testing.assert_close(y, e3nn_y, rtol=1e-12, atol=1e-12)
        g = torch.randn(y.shape, dtype=y.dtype, generator=gen)
        (blocked,) = torch.autograd.grad(y, v, g)                                # first order: blocked
        (plain,) = torch.autograd.grad(spherical_harmonics(v, lmax, normalize=normalize,
                                                           normalization="integral"),
                                       v, g, create_graph=True)                  # differentiable path
        e3nn_grad = torch.autograd.grad(e3nn_y, v, g)[0] if lmax else torch.zeros_like(v)
        # gradients reach ~1e2 without normalization (degree-7 polynomials in r): a few tens of
        # float64 ulps apart from e3nn's summation order
        torch.testing.assert_close(blocked, e3nn_grad, rtol=1e-11, atol=1e-10)
        torch.testing.assert_close(plain, e3nn_grad, rtol=1e-11, atol=1e-10)
        with torch.no_grad():  # the forward without autograd.Function (no graph to record)
            torch.testing.assert_close(spherical_harmonics(v, lmax, normalize=normalize,
                                                           normalization="integral"), y)
    assert torch.autograd.gradcheck(lambda x: spherical_harmonics(x, 3), v[:9].detach().requires_grad_())
    # the plain-op forward (used under torch.compile and on GPUs) against the blocked one
    u = torch.nn.functional.normalize(v.detach(), dim=-1)
    tensors = _sh_coefficients._coefficient_tensors(6, "norm", torch.float64, torch.device("cpu"))
    torch.testing.assert_close(_sh_kernels._forward_reference(u, 6, tensors[0], tensors[1:7]),
                               _sh_kernels._forward_chunked(v.detach(), 6, True, tensors[0], tensors[1:7]),
                               rtol=0, atol=1e-13)


def test_no_vectors():
    """No edges (every atom isolated): [0, M] values and [0, 3] gradients on every path, the
    plain-op one (GPUs, torch.compile) included."""
    empty = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    for lmax in (0, 2, 8):
        y = spherical_harmonics(empty, lmax)
        assert y.shape == (0, (lmax + 1) ** 2)
        (grad,) = torch.autograd.grad(y.sum(), empty, allow_unused=True, materialize_grads=True)
        assert grad.shape == (0, 3)
    tensors = _sh_coefficients._coefficient_tensors(4, "component", torch.float64, torch.device("cpu"))
    sh = _sh_kernels._forward_reference(empty.detach(), 4, tensors[0], tensors[1:5])
    assert sh.shape == (0, 25)
    assert _sh_kernels._backward_reference(torch.zeros(0, 25, dtype=torch.float64), sh, 4, tensors[5:9]).shape == (0, 3)


def test_leading_dimensions():
    v = make_vectors()[:24].reshape(2, 4, 3, 3)
    got = spherical_harmonics(v, 2)
    assert got.shape == (2, 4, 3, 9)
    torch.testing.assert_close(got.reshape(-1, 9), spherical_harmonics(v.reshape(-1, 3), 2))


@pytest.mark.parametrize("lmax", [3, 8])  # the polynomial kernel and the recursion kernel
def test_no_nan_derivatives_on_axes_and_at_zero(lmax):
    eye = torch.eye(3, dtype=torch.float64)
    v = torch.cat([eye, -eye, 1e-30 * eye, torch.zeros(1, 3, dtype=torch.float64)]).requires_grad_(True)
    y = spherical_harmonics(v, lmax)
    w = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * w).sum(), v, create_graph=True)
    (h,) = torch.autograd.grad((g * g).sum(), v)
    assert torch.isfinite(y).all() and torch.isfinite(g).all() and torch.isfinite(h).all()
    # the blocked first-order kernel agrees with the differentiable path, zero vector included
    (first,) = torch.autograd.grad((spherical_harmonics(v, lmax) * w).sum(), v)
    torch.testing.assert_close(first, g.detach(), rtol=1e-12, atol=1e-12)
    # the zero vector (documented): Y_0 = 1, higher l vanish
    torch.testing.assert_close(y[-1], torch.eye(1, (lmax + 1) ** 2, dtype=torch.float64)[0])
    # on the axes the gradient equals e3nn's
    (ref,) = torch.autograd.grad((reference(v[:6], lmax, True, "component") * w[:6]).sum(), v)
    torch.testing.assert_close(g[:6], ref[:6], rtol=0, atol=1e-10)


def test_compile_fullgraph_matches_eager():
    m = SphericalHarmonics(3, normalization="integral").double()
    compiled = torch.compile(m, fullgraph=True)
    v = make_vectors(num=5).requires_grad_(True)
    y = compiled(v)
    (g,) = torch.autograd.grad(y.sum(), v)
    torch.testing.assert_close(y, reference(v, 3, True, "integral"), rtol=0, atol=1e-12)
    torch.testing.assert_close(g, torch.autograd.grad(m(v).sum(), v)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("ls", [[0, 2], [2, 1], [1, 1, 3], [3], [0, 1, 2]])
@pytest.mark.parametrize("shape", [(7,), (4, 5), (2, 1, 3)])
def test_selected_ls_any_order_and_leading_dimensions_equal_e3nn(ls, shape):
    v = make_vectors()[:math.prod(shape)].reshape(shape + (3,))
    for normalization in ("component", "integral"):
        got = spherical_harmonics_l(v, ls, normalization=normalization)
        expected = o3.spherical_harmonics(ls, v, True, normalization)
        assert got.shape == expected.shape == shape + (sum(2 * l + 1 for l in ls),)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_invalid_degrees_rejected():
    v = make_vectors(num=3)
    with pytest.raises(ValueError, match="lmax"):
        spherical_harmonics(v, -1)
    with pytest.raises(ValueError, match="lmax"):
        SphericalHarmonics(-1)
    for ls in ([], [1, -1]):
        with pytest.raises(ValueError, match="ls"):
            spherical_harmonics_l(v, ls)


@pytest.mark.parametrize("dtype, scales", [
    (torch.float32, [1e18, 2e19, 1e25, 1e36, 1e38]),
    (torch.float64, [1e150, 1e155, 1e200, 1e300]),
])
@pytest.mark.parametrize("lmax", [2, 5, 8])  # polynomial kernel (backward: Eq. 3 / Eq. 2), recursion
def test_vectors_whose_squared_norm_overflows(dtype, scales, lmax):
    """|r|^2 overflows above ~1.8e19 (float32) / 1.3e154 (float64): Y(r) must still be
    Y(r / |r|) (it was Y(0) off the sphere: Y_2 = [0, 0, -1.118, 0, 1.936]), on every path,
    with the gradient J(r / |r|) / |r|."""
    unit = make_vectors(num=12)[:12]
    unit = unit / unit.norm(dim=1, keepdim=True)                                 # [12, 3]
    expected = reference(unit, lmax, True, "component").to(dtype)               # [12, M]
    weights = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    directional = torch.autograd.grad((reference(unit.requires_grad_(True), lmax, True, "component")
                                       * weights).sum(), unit)[0].to(dtype)
    weights = weights.to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    tensors = tuple(_sh_coefficients._coefficient_tensors(lmax, "component", dtype, torch.device("cpu")))
    for scale in scales:
        v = (unit.detach() * scale).to(dtype)
        torch.testing.assert_close(spherical_harmonics(v, lmax), expected, **tol)   # no autograd
        torch.testing.assert_close(_sh_kernels._forward_plain(v, lmax, True, tensors), expected, **tol)
        for create_graph in (False, True):  # blocked first-order kernels; differentiable backward
            x = v.clone().requires_grad_(True)
            y = spherical_harmonics(x, lmax)
            (g,) = torch.autograd.grad((y * weights).sum(), x, create_graph=create_graph)
            torch.testing.assert_close(y.detach(), expected, **tol)
            torch.testing.assert_close(g.detach() * scale, directional, **tol)
        x = v.clone().requires_grad_(True)  # the plain-op path (torch.compile, GPUs)
        (g,) = torch.autograd.grad((_sh_kernels._forward_plain(x, lmax, True, tensors) * weights).sum(), x)
        torch.testing.assert_close(g * scale, directional, **tol)
