"""The compiled CPU kernels (molnets._native) against the PyTorch operations they replace, their
input checks, and what happens where they cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from e3nn import o3

from molnets import _native
from molnets._ace_kernel import NativeProductBasis, native_product_applies, native_terms
from molnets.ace import ProductBasis
from molnets.layers._message_kernels import native_convolution, native_convolution_backward
from molnets.layers.cartesian import PART_SLICES
from molnets.layers._scatter_outer_kernels import native_scatter_outer, native_scatter_outer_backward
from molnets.layers.pairs import pair_convolution

needs_native = pytest.mark.skipif(not _native.available(), reason="no C compiler here: the compiled kernels cannot be built")

DTYPES = [torch.float64, torch.float32]


def tolerance(dtype):
    return dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)


def plain_convolution(weights, x, pair_i, pair_j, parts):
    """The convolution in plain operations (no kernel: ``pair_convolution`` on few messages)."""
    spread = torch.cat([weights[:, k:k + 1].expand(-1, b - a, -1) for k, (a, b) in enumerate(parts)], 1)
    return (torch.zeros_like(x).index_add(0, pair_i, spread * x[pair_j])
            .index_add(0, pair_j, spread * x[pair_i]))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [((0, 1),), tuple(PART_SLICES)], ids=["one part", "I A S"])
def test_pair_convolution_kernel_equals_plain_operations(dtype, parts):
    """Forward and both gradients, with an atom paired with its own periodic image (i = j), a
    pair listed twice and an odd number of channels (threads split them unevenly)."""
    N, n, C = 6, parts[-1][1], 7
    x = torch.randn(N, n, C, dtype=dtype, requires_grad=True)
    pair_i, pair_j = torch.tensor([0, 1, 2, 2, 3, 4, 4]), torch.tensor([1, 2, 2, 5, 4, 0, 0])
    weights = torch.randn(len(pair_i), len(parts), C, dtype=dtype, requires_grad=True)
    expected = plain_convolution(weights, x, pair_i, pair_j, parts)
    out = native_convolution(weights.detach(), x.detach(), pair_i, pair_j, parts, x.new_zeros(x.shape))
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    g = torch.randn_like(expected)
    grad_w, grad_x = torch.autograd.grad(expected, (weights, x), g)
    got_x, got_w = torch.zeros_like(x), torch.empty_like(weights)
    native_convolution_backward(g, weights.detach(), x.detach(), pair_i, pair_j, parts, got_x, got_w)
    torch.testing.assert_close(got_x, grad_x, **tolerance(dtype))
    torch.testing.assert_close(got_w, grad_w, **tolerance(dtype))
    only_x, only_w = torch.zeros_like(x), torch.empty_like(weights)  # either gradient alone
    native_convolution_backward(g, weights.detach(), x.detach(), pair_i, pair_j, parts, only_x, None)
    native_convolution_backward(g, weights.detach(), x.detach(), pair_i, pair_j, parts, None, only_w)
    torch.testing.assert_close(only_x, grad_x, **tolerance(dtype))
    torch.testing.assert_close(only_w, grad_w, **tolerance(dtype))


@needs_native
def test_pair_convolution_layer_runs_the_kernel_with_its_gradients():
    """``pair_convolution`` on messages above a chunk (the chunked path, now one native pass):
    values, gradients and the double backward equal the plain operations'."""
    from molnets.layers import _message_kernels

    x = torch.randn(40, 9, 16, dtype=torch.float64, requires_grad=True)
    pair_i, pair_j = torch.randint(0, 40, (2, 3000))
    weights = torch.randn(3000, 3, 16, dtype=torch.float64, requires_grad=True)
    assert _message_kernels.kernel_applies(3000, 9 * 16, x)
    out = pair_convolution(weights, x, pair_i, pair_j, PART_SLICES)
    expected = plain_convolution(weights, x, pair_i, pair_j, PART_SLICES)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (weights, x), g, create_graph=True)
    first_expected = torch.autograd.grad(expected, (weights, x), g, create_graph=True)
    for a, b in zip(first, first_expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    second = torch.autograd.grad(sum(t.square().sum() for t in first), (weights, x))
    second_expected = torch.autograd.grad(sum(t.square().sum() for t in first_expected), (weights, x))
    for a, b in zip(second, second_expected):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def plain_scatter_outer(u, weights, index, num_nodes, parts):
    spread = torch.cat([weights[:, k:k + 1].expand(-1, b - a, -1) for k, (a, b) in enumerate(parts)], 1)
    return torch.zeros(num_nodes, u.shape[1], weights.shape[2], dtype=u.dtype).index_add(0, index, u[:, :, None] * spread)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [((0, 1),), tuple(PART_SLICES)], ids=["one part", "I A S"])
