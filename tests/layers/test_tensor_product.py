"""Tensor products: equality with e3nn (values and gradients), equivariance, gradcheck, compile."""

import pytest
import torch
from e3nn import o3

from molnets.layers.tensor_product import ChannelwiseTensorProduct, FullyConnectedTensorProduct, uvu_instructions
from molnets.testing import random_orthogonal


pytestmark = pytest.mark.usefixtures("float64_default")  # e3nn constants in float64 (tests/conftest.py)


# (irreps_in1, irreps_in2, instructions or target irreps) for the channelwise product
UVU_CASES = {
    "mace_like": ("4x0e + 3x1o + 2x2e + 2x3o", "0e + 1o + 2e + 3o", "0e + 1o + 2e + 3o"),
    "mixed_parity": ("3x0e + 2x0o + 2x1e + 3x1o + 2x2o", "0e + 1o + 2e", "0e + 0o + 1o + 1e + 2e + 2o"),
    "sh_multiplicity": ("2x0e + 3x1o + 2x2e", "2x0e + 2x1o + 1x2e", "0e + 1o + 2e + 1e"),
}


def _uvu_pair(name, **normalization):
    irreps_in1, irreps_in2, target = UVU_CASES[name]
    irreps_mid, instructions = uvu_instructions(o3.Irreps(irreps_in1), o3.Irreps(irreps_in2), o3.Irreps(target))
    ours = ChannelwiseTensorProduct(irreps_in1, irreps_in2, irreps_mid, instructions, **normalization)
    ref = o3.TensorProduct(irreps_in1, irreps_in2, irreps_mid, instructions, shared_weights=False,
                           internal_weights=False, **normalization)
    return ours, ref


