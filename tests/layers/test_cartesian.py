"""Cartesian rank-2 tensor ops of TensorNet: decomposition, components, equivariance (float64)."""

import math

import pytest
import torch

from molnets.layers import cartesian
from molnets.layers.cartesian import (
    DirectionComponents,
    PartNorms,
    TensorLinear,
    anticommutator,
    component_basis,
    compose,
    decompose,
    expand_parts,
    from_components,
    part_norms,
    plus_square,
    skew,
    skew_to_vector,
    tensor_norm,
    to_components,
    traceless_outer,
    transpose_components,
)

DTYPE = torch.float64


def orthogonal(seed: int, det: float) -> torch.Tensor:
    """A random 3x3 orthogonal matrix with the given determinant (+1 rotation, -1 improper)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=DTYPE))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) * det < 0:
        q = -q
    assert abs(float(torch.linalg.det(q)) - det) < 1e-12
    return q


def rotate(Q: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return Q @ X @ Q.T


@pytest.fixture
def X():
    return torch.randn(4, 5, 3, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))


def test_decompose_parts_and_compose(X):
    I, A, S = decompose(X)
    eye = torch.eye(3, dtype=DTYPE)
    torch.testing.assert_close(I, torch.einsum("ncaa->nc", X) / 3)
    torch.testing.assert_close(A, -A.transpose(-2, -1))
    torch.testing.assert_close(S, S.transpose(-2, -1))
    torch.testing.assert_close(torch.einsum("ncaa->nc", S), torch.zeros_like(I))
    torch.testing.assert_close(compose(I, A, S), X)
    # The three parts are orthogonal in the Frobenius product, so the norms add up.
    norms = tensor_norm(I[..., None, None] * eye) + tensor_norm(A) + tensor_norm(S)
    torch.testing.assert_close(norms, (X**2).sum((-2, -1)))


@pytest.mark.parametrize("det", [1.0, -1.0])
def test_decompose_is_equivariant(X, det):
    Q = orthogonal(seed=3, det=det)
    I, A, S = decompose(X)
    I2, A2, S2 = decompose(rotate(Q, X))
    torch.testing.assert_close(I2, I)
    torch.testing.assert_close(A2, rotate(Q, A))
    torch.testing.assert_close(S2, rotate(Q, S))
    torch.testing.assert_close(compose(I2, A2, S2), rotate(Q, X))
    torch.testing.assert_close(tensor_norm(rotate(Q, X)), tensor_norm(X))




def test_matrix_products_equal_matmul_on_both_paths():
    """M Y + Y M and X + D + D D against torch.matmul, value and gradient: the CPU's batched
    products, and the broadcast form that other devices use (tests/models/test_device.py runs
    it there end to end)."""
    M, Y, X = (torch.randn(7, 5, 3, 3, dtype=DTYPE, requires_grad=True) for _ in range(3))
    weights = torch.randn(2, 7, 5, 3, 3, dtype=DTYPE)

    def values_and_gradients(anti, plus):
        out = (anti(M, Y), plus(X, M))
        loss = sum((o * w).sum() for o, w in zip(out, weights))
        return out + torch.autograd.grad(loss, (M, Y, X))

    expected = values_and_gradients(lambda a, b: a @ b + b @ a, lambda x, d: x + d + d @ d)
    cpu = values_and_gradients(anticommutator, plus_square)
    matmul3 = cartesian._matmul3
    other = values_and_gradients(lambda a, b: matmul3(a, b) + matmul3(b, a), lambda x, d: x + d + matmul3(d, d))
    for got in (cpu, other):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("det", [1.0, -1.0])
def test_skew_is_cross_product_and_axial(det):
    g = torch.Generator().manual_seed(1)
    v, w = torch.randn(2, 7, 3, dtype=DTYPE, generator=g)
    torch.testing.assert_close((skew(v) @ w[..., None])[..., 0], torch.linalg.cross(v, w))
    torch.testing.assert_close(skew_to_vector(skew(v)), v)
    Q = orthogonal(seed=4, det=det)
    # An axial vector: skew(Q v) = det(Q) Q skew(v) Qᵀ.
    torch.testing.assert_close(skew(v @ Q.T), det * rotate(Q, skew(v)))


@pytest.mark.parametrize("det", [1.0, -1.0])
def test_traceless_outer(det):
    v = torch.randn(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    T = traceless_outer(v)
    expected = torch.einsum("na,nb->nab", v, v) - (v * v).sum(-1)[:, None, None] * torch.eye(3, dtype=DTYPE) / 3
    torch.testing.assert_close(T, expected)
    torch.testing.assert_close(torch.einsum("naa->n", T), torch.zeros(6, dtype=DTYPE))
    Q = orthogonal(seed=5, det=det)
    torch.testing.assert_close(traceless_outer(v @ Q.T), rotate(Q, T))


def test_component_basis_is_orthonormal_and_adapted():
    B = component_basis(DTYPE)
    torch.testing.assert_close(torch.einsum("kab,lab->kl", B, B), torch.eye(9, dtype=DTYPE))
    I, A, S = decompose(B)
    # B_0 is pure I, B_1..3 pure A, B_4..8 pure S.
    assert torch.count_nonzero(I[1:]) == 0 and torch.count_nonzero(A[0]) + torch.count_nonzero(A[4:]) == 0
    assert torch.count_nonzero(S[:4]) == 0


def test_components_hold_the_parts(X):
    c = to_components(X)
    I, A, S = decompose(X)
    torch.testing.assert_close(from_components(c), X)
    torch.testing.assert_close(c[..., 0], math.sqrt(3) * I)
    torch.testing.assert_close(c[..., 1:4], math.sqrt(2) * skew_to_vector(A))
    torch.testing.assert_close(from_components(torch.cat((0 * c[..., :4], c[..., 4:]), -1)), S)
    torch.testing.assert_close((c**2).sum(-1), tensor_norm(X))
    eye = torch.eye(3, dtype=DTYPE)
    expected = torch.stack((tensor_norm(I[..., None, None] * eye), tensor_norm(A), tensor_norm(S)), -1)
    torch.testing.assert_close(part_norms(c), expected)
    torch.testing.assert_close(transpose_components(c), to_components(X.transpose(-2, -1)))
    f = torch.tensor([2.0, 3.0, 5.0], dtype=DTYPE)
    torch.testing.assert_close(
        from_components(c * expand_parts(f)), compose(2 * I, 3 * A, 5 * S)
    )


def test_part_norms_module_is_the_norms_of_each_channels_parts():
    """PartNorms: the three parts' norms (decompose, tensor_norm) of each channel, grouped by
    part; from a contiguous X and from an entry-major view (a kernel's output); built in float32
    and cast, exact in float64; its gradient that of the plain expression."""
    g = torch.Generator().manual_seed(3)
    N, C = 5, 4
    X = torch.randn(N, C, 3, 3, generator=g, dtype=DTYPE)
    I, A, S = decompose(X)
    eye = torch.eye(3, dtype=DTYPE)
    norms = torch.stack((tensor_norm(I[..., None, None] * eye), tensor_norm(A), tensor_norm(S)), 1)  # [N, 3, C]
    module = PartNorms().to(DTYPE)  # built in the default float32
    assert module.basis.dtype == DTYPE
    torch.testing.assert_close(module(X), norms.flatten(1), rtol=1e-14, atol=0)
    entry_major = X.reshape(N * C, 9).T.contiguous().T.view(N, C, 3, 3)
    assert not entry_major.is_contiguous()
    torch.testing.assert_close(module(entry_major), norms.flatten(1), rtol=1e-14, atol=0)
    X.requires_grad_(True)
    w = torch.randn(N, 3 * C, generator=g, dtype=DTYPE)
    (grad,) = torch.autograd.grad((module(X) * w).sum(), X)
    (expected,) = torch.autograd.grad((part_norms(to_components(X)).transpose(1, 2).flatten(1) * w).sum(), X)
    torch.testing.assert_close(grad, expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("det", [1.0, -1.0])
def test_tensor_linear_matches_paper_and_is_equivariant(X, det):
    torch.manual_seed(0)
    layer = TensorLinear(5, 6).to(DTYPE)
    scales = torch.rand(4, 6, 3, dtype=DTYPE)
    I, A, S = decompose(X)
    W = layer.weight
    expected = compose(
        torch.einsum("nc,dc->nd", I, W[0]) * scales[..., 0],
        torch.einsum("ncab,dc->ndab", A, W[1]) * scales[..., 1, None, None],
        torch.einsum("ncab,dc->ndab", S, W[2]) * scales[..., 2, None, None],
    )
    torch.testing.assert_close(layer(X, scales), expected)
    Q = orthogonal(seed=6, det=det)
    torch.testing.assert_close(layer(rotate(Q, X), scales), rotate(Q, layer(X, scales)))
    torch.testing.assert_close(layer(X.transpose(-2, -1)), layer(X).transpose(-2, -1))


def test_tensor_linear_frozen_weights_follow_changes(X):
    """With frozen weights the per-component weight stack is kept between calls; an in-place
    change, a new weight tensor (load_state_dict) and a dtype cast must each be seen."""
    torch.manual_seed(1)
    layer = TensorLinear(5, 6).to(DTYPE).requires_grad_(False)
    reference = TensorLinear(5, 6).to(DTYPE)
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(X), reference(X))
    with torch.no_grad():
        layer.weight[1] *= 3.0
        reference.weight[1] *= 3.0
    torch.testing.assert_close(layer(X), reference(X))
    other = {"weight": torch.randn(3, 6, 5, dtype=DTYPE)}
    layer.load_state_dict(other)
    reference.load_state_dict(other)
    torch.testing.assert_close(layer(X), reference(X))
    torch.testing.assert_close(layer.float()(X.float()), reference.float()(X.float()))


def test_direction_components_equal_the_composed_tensor():
    """The one-matmul components of δ + skew(r̂) + (r̂r̂ᵀ - |r̂|²δ/3), built in float32 and cast to
    float64 (the constants stay exact), against composing the three parts and projecting."""
    u = torch.randn(7, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    u = u / u.norm(dim=-1, keepdim=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        layer = DirectionComponents().to(DTYPE)
    finally:
        torch.set_default_dtype(previous)
    expected = to_components(compose(torch.ones(7, dtype=DTYPE), skew(u), traceless_outer(u)))
    torch.testing.assert_close(layer(u), expected, rtol=0, atol=1e-15)
