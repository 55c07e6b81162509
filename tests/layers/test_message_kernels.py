"""The fused message scatters (pair_convolution, scatter_outer) against loops and their references.

The CPU kernels work in chunks of edges; a tiny chunk size makes every test cross several chunk
boundaries and end on a partial chunk.
"""

import pytest
import torch

from molnets.layers import _atomic_basis_kernels, _message_kernels
from molnets.layers.pairs import _pair_convolution_reference, pair_convolution
from molnets.layers.scatter import _scatter_outer_reference, scatter_outer

TENSORNET_PARTS = ((0, 1), (1, 4), (4, 9))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(_message_kernels, "CHUNK_NUMEL", 50)  # a few pairs per chunk


def _inputs(num_atoms, num_pairs, rows, parts, channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_atoms, rows, channels, generator=g, dtype=torch.float64)
    w = torch.randn(num_pairs, len(parts), channels, generator=g, dtype=torch.float64)
    i = torch.randint(0, num_atoms, (num_pairs,), generator=g)
    j = torch.randint(0, num_atoms, (num_pairs,), generator=g)
    return w, x, i, j


def _part_of_rows(parts):
    return [k for k, (a, b) in enumerate(parts) for _ in range(a, b)]


@pytest.mark.parametrize("rows, parts", [(1, ((0, 1),)), (9, TENSORNET_PARTS), (4, ((0, 4),))])
def test_pair_convolution_equals_a_loop_over_pairs(rows, parts):
    w, x, i, j = _inputs(7, 23, rows, parts, 5)
    expected = torch.zeros_like(x)
    part = _part_of_rows(parts)
    for p in range(i.shape[0]):
        for n in range(rows):
            expected[i[p], n] += w[p, part[n]] * x[j[p], n]
            expected[j[p], n] += w[p, part[n]] * x[i[p], n]
    assert torch.allclose(pair_convolution(w, x, i, j, parts), expected, atol=1e-13, rtol=0)


def test_pair_convolution_kernel_equals_reference_with_gradients():
    w, x, i, j = _inputs(11, 57, 9, TENSORNET_PARTS, 6)
    w.requires_grad_(), x.requires_grad_()
    out = pair_convolution(w, x, i, j, TENSORNET_PARTS)
    assert type(out.grad_fn).__name__ == "PairConvolutionBackward"  # the kernel ran
    ref = _pair_convolution_reference(w, x, i, j, TENSORNET_PARTS)
    assert torch.allclose(out, ref, atol=1e-13, rtol=0)
    v = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (w, x), v), torch.autograd.grad(ref, (w, x), v)):
        assert torch.allclose(a, b, atol=1e-13, rtol=0)


def test_pair_convolution_twice_differentiable():
    w, x, i, j = _inputs(5, 13, 9, TENSORNET_PARTS, 2)
    w.requires_grad_(), x.requires_grad_()
    f = lambda w, x: pair_convolution(w, x, i, j, TENSORNET_PARTS)  # noqa: E731
    assert torch.autograd.gradcheck(f, (w, x))
    assert torch.autograd.gradgradcheck(f, (w, x))


def test_pair_convolution_second_order_gradients_equal_reference():
    """A force loss's gradient (the backward differentiated again): the kernel's weight gradient
    is ``PairWeightGradient``, whose own gradients are convolutions; the reference's are plain."""
    w, x, i, j = _inputs(11, 57, 9, TENSORNET_PARTS, 6)
    w.requires_grad_(), x.requires_grad_()
    v = torch.randn(11, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def second_order(convolution):
        grad_w, grad_x = torch.autograd.grad(convolution(w, x, i, j, TENSORNET_PARTS), (w, x), v, create_graph=True)
        return grad_w, torch.autograd.grad(grad_w.square().sum() + (grad_x * x).sum(), (w, x))

    (kernel_grad_w, kernel), (_, reference) = second_order(pair_convolution), second_order(_pair_convolution_reference)
    assert type(kernel_grad_w.grad_fn).__name__ == "PairWeightGradientBackward"
    for a, b in zip(kernel, reference):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_pair_convolution_three_times_differentiable():
    w, x, i, j = _inputs(5, 13, 9, TENSORNET_PARTS, 2)
    w.requires_grad_(), x.requires_grad_()
    v = torch.randn(5, 9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def gradients(w, x):
        return torch.autograd.grad(pair_convolution(w, x, i, j, TENSORNET_PARTS), (w, x), v, create_graph=True)

    assert torch.autograd.gradgradcheck(gradients, (w, x))


def test_pair_convolution_float32_and_no_pairs():
    w, x, i, j = _inputs(6, 40, 9, TENSORNET_PARTS, 8)
    out = pair_convolution(w.float(), x.float(), i, j, TENSORNET_PARTS)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), _pair_convolution_reference(w, x, i, j, TENSORNET_PARTS), atol=1e-5)
    empty = pair_convolution(w[:0].requires_grad_(), x.requires_grad_(), i[:0], j[:0], TENSORNET_PARTS)
    assert torch.equal(empty, torch.zeros_like(x))
    (grad_x,) = torch.autograd.grad(empty.sum(), x)
    assert torch.equal(grad_x, torch.zeros_like(x))


