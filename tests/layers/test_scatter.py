"""The one scatter (molnets.layers.scatter) against a Python loop."""

from __future__ import annotations

import pytest
import torch

from molnets.layers.scatter import scatter_mean, scatter_sum


def _loop_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    out = torch.zeros((dim_size,) + tuple(src.shape[1:]), dtype=src.dtype)
    for row, bucket in zip(src, index.tolist()):
        out[bucket] += row
    return out


@pytest.mark.parametrize("dim_size", [1, 2, 5])
@pytest.mark.parametrize("feature_shape", [(), (3,), (2, 4)])
def test_scatter_sum_and_mean_equal_a_loop(dim_size, feature_shape):
    """dim_size 1 (one structure) takes the plain-sum path, the others index_add; empty
    buckets are zero, and the gradient of each row is that of its bucket."""
    generator = torch.Generator().manual_seed(dim_size)
    src = torch.randn((7,) + feature_shape, dtype=torch.float64, generator=generator, requires_grad=True)
    index = torch.randint(0, max(dim_size - 1, 1), (7,), generator=generator)  # the last bucket stays empty
    expected = _loop_sum(src.detach(), index, dim_size)
    out = scatter_sum(src, index, dim_size)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), src)
    torch.testing.assert_close(grad, weights[index], rtol=0, atol=0)

    count = torch.bincount(index, minlength=dim_size).clamp(min=1).to(src.dtype)
    mean = scatter_mean(src, index, dim_size)
    torch.testing.assert_close(mean, expected / count.reshape((dim_size,) + (1,) * len(feature_shape)))


def test_compiled_scatter_and_gather_equal_eager():
    """Compiled for the CPU, scatter_sum and gather_rows are scatter_add and gather (ATen
    kernels, not atomic-add loops): the same values, gradients and second derivatives."""
    from molnets.layers.scatter import gather_rows

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    index = torch.tensor([0, 4, 4, 1, 2, 2, 2, 0])

    def loss(x):
        y = scatter_sum(gather_rows(x, index) ** 2, index.flip(0), dim_size=x.shape[0])  # [5, 3, 4]
        return y.square().sum(), y

    def f(x):  # the gradient as Potential takes it when compiled; the second derivative outside
        grad, y = torch.func.grad(loss, has_aux=True)(x)
        return y, grad

    torch._dynamo.reset()
    try:
        compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
        for fn in (f, compiled):
            y, grad = fn(x)
            (second,) = torch.autograd.grad(grad.square().sum(), x)
            if fn is f:
                expected = (y, grad, second)
        for got, ref in zip((y, grad, second), expected):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dim_size", [1, 2, 3])
@pytest.mark.parametrize("bad", [5, -1])
def test_out_of_range_index_raises_in_eager_mode(dim_size, bad):
    """An index outside [0, dim_size) never silently gives a sum; the one-bucket shortcut
    (dim_size = 1) used to return the total. Checked in eager mode on the CPU (documented)."""
    src = torch.tensor([1.0, 2.0])
    with pytest.raises(IndexError):
        scatter_sum(src, torch.tensor([0, bad]), dim_size=dim_size)
    with pytest.raises(IndexError):
        scatter_mean(src, torch.tensor([0, bad]), dim_size=dim_size)


def test_one_bucket_shortcut_compiles_without_a_check():
    """Under torch.compile the dim_size = 1 shortcut reads no index value (no host sync, no
    graph break): an in-range index gives the eager sum."""
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda s, i: scatter_sum(s, i, dim_size=1), fullgraph=True, backend="eager")
        src, index = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0, 0])
        torch.testing.assert_close(compiled(src, index), scatter_sum(src, index, dim_size=1))
    finally:
        torch._dynamo.reset()