def _inputs(tp, num_edges=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x1 = torch.randn(num_edges, tp.irreps_in1.dim, generator=generator, requires_grad=True)
    x2 = torch.randn(num_edges, tp.irreps_in2.dim, generator=generator, requires_grad=True)
    w = torch.randn(num_edges, tp.weight_numel, generator=generator, requires_grad=True)
    return x1, x2, w


def _assert_equal_with_grads(ours_out, ref_out, inputs):
    assert ours_out.shape == ref_out.shape
    assert (ours_out - ref_out).abs().max() <= 1e-12
    grad = torch.randn_like(ref_out)
    for a, b in zip(torch.autograd.grad(ours_out, inputs, grad), torch.autograd.grad(ref_out, inputs, grad)):
        assert (a - b).abs().max() <= 1e-12


@pytest.mark.parametrize("name", sorted(UVU_CASES))
@pytest.mark.parametrize("fused", [True, False])
def test_channelwise_equals_e3nn(name, fused):
    ours, ref = _uvu_pair(name)
    assert ours.weight_numel == ref.weight_numel
    if fused and not ours.fused:
        assert name == "sh_multiplicity"  # several x2 channels: only the reference formulation applies
        return
    ours.fused = fused
    x1, x2, w = _inputs(ours)
    _assert_equal_with_grads(ours(x1, x2, w), ref(x1, x2, w), (x1, x2, w))


@pytest.mark.parametrize("irrep_normalization", ["component", "norm", "none"])
@pytest.mark.parametrize("path_normalization", ["element", "path", "none"])
def test_channelwise_normalizations_equal_e3nn(irrep_normalization, path_normalization):
    ours, ref = _uvu_pair("mace_like", irrep_normalization=irrep_normalization,
                          path_normalization=path_normalization)
    x1, x2, w = _inputs(ours)
    assert (ours(x1, x2, w) - ref(x1, x2, w)).abs().max() <= 1e-12


def test_channelwise_shared_outputs_unweighted_paths_and_path_weights():
    # two paths into one output irrep, one of them without weights, one output irrep left empty
    irreps_in1, irreps_in2, irreps_out = "2x0e + 2x1o + 2x2e", "0e + 1o", "2x1o + 2x0e + 2x2o"
    instructions = [(0, 1, 0, "uvu", True, 2.0), (1, 0, 0, "uvu", False), (2, 1, 0, "uvu", True), (1, 1, 1, "uvu", True)]
    ours = ChannelwiseTensorProduct(irreps_in1, irreps_in2, irreps_out, instructions)
    ref = o3.TensorProduct(irreps_in1, irreps_in2, irreps_out, instructions, shared_weights=False,
                           internal_weights=False)
    assert not ours.fused and ours.weight_numel == ref.weight_numel
    x1, x2, w = _inputs(ours)
    _assert_equal_with_grads(ours(x1, x2, w), ref(x1, x2, w), (x1, x2, w))


FC_CASES = [
    ("3x0e + 2x1o + 2x2e", "2x0e + 1x1o", "4x0e + 3x1o + 2x2e + 1x1e"),
    ("2x0e + 2x0o + 2x1e + 1x1o + 2x2o", "3x0e + 2x1e + 1x2o", "2x0e + 3x0o + 2x1o + 2x1e + 1x2e + 2x2o + 1x3o"),
    ("4x0e + 2x1o", "3x0e", "5x0e + 3x1o"),  # the species-skip shape of MACE
]


@pytest.mark.parametrize("irreps", FC_CASES)
def test_fully_connected_equals_e3nn(irreps):
    ours = FullyConnectedTensorProduct(*irreps)
    ref = o3.FullyConnectedTensorProduct(*irreps)
    assert ours.weight_numel == ref.weight_numel
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
    x1, x2, _ = _inputs(ours)
    inputs = (x1, x2, ours.weight)
    y_ours, y_ref = ours(x1, x2), ref(x1, x2)
    assert (y_ours - y_ref).abs().max() <= 1e-12
    grad = torch.randn_like(y_ref)
    grads_ours = torch.autograd.grad(y_ours, inputs, grad)
    grads_ref = torch.autograd.grad(y_ref, (x1, x2, ref.weight), grad)
    for a, b in zip(grads_ours, grads_ref):
        assert (a - b).abs().max() <= 1e-12


@pytest.mark.parametrize("normalization", [("norm", "path"), ("none", "element"), ("component", "none")])
def test_fully_connected_normalizations_equal_e3nn(normalization):
    irreps = FC_CASES[1]
    kwargs = dict(irrep_normalization=normalization[0], path_normalization=normalization[1])
    ours, ref = FullyConnectedTensorProduct(*irreps, **kwargs), o3.FullyConnectedTensorProduct(*irreps, **kwargs)
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
    x1, x2, _ = _inputs(ours)
    assert (ours(x1, x2) - ref(x1, x2)).abs().max() <= 1e-12


def _all_layers():
    fused, _ = _uvu_pair("mace_like")
    reference, _ = _uvu_pair("mixed_parity")
    reference.fused = False
    multi, _ = _uvu_pair("sh_multiplicity")
    return {"uvu_fused": fused, "uvu_reference": reference, "uvu_multiplicity": multi,
            "uvw": FullyConnectedTensorProduct(*FC_CASES[1])}


@pytest.mark.parametrize("name", ["uvu_fused", "uvu_reference", "uvu_multiplicity", "uvw"])
@pytest.mark.parametrize("seed", [1, 2])
def test_equivariance_rotation_and_inversion(name, seed):
    tp = _all_layers()[name]
    R = random_orthogonal(seed, inversion=seed % 2 == 0, dtype=torch.float64)  # seed 1: det +1, 2: det -1
    D1, D2, D_out = (irreps.D_from_matrix(R) for irreps in (tp.irreps_in1, tp.irreps_in2, tp.irreps_out))
    x1, x2, w = (x.detach() for x in _inputs(tp, seed=seed))
    args = (w,) if isinstance(tp, ChannelwiseTensorProduct) else ()
    rotated_after = tp(x1, x2, *args) @ D_out.T
    rotated_before = tp(x1 @ D1.T, x2 @ D2.T, *args)
    assert (rotated_after - rotated_before).abs().max() <= 1e-12


@pytest.mark.parametrize("kind", ["uvu_fused", "uvu_reference", "uvu_multiplicity", "uvw"])
def test_gradcheck_and_second_derivatives(kind):
    # small irreps: finite differences cost one forward per input number
    if kind == "uvw":
        tp = FullyConnectedTensorProduct("1x0e + 1x1o", "1x0e + 1x1e", "1x0e + 1x1o + 1x1e + 1x2o")
    else:
        irreps_in2 = "2x0e + 1x1o" if kind == "uvu_multiplicity" else "0e + 1o + 2e"
        irreps_mid, instructions = uvu_instructions(o3.Irreps("2x0e + 1x1o + 1x2e"), o3.Irreps(irreps_in2),
                                                    o3.Irreps("0e + 1o + 2e"))
        tp = ChannelwiseTensorProduct("2x0e + 1x1o + 1x2e", irreps_in2, irreps_mid, instructions)
        assert tp.fused == (kind != "uvu_multiplicity")
        tp.fused = kind == "uvu_fused"
    x1, x2, w = _inputs(tp, num_edges=2)
    inputs = (x1, x2, w) if isinstance(tp, ChannelwiseTensorProduct) else (x1, x2)
    assert torch.autograd.gradcheck(tp, inputs)
    assert torch.autograd.gradgradcheck(tp, inputs)


def test_built_in_float32_then_cast_keeps_exact_coefficients():
    torch.set_default_dtype(torch.float32)
    ours, _ = _uvu_pair("mace_like")
    torch.set_default_dtype(torch.float64)
    _, ref = _uvu_pair("mace_like")
    ours = ours.double()
    x1, x2, w = _inputs(ours)
    assert (ours(x1, x2, w) - ref(x1, x2, w)).abs().max() <= 1e-12


def test_uvu_instructions_by_hand():
    irreps_mid, instructions = uvu_instructions(o3.Irreps("2x0e + 2x1o"), o3.Irreps("0e + 1o"), o3.Irreps("0e + 1o"))
    # paths 0e x 0e -> 0e, 0e x 1o -> 1o, 1o x 0e -> 1o, 1o x 1o -> 0e (1e, 2e not in the target),
    # then sorted by irrep: 0e (path 1), 0e (path 4), 1o (path 2), 1o (path 3)
    assert irreps_mid == o3.Irreps("2x0e + 2x0e + 2x1o + 2x1o")
    assert instructions == [(0, 0, 0, "uvu", True), (0, 1, 2, "uvu", True), (1, 0, 3, "uvu", True),
                            (1, 1, 1, "uvu", True)]


@pytest.mark.parametrize("name", ["uvu_fused", "uvu_reference", "uvw"])
def test_compiles_without_graph_breaks(name):
    tp = _all_layers()[name]
    x1, x2, w = _inputs(tp)
    args = (x1, x2, w) if isinstance(tp, ChannelwiseTensorProduct) else (x1, x2)
    torch._dynamo.reset()
    compiled = torch.compile(tp, fullgraph=True, backend="aot_eager")
    y, y_ref = compiled(*args), tp(*args)
    assert (y - y_ref).abs().max() <= 1e-13
    for a, b in zip(torch.autograd.grad(y.square().sum(), args), torch.autograd.grad(y_ref.square().sum(), args)):
        assert (a - b).abs().max() <= 1e-12


@pytest.mark.parametrize("create_graph", [False, True])
def test_fused_kernel_over_several_edge_chunks_equals_e3nn(monkeypatch, create_graph):
    # chunks of 2 edges over 7 (the last one ragged); create_graph=True takes the differentiable
    # per-path backward, False the chunked one
    from molnets.layers import _tensor_product_kernel

    ours, ref = _uvu_pair("mace_like")
    assert ours.fused
    width = max(g.mul * g.num_cols for g in ours._kernel_groups)
    monkeypatch.setattr(_tensor_product_kernel, "CHUNK_NUMEL", 2 * width // torch.get_num_threads())
    x1, x2, w = _inputs(ours, num_edges=7, seed=3)
    assert _tensor_product_kernel._chunk_size(ours._kernel_groups, x1) == 2
    out, out_ref = ours(x1, x2, w), ref(x1, x2, w)
    assert (out - out_ref).abs().max() <= 1e-12
    grad = torch.randn_like(out_ref)
    ours_grads = torch.autograd.grad(out, (x1, x2, w), grad, create_graph=create_graph)
    for a, b in zip(ours_grads, torch.autograd.grad(out_ref, (x1, x2, w), grad)):
        assert a.requires_grad == create_graph
        assert (a - b).abs().max() <= 1e-12