def test_scatter_outer_kernel_equals_plain_operations(dtype, parts):
    """Forward and both gradients (either alone too), an atom receiving several edges and one none."""
    N, n, C = 5, parts[-1][1], 7
    index = torch.tensor([0, 2, 2, 3, 0, 2])
    u = torch.randn(len(index), n, dtype=dtype, requires_grad=True)
    weights = torch.randn(len(index), len(parts), C, dtype=dtype, requires_grad=True)
    expected = plain_scatter_outer(u, weights, index, N, parts)
    out = native_scatter_outer(u.detach(), weights.detach(), index, parts, torch.zeros(N, n, C, dtype=dtype))
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    g = torch.randn_like(expected)
    grad_u, grad_w = torch.autograd.grad(expected, (u, weights), g)
    got_u, got_w = torch.empty_like(u), torch.empty_like(weights)
    native_scatter_outer_backward(g, u.detach(), weights.detach(), index, parts, got_u, got_w)
    torch.testing.assert_close(got_u, grad_u, **tolerance(dtype))
    torch.testing.assert_close(got_w, grad_w, **tolerance(dtype))
    only_u, only_w = torch.empty_like(u), torch.empty_like(weights)
    native_scatter_outer_backward(g, u.detach(), weights.detach(), index, parts, only_u, None)
    native_scatter_outer_backward(g, u.detach(), weights.detach(), index, parts, None, only_w)
    torch.testing.assert_close(only_u, grad_u, **tolerance(dtype))
    torch.testing.assert_close(only_w, grad_w, **tolerance(dtype))
    with pytest.raises(IndexError, match="out of range"):
        native_scatter_outer(u.detach(), weights.detach(), index + 3, parts, torch.zeros(N, n, C, dtype=dtype))


def product_basis(lmax, nu, targets, C=5, S=3, dtype=torch.float64):
    irreps = o3.Irreps([(C, (l, (-1) ** l)) for l in range(lmax + 1)])
    layer = ProductBasis(irreps, o3.Irreps([(C, ir) for _, ir in o3.Irreps(targets)]), correlation=nu, num_species=S)
    return layer.to(dtype).requires_grad_(False)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lmax,nu,targets", [(2, 1, "0e + 1o + 2e"), (3, 2, "0e + 1o + 2e + 2o"), (3, 3, "0e + 1o"),
                                             (2, 3, "0e + 1o + 1e + 2e + 2o"), (0, 3, "0e")])
def test_product_basis_kernel_equals_plain_operations(dtype, lmax, nu, targets):
    """Frozen weights: the compiled product basis runs, with the plain operations' values and
    gradients; the double backward goes through the plain operations."""
    layer = product_basis(lmax, nu, targets, dtype=dtype)
    A = torch.randn(11, 5, (lmax + 1) ** 2, dtype=dtype, requires_grad=True)
    species = torch.tensor([0, 2, 1, 1, 0, 2, 2, 1, 0, 0, 1])
    assert native_product_applies(layer, A)
    B = layer(A, species)
    assert type(B.grad_fn).__name__ == "NativeProductBasisBackward"
    expected = layer._plain_forward(A, species)
    torch.testing.assert_close(B, expected, **tolerance(dtype))
    v = torch.randn_like(B)
    torch.testing.assert_close(torch.autograd.grad(B, A, v)[0], torch.autograd.grad(expected, A, v)[0],
                               **tolerance(dtype))
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda a: layer(a, species), (A,))
        assert torch.autograd.gradgradcheck(lambda a: layer(a, species), (A,))