@pytest.mark.parametrize("rows, parts", [(1, ((0, 1),)), (9, TENSORNET_PARTS), (3, ((0, 3),))])
def test_scatter_outer_equals_a_loop_over_edges(rows, parts):
    w, _, index, _ = _inputs(7, 31, rows, parts, 4)
    u = torch.randn(31, rows, dtype=torch.float64)
    expected = torch.zeros(7, rows, 4, dtype=torch.float64)
    part = _part_of_rows(parts)
    for e in range(31):
        for n in range(rows):
            expected[index[e], n] += u[e, n] * w[e, part[n]]
    assert torch.allclose(scatter_outer(u, w, index, 7, parts), expected, atol=1e-13, rtol=0)


def test_scatter_outer_kernel_equals_reference_with_gradients():
    w, _, index, _ = _inputs(9, 45, 9, TENSORNET_PARTS, 5)
    u = torch.randn(45, 9, dtype=torch.float64, requires_grad=True)
    w.requires_grad_()
    out = scatter_outer(u, w, index, 9, TENSORNET_PARTS)
    assert type(out.grad_fn).__name__ == "ScatterOuterBackward"
    ref = _scatter_outer_reference(u, w, index, 9, TENSORNET_PARTS)
    assert torch.allclose(out, ref, atol=1e-13, rtol=0)
    v = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (u, w), v), torch.autograd.grad(ref, (u, w), v)):
        assert torch.allclose(a, b, atol=1e-13, rtol=0)
    f = lambda u, w: scatter_outer(u, w, index[:12], 9, TENSORNET_PARTS)  # noqa: E731
    small = (u[:12].detach().requires_grad_(), w[:12].detach().requires_grad_())
    assert torch.autograd.gradcheck(f, small)
    assert torch.autograd.gradgradcheck(f, small)