@needs_native
def test_product_basis_terms_are_the_couplings_nonzeros():
    """Each term is a distinct monomial (factors sorted, padded with M) and an output component;
    their count is far below the dense [T, M, O] of the folded weights (the point of the kernel)."""
    layer = product_basis(3, 3, "0e + 1o")
    terms = native_terms(layer)
    M = layer.irreps_A.dim
    pairs = {(tuple(f), o) for f, o in zip(terms.factors.tolist(), terms.component.tolist())}
    assert len(pairs) == terms.factors.shape[0]  # no term twice
    assert all(list(f) == sorted(f) for f, _ in pairs) and terms.factors.max() == M  # padded lower degrees
    assert terms.factors.shape[0] < 0.1 * M ** 3 * layer.num_components_out


@needs_native
def test_native_kernel_only_for_frozen_weights_on_cpu_float():
    layer = product_basis(2, 3, "0e + 1o")
    A = torch.randn(4, 5, 9, dtype=torch.float64)
    assert native_product_applies(layer, A)
    assert not native_product_applies(layer, A.half())
    assert not native_product_applies(product_basis(2, 3, "0e + 1o").requires_grad_(True), A)
    assert not native_product_applies(product_basis(2, 4, "0e", C=2), torch.randn(4, 2, 9, dtype=torch.float64))


@needs_native
def test_native_kernels_reject_bad_input():
    """Indices out of range are found before anything is written; arrays the kernels cannot
    read (not contiguous, another dtype) are refused."""
    x = torch.randn(3, 1, 4, dtype=torch.float64)
    weights = torch.randn(2, 1, 4, dtype=torch.float64)
    out = torch.zeros_like(x)
    with pytest.raises(IndexError, match="out of range"):
        native_convolution(weights, x, torch.tensor([0, 3]), torch.tensor([1, 2]), ((0, 1),), out)
    with pytest.raises(IndexError, match="out of range"):
        native_convolution(weights, x, torch.tensor([0, -1]), torch.tensor([1, 2]), ((0, 1),), out)
    assert not out.any()
    with pytest.raises(TypeError, match="contiguous"):
        native_convolution(weights, x, torch.tensor([0, 1]), torch.tensor([1, 2]), ((0, 1),), torch.zeros(4, 1, 3).transpose(0, 2))
    with pytest.raises(TypeError, match="int64"):
        native_convolution(weights, x, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1, 2]), ((0, 1),), out)
    layer = product_basis(1, 2, "0e")
    with pytest.raises(IndexError, match="out of range"):
        NativeProductBasis.apply(torch.randn(2, 5, 4, dtype=torch.float64), torch.tensor([0, 3]), layer)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


@needs_native
def test_kernels_on_more_than_one_thread_equal_the_pytorch_kernels(two_threads):
    """Sizes above the kernels' grain (one thread below it): threads split the channels, edges,
    matrices or atoms; the results equal the PyTorch kernels' (float64, 1e-12)."""
    from molnets.models import _tensornet_ops

    x = torch.randn(30, 9, 33, dtype=torch.float64)
    pair_i, pair_j = torch.randint(0, 30, (2, 500))
    weights = torch.randn(500, 3, 33, dtype=torch.float64)
    out = native_convolution(weights, x, pair_i, pair_j, PART_SLICES, x.new_zeros(x.shape))
    torch.testing.assert_close(out, plain_convolution(weights, x, pair_i, pair_j, PART_SLICES), atol=1e-12, rtol=1e-12)
    u = torch.randn(500, 9, dtype=torch.float64)
    scattered = native_scatter_outer(u, weights, pair_i, PART_SLICES, x.new_zeros(x.shape))
    torch.testing.assert_close(scattered, plain_scatter_outer(u, weights, pair_i, 30, PART_SLICES), atol=1e-12, rtol=1e-12)
    g = torch.randn_like(x)
    grad_u, grad_w = torch.empty_like(u), torch.empty_like(weights)
    native_scatter_outer_backward(g, u, weights, pair_i, PART_SLICES, grad_u, grad_w)
    torch.testing.assert_close(grad_u, torch.einsum("enc,enc->en", g[pair_i], weights[:, [0, 1, 1, 1, 2, 2, 2, 2, 2]]),
                               atol=1e-12, rtol=1e-12)
    P, Q = torch.randn(2, 9, 5000, dtype=torch.float64)
    expected = _tensornet_ops._add_product(_tensornet_ops._add_product(torch.zeros(3, 3, 5000, dtype=torch.float64),
                                                                       P.view(3, 3, -1), Q.view(3, 3, -1)),
                                           Q.view(3, 3, -1), P.view(3, 3, -1))
    torch.testing.assert_close(_tensornet_ops._anticommutator(P.view(3, 3, -1), Q.view(3, 3, -1)), expected.view(9, -1),
                               atol=1e-12, rtol=1e-12)
    layer = product_basis(3, 3, "0e + 1o", C=16)
    A = torch.randn(60, 16, 16, dtype=torch.float64)
    species = torch.randint(0, 3, (60,))
    assert 60 * native_terms(layer).factors.shape[0] * 16 >= 1 << 15  # above the grain
    torch.testing.assert_close(NativeProductBasis.apply(A, species, layer), layer._plain_forward(A, species),
                               atol=1e-12, rtol=1e-12)


@needs_native
def test_anticommutator_reads_transposed_and_strided_operands():
    """The 3x3 products read their operands in place: transposed views, rows of a wider array
    (a chunk's columns); layouts they cannot read run the PyTorch form (same numbers)."""
    from molnets.models import _tensornet_ops

    wide = torch.randn(9, 40, dtype=torch.float64)
    P, Q = wide[:, 5:17], torch.randn(9, 12, dtype=torch.float64)
    plus = torch.randn(12, 9, dtype=torch.float64).T  # entries along the other axis: not readable in place
    for p, q in ((P.reshape(3, 3, 12), Q.view(3, 3, 12)), (Q.view(3, 3, 12).transpose(0, 1), P.reshape(3, 3, 12))):
        for extra in (None, plus):
            expected = torch.einsum("akl,kbl->abl", p, q) + torch.einsum("akl,kbl->abl", q, p)
            if extra is not None:
                expected = expected + extra.reshape(3, 3, 12)
            got = _tensornet_ops._anticommutator(p, q, extra)
            torch.testing.assert_close(got, expected.reshape(9, 12), atol=1e-12, rtol=1e-12)
    out = torch.randn(3, 3, 12, dtype=torch.float64)
    D = torch.randn(3, 3, 12, dtype=torch.float64)
    expected = out + torch.einsum("akl,kbl->abl", D, D)
    torch.testing.assert_close(_tensornet_ops._add_square(out, D), expected, atol=1e-12, rtol=1e-12)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


FROZEN_MACE = """
import torch
from molnets import _native, testing
from molnets.models import MACE, MACEConfig, Potential
torch.manual_seed(0)
model = MACE(MACEConfig(species=(1, 6, 8), num_channels=4, lmax=2, num_layers=2)).double().requires_grad_(False)
graph = testing.random_graph(7, cutoff=5.0, species=(1, 6, 8), seed=1, dtype=torch.float64)
out = Potential(model)(graph)
print(_native.available(), repr(out["energy"].item()), repr(out["forces"].abs().sum().item()))
"""


@needs_native
def test_results_do_not_depend_on_the_compiled_kernels(tmp_path):
    """A frozen MACE-style model in three fresh processes: the kernels compiled into an empty
    cache, turned off (``MOLNETS_NATIVE=0``), and a compiler that fails (warned; PyTorch's
    operations run): the same energy and forces to 1e-12."""
    built = run_python(FROZEN_MACE, MOLNETS_CACHE_DIR=str(tmp_path / "cache"))
    assert built.returncode == 0, built.stderr
    assert list((tmp_path / "cache").glob("molnets-native-*.so"))
    off = run_python(FROZEN_MACE, MOLNETS_NATIVE="0")
    failed = run_python(FROZEN_MACE, MOLNETS_CACHE_DIR=str(tmp_path / "empty"), CC="false")
    assert off.returncode == 0 and failed.returncode == 0, off.stderr + failed.stderr
    assert "could not be built" in failed.stderr and "could not be built" not in off.stderr
    results = [p.stdout.split() for p in (built, off, failed)]
    assert [r[0] for r in results] == ["True", "False", "False"]
    for available, energy, forces in results[1:]:
        assert abs(float(energy) - float(results[0][1])) <= 1e-12 * abs(float(energy))
        assert abs(float(forces) - float(results[0][2])) <= 1e-12 * abs(float(forces))