def test_scatter_outer_second_order_gradients_equal_reference():
    """A force loss's gradient through the scatter: the kernel's (du, dw) is one node,
    ``ScatterOuterGradients``, differentiated by scatters and itself; the reference's are plain."""
    w, _, index, _ = _inputs(9, 45, 9, TENSORNET_PARTS, 5)
    u = torch.randn(45, 9, dtype=torch.float64, requires_grad=True)
    w.requires_grad_()
    v = torch.randn(9, 9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def second_order(scatter):
        grad_u, grad_w = torch.autograd.grad(scatter(u, w, index, 9, TENSORNET_PARTS), (u, w), v, create_graph=True)
        return grad_u, torch.autograd.grad(grad_u.square().sum() + (grad_w * w).sum(), (u, w))

    (kernel_grad_u, kernel), (_, reference) = second_order(scatter_outer), second_order(_scatter_outer_reference)
    assert type(kernel_grad_u.grad_fn).__name__ == "ScatterOuterGradientsBackward"
    for a, b in zip(kernel, reference):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_scatter_outer_three_times_differentiable():
    w, _, index, _ = _inputs(5, 12, 9, TENSORNET_PARTS, 2)
    u = torch.randn(12, 9, dtype=torch.float64, requires_grad=True)
    w.requires_grad_()
    v = torch.randn(5, 9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def gradients(u, w):
        return torch.autograd.grad(scatter_outer(u, w, index, 5, TENSORNET_PARTS), (u, w), v, create_graph=True)

    assert torch.autograd.gradgradcheck(gradients, (u, w))


def test_scatter_outer_no_edges():
    u = torch.zeros(0, 9, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(0, 3, 4, dtype=torch.float64, requires_grad=True)
    out = scatter_outer(u, w, torch.zeros(0, dtype=torch.long), 3, TENSORNET_PARTS)
    assert torch.equal(out, torch.zeros(3, 9, 4, dtype=torch.float64))
    grad_u, grad_w = torch.autograd.grad(out.sum(), (u, w))
    assert grad_u.shape == u.shape and grad_w.shape == w.shape


def test_messages_that_fit_one_chunk_take_the_reference(monkeypatch):
    monkeypatch.setattr(_message_kernels, "CHUNK_NUMEL", 1 << 18)
    w, x, i, j = _inputs(7, 23, 9, TENSORNET_PARTS, 5)
    out = pair_convolution(w, x.requires_grad_(), i, j, TENSORNET_PARTS)
    assert type(out.grad_fn).__name__ == "IndexAddBackward0"  # the reference's last operation (not the kernel)
    out = scatter_outer(torch.randn(23, 9, dtype=torch.float64, requires_grad=True), w, i, 7, TENSORNET_PARTS)
    assert type(out.grad_fn).__name__ == "IndexAddBackward0"


def test_large_messages_within_one_chunk_take_the_kernel(monkeypatch):
    monkeypatch.setattr(_message_kernels, "CHUNK_NUMEL", 1 << 18)
    w, x, i, j = _inputs(7, 120, 9, TENSORNET_PARTS, 128)        # 120 x 9 x 128 float64: 1.05 MiB
    assert 120 <= _message_kernels._chunk_size(9 * 128)           # one chunk
    out = pair_convolution(w, x.requires_grad_(), i, j, TENSORNET_PARTS)
    assert type(out.grad_fn).__name__ == "PairConvolutionBackward"
    assert torch.allclose(out, _pair_convolution_reference(w, x, i, j, TENSORNET_PARTS), atol=1e-12, rtol=0)
    out = scatter_outer(torch.randn(120, 9, dtype=torch.float64, requires_grad=True), w, i, 7, TENSORNET_PARTS)
    assert type(out.grad_fn).__name__ == "ScatterOuterBackward"
    out = pair_convolution(w[:100], x, i[:100], j[:100], TENSORNET_PARTS)  # 0.88 MiB: the reference
    assert type(out.grad_fn).__name__ == "IndexAddBackward0"


def _atomic_basis_inputs(num_atoms=6, num_pairs=17, M=4, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dims, paths = (1, 3), (2, 3)  # two node irreps (0e, 1o) with 2 and 3 paths
    rows = sum(n * d for n, d in zip(paths, dims))
    K = torch.randn(2 * num_pairs, M, rows, generator=g, dtype=torch.float64)
    radial = [torch.randn(num_pairs, n, C, generator=g, dtype=torch.float64) for n in paths]
    node_feats = [torch.randn(num_atoms, d, C, generator=g, dtype=torch.float64) for d in dims]
    pair_i = torch.randint(0, num_atoms, (num_pairs,), generator=g)
    pair_j = torch.randint(0, num_atoms, (num_pairs,), generator=g)
    senders, receivers = torch.cat([pair_j, pair_i]), torch.cat([pair_i, pair_j])
    return K, senders, receivers, radial, node_feats


def test_atomic_basis_messages_equal_a_loop_over_edges():
    K, senders, receivers, radial, node_feats = _atomic_basis_inputs()
    num_pairs = K.shape[0] // 2
    expected = torch.zeros(6, K.shape[1], 3, dtype=torch.float64)
    for e in range(K.shape[0]):
        X = torch.cat([(R[e % num_pairs][:, None, :] * Wh[senders[e]][None]).reshape(-1, 3)
                       for R, Wh in zip(radial, node_feats)])                     # [rows, C]
        expected[receivers[e]] += K[e] @ X
    assert torch.allclose(_atomic_basis_kernels.atomic_basis_messages(K, senders, receivers, 6, radial, node_feats),
                          expected, atol=1e-12, rtol=0)
    assert torch.allclose(_atomic_basis_kernels.atomic_basis_chunked(K, senders, receivers, 6, radial, node_feats),
                          expected, atol=1e-12, rtol=0)


def test_atomic_basis_kernel_gradients_equal_reference_and_twice_differentiable():
    K, senders, receivers, radial, node_feats = _atomic_basis_inputs()
    inputs = [t.requires_grad_() for t in [K, radial[0], node_feats[0], radial[1], node_feats[1]]]

    def kernel(K, R0, W0, R1, W1):
        return _atomic_basis_kernels.AtomicBasisMessages.apply(K, senders, receivers, 6, R0, W0, R1, W1)

    def reference(K, R0, W0, R1, W1):
        return _atomic_basis_kernels.atomic_basis_messages(K, senders, receivers, 6, [R0, R1], [W0, W1])

    out, ref = kernel(*inputs), reference(*inputs)
    v = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, v), torch.autograd.grad(ref, inputs, v)):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    K, senders, receivers, radial, node_feats = _atomic_basis_inputs(num_atoms=4, num_pairs=5, M=2, C=2)
    small = [t.requires_grad_() for t in [K, radial[0], node_feats[0], radial[1], node_feats[1]]]
    assert torch.autograd.gradcheck(kernel, small)
    assert torch.autograd.gradgradcheck(kernel, small)


def test_atomic_basis_second_order_gradients_equal_reference():
    """A force loss's gradient through the atomic basis: the kernel's backward is one node,
    ``AtomicBasisGradients``, differentiated by chunked messages and itself."""
    K, senders, receivers, radial, node_feats = _atomic_basis_inputs()
    inputs = [t.requires_grad_() for t in [K, radial[0], node_feats[0], radial[1], node_feats[1]]]
    v = torch.randn(6, K.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def second_order(messages):
        grads = torch.autograd.grad(messages(*inputs), inputs, v, create_graph=True)
        loss = sum((grad * torch.cos(x)).sum() for grad, x in zip(grads, inputs)) + grads[0].square().sum()
        return grads[0], torch.autograd.grad(loss, inputs)

    (kernel_grad_K, kernel), (_, reference) = (
        second_order(lambda K, R0, W0, R1, W1: _atomic_basis_kernels.AtomicBasisMessages.apply(
            K, senders, receivers, 6, R0, W0, R1, W1)),
        second_order(lambda K, R0, W0, R1, W1: _atomic_basis_kernels.atomic_basis_messages(
            K, senders, receivers, 6, [R0, R1], [W0, W1])))
    assert type(kernel_grad_K.grad_fn).__name__ == "AtomicBasisGradientsBackward"
    for a, b in zip(kernel, reference):
        assert torch.allclose(a, b, atol=1e-11, rtol=0)


def test_atomic_basis_three_times_differentiable():
    K, senders, receivers, radial, node_feats = _atomic_basis_inputs(num_atoms=4, num_pairs=5, M=2, C=2)
    inputs = [t.requires_grad_() for t in [K, radial[0], node_feats[0], radial[1], node_feats[1]]]
    v = torch.randn(4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def gradients(*inputs):
        out = _atomic_basis_kernels.AtomicBasisMessages.apply(inputs[0], senders, receivers, 4, *inputs[1:])
        return torch.autograd.grad(out, inputs, v, create_graph=True)

    assert torch.autograd.gradgradcheck(gradients, inputs)


def test_sum_parts_is_the_adjoint_of_spread_over_rows():
    """<spread(w), r> = <w, sum_parts(r)> for any w, r; and each part's rows summed, into ``out`` too."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    r = torch.randn(5, 9, 4, generator=g, dtype=torch.float64)
    summed = _message_kernels.sum_parts(r, TENSORNET_PARTS)
    for k, (a, b) in enumerate(TENSORNET_PARTS):
        torch.testing.assert_close(summed[:, k], r[:, a:b].sum(1), atol=1e-14, rtol=0)
    spread = _message_kernels.spread_over_rows(w, TENSORNET_PARTS)
    torch.testing.assert_close((spread * r).sum(), (w * summed).sum(), atol=1e-12, rtol=0)
    out = torch.full((5, 3, 4), float("nan"), dtype=torch.float64)
    assert _message_kernels.sum_parts(r, TENSORNET_PARTS, out=out) is out
    torch.testing.assert_close(out, summed, atol=0, rtol=0)


def test_workspace_is_reused_grown_and_kept_per_dtype():
    """``workspace``: the same memory for the same name and dtype from call to call (a view of
    the requested shape), a larger buffer when more is asked for, a separate one per dtype, and
    normal tensors even when first made under ``torch.inference_mode``."""
    like = torch.zeros(1, dtype=torch.float64)
    with torch.inference_mode():
        first = _message_kernels.workspace("test_slot", (2, 3), like)
    assert first.shape == (2, 3) and not first.is_inference()
    again = _message_kernels.workspace("test_slot", (3, 2), like)
    assert again.data_ptr() == first.data_ptr() and again.shape == (3, 2)
    other = _message_kernels.workspace("test_slot", (2, 3), like.float())
    assert other.dtype == torch.float32 and other.data_ptr() != first.data_ptr()
    grown = _message_kernels.workspace("test_slot", (100,), like)
    assert grown.numel() == 100 and _message_kernels.workspace("test_slot", (6,), like).data_ptr() == grown.data_ptr()
