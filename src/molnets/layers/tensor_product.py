"""Coupling (tensor-product) layers on e3nn irreps features, built on molnets' ``wigner_3j``.

A path (l1, l2 -> l3) of a tensor product couples two irreps with the real Clebsch-Gordan
tensor C (Thomas et al. 2018, arXiv:1802.08219, Eq. 4; Geiger & Smidt 2022, arXiv:2207.09453):

    out_{w k} = alpha_path * sum_{u v} W_{u v w} sum_{i j} C_{i j k} x1_{u i} x2_{v j}

with channel modes "uvu" (channelwise: out channel u = in1 channel u, weights W_{u v}, per
edge in message passing) and "uvw" (fully connected, shared weights W_{u v w}).

How the sparsity of C is used: the channel contraction never sees the (2 l2 + 1) axis. The
second input is first coupled with C once per edge, without channels, into
T_{e, i, (path, v, k)} = alpha_path sum_j C_{i j k} x2_{e v j} (one matmul of x2 with a
block-sparse coupling matrix, for all paths at once); then one batched matmul per input-1
irrep, y_{e u (path, v, k)} = sum_i x1_{e u i} T_{e i (path, v, k)}, does all the work that
involves channels, for all paths of that irrep together. The cost per channel and edge is
sum_paths (2 l1 + 1)(2 l3 + 1) instead of (2 l1 + 1)(2 l2 + 1)(2 l3 + 1), and the whole product
is a handful of large kernels, differentiable twice and free of graph breaks. The weighted
channelwise case (the MACE message) runs through a fused forward/backward
(``_tensor_product_kernel.py``) that this composable code is the reference for.

Path normalisation reproduces e3nn's ``TensorProduct`` (irrep_normalization "component" |
"norm" | "none", path_normalization "element" | "path" | "none", unit input variances), so the
layers equal e3nn's with the same instructions and weights, and weights are laid out like
e3nn's (path after path, each path's block row-major over its shape).
"""

from __future__ import annotations

import math
from typing import List, Literal, NamedTuple, Optional, Sequence, Tuple

import torch
from e3nn import o3
from torch import Tensor, nn

from molnets._constants import register_constant, restore_constants
from molnets.layers._tensor_product_kernel import KernelGroup, KernelPath, WeightedChannelwiseProduct
from molnets.layers.clebsch_gordan import wigner_3j

__all__ = ["ChannelwiseTensorProduct", "FullyConnectedTensorProduct", "uvu_instructions"]

IrrepNormalization = Literal["component", "norm", "none"]
PathNormalization = Literal["element", "path", "none"]


def uvu_instructions(
    irreps_in1: o3.Irreps, irreps_sh: o3.Irreps, irreps_out: o3.Irreps
) -> Tuple[o3.Irreps, List[Tuple[int, int, int, str, bool]]]:
    """MACE-style channelwise instructions: every allowed (ir1 x ir_sh -> ir) with ir in irreps_out.

    Each path gets its own block of ``mul1`` channels in ``irreps_mid``; the blocks are then
    sorted by irrep (as ``Irreps.sort``), as MACE does (Batatia et al. 2022, arXiv:2206.07697,
    Eq. 8, the "one-particle basis" before the channel mixing).

    Args:
        irreps_in1: node-feature irreps, e.g. ``64x0e + 64x1o``.
        irreps_sh: edge spherical-harmonics irreps, e.g. ``1x0e + 1x1o + 1x2e + 1x3o``.
        irreps_out: target irreps; only their (l, p) matter, not the multiplicities.

    Returns:
        (irreps_mid, instructions): the output irreps of the channelwise product and the
        e3nn-style instructions ``(i_in1, i_sh, i_mid, "uvu", True)``.
    """
    irreps_in1, irreps_sh, irreps_out = o3.Irreps(irreps_in1), o3.Irreps(irreps_sh), o3.Irreps(irreps_out)
    mid: List[Tuple[int, o3.Irrep]] = []
    instructions = []
    for i1, (mul, ir1) in enumerate(irreps_in1):
        for i2, (_, ir2) in enumerate(irreps_sh):
            for ir in ir1 * ir2:
                if ir in irreps_out:
                    instructions.append((i1, i2, len(mid), "uvu", True))
                    mid.append((mul, ir))
    irreps_mid, permutation, _ = o3.Irreps(mid).sort()
    instructions = [(i1, i2, permutation[k], mode, w) for i1, i2, k, mode, w in instructions]
    return irreps_mid, instructions


class _Path(NamedTuple):
    i_in1: int
    i_in2: int
    i_out: int
    mul1: int
    mul2: int
    mul_out: int
    dim1: int             # 2 l1 + 1
    dim_out: int          # 2 l3 + 1
    has_weight: bool
    col: int              # first column of this path in its group's T and y: V k columns


class _Group(NamedTuple):
    """The paths that share one input-1 irrep: one batched matmul."""

    i_in1: int
    mul1: int
    dim1: int
    t_start: int          # T of the group: columns t_start .. t_start + dim1 * num_cols of x2 @ coupling
    num_cols: int
    paths: Tuple[int, ...]  # indices into _CouplingPlan.paths


def _normalization(
    irreps_in1: o3.Irreps, irreps_in2: o3.Irreps, irreps_out: o3.Irreps, instructions: Sequence[tuple],
    irrep_normalization: str, path_normalization: str,
) -> List[float]:
    """sqrt(alpha) of every path, the rule of e3nn's TensorProduct with unit input variances."""

    def fan_in(ins: tuple) -> int:
        mul1, mul2 = irreps_in1[ins[0]].mul, irreps_in2[ins[1]].mul
        return mul1 * mul2 if ins[3] == "uvw" else mul2

    coefficients = []
    for ins in instructions:
        ir1, ir2, ir_out = irreps_in1[ins[0]].ir, irreps_in2[ins[1]].ir, irreps_out[ins[2]].ir
        alpha = {"component": ir_out.dim, "norm": ir1.dim * ir2.dim, "none": 1}[irrep_normalization]
        siblings = [other for other in instructions if other[2] == ins[2]]
        if path_normalization == "element":
            x = sum(fan_in(other) for other in siblings)
        elif path_normalization == "path":
            x = fan_in(ins) * len(siblings)
        else:
            x = 1
        if x > 0:
            alpha /= x
        coefficients.append(math.sqrt(alpha * ins[5]))
    return coefficients


class _CouplingPlan(nn.Module):
    """The shared kernel: y_p[e, u, (v, k)] = sum_{i j} x1[e, u, i] alpha_p C_p[i, j, k] x2[e, v, j]."""

    def __init__(
        self, irreps_in1: o3.Irreps, irreps_in2: o3.Irreps, irreps_out: o3.Irreps, instructions: Sequence[tuple],
        irrep_normalization: str, path_normalization: str,
    ) -> None:
        super().__init__()
        instructions = [tuple(ins) + (1.0,) * (6 - len(ins)) for ins in instructions]
        alphas = _normalization(irreps_in1, irreps_in2, irreps_out, instructions, irrep_normalization,
                                path_normalization)
        slices2 = irreps_in2.slices()
        paths, weight_sizes, couplings = [], [], []
        for n, (i1, i2, i_out, mode, has_weight, _) in enumerate(instructions):
            (mul1, ir1), (mul2, ir2), (mul_out, ir_out) = irreps_in1[i1], irreps_in2[i2], irreps_out[i_out]
            if ir1.p * ir2.p != ir_out.p or not abs(ir1.l - ir2.l) <= ir_out.l <= ir1.l + ir2.l:
                raise ValueError(f"path {ir1} x {ir2} -> {ir_out} is not allowed")
            shape = {"uvu": (mul1, mul2), "uvw": (mul1, mul2, mul_out)}[mode]
            weight_sizes.append(math.prod(shape) if has_weight else 0)
            # the block of T = x2 @ coupling for this path: rows are the components of x2
            C = alphas[n] * wigner_3j(ir1.l, ir2.l, ir_out.l, dtype=torch.float64)  # [a, b, k]
            block = torch.zeros(irreps_in2.dim, ir1.dim, mul2, ir_out.dim, dtype=torch.float64)
            for v in range(mul2):
                start = slices2[i2].start + v * ir2.dim
                block[start:start + ir2.dim, :, v, :] = C.permute(1, 0, 2)             # [b, a, k]
            couplings.append(block.reshape(irreps_in2.dim, ir1.dim, mul2 * ir_out.dim))
            paths.append([i1, i2, i_out, mul1, mul2, mul_out, ir1.dim, ir_out.dim, bool(has_weight), 0])

        groups, blocks, t_start = [], [], 0
        for i1 in sorted({path[0] for path in paths}):
            members = [n for n, path in enumerate(paths) if path[0] == i1]
            num_cols = 0
            for n in members:
                paths[n][-1] = num_cols
                num_cols += couplings[n].shape[2]
            dim1 = irreps_in1[i1].ir.dim
            groups.append(_Group(i1, irreps_in1[i1].mul, dim1, t_start, num_cols, tuple(members)))
            # columns (i, path, v, k): T of the group reshapes to [E, a, K]
            blocks.append(torch.cat([couplings[n] for n in members], dim=2).reshape(irreps_in2.dim, -1))
            t_start += dim1 * num_cols
        self.paths: Tuple[_Path, ...] = tuple(_Path(*path) for path in paths)
        self.groups: Tuple[_Group, ...] = tuple(groups)
        self.weight_sizes: List[int] = weight_sizes
        self.weight_numel = sum(weight_sizes)
        self.sizes1: List[int] = [mul * ir.dim for mul, ir in irreps_in1]
        self.t_sizes: List[int] = [g.dim1 * g.num_cols for g in groups]
        # plain ints for forward: Dynamo cannot guard on e3nn's Irreps objects
        self.out_sizes: List[int] = [mul * ir.dim for mul, ir in irreps_out]
        self.dim_out = sum(self.out_sizes)
        # [dim2, sum_g a_g K_g]: alpha C of every path, zero outside its l2 rows
        coupling = torch.cat(blocks, dim=1) if blocks else torch.zeros(irreps_in2.dim, 0, dtype=torch.float64)
        # float64 master copy: casting the module to float64 after building it in float32 must
        # not leave float32-rounded coefficients (see _apply)
        register_constant(self, "coupling", coupling, persistent=False)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        return restore_constants(super()._apply(fn, recurse))

    def forward(self, x1: Tensor, x2: Tensor) -> List[Tensor]:
        """Shapes: x1 [E, dim1], x2 [E, dim2] -> one [E, C, V k] per path, in instruction order."""
        num_edges = x1.shape[0]
        # split (not slicing): its backward is one cat, not one zero-filled tensor per path
        h_all = x1.split(self.sizes1, dim=1)
        t_all = (x2 @ self.coupling).split(self.t_sizes, dim=1)                      # [E, a K] per group
        ys: List[Tensor] = [x1] * len(self.paths)  # placeholders, each replaced below
        for g, t in zip(self.groups, t_all):
            h = h_all[g.i_in1].reshape(num_edges, g.mul1, g.dim1)                    # [E, C, a]
            t = t.reshape(num_edges, g.dim1, g.num_cols)                             # [E, a, K]
            y = torch.bmm(h, t)                                                      # [E, C, K]
            widths = [self.paths[n].mul2 * self.paths[n].dim_out for n in g.paths]
            for n, y_p in zip(g.paths, y.split(widths, dim=2)):
                ys[n] = y_p                                                          # [E, C, V k]
        return ys


def _assemble(out_sizes: List[int], parts: List[List[Tensor]], like: Tensor) -> Tensor:
    """Sum the [E, C_out, k] contributions of each output irrep and lay them out flat, mul_ir order."""
    num_edges = like.shape[0]
    blocks = []
    for size, contributions in zip(out_sizes, parts):
        if contributions:
            total = contributions[0]
            for extra in contributions[1:]:
                total = total + extra
            blocks.append(total.reshape(num_edges, size))                            # [E, C k]
        else:
            blocks.append(like.new_zeros(num_edges, size))
    return torch.cat(blocks, dim=1) if blocks else like.new_zeros(num_edges, 0)     # [E, dim_out]


def _offsets(sizes: Sequence[int]) -> List[int]:
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return starts


def _as_irreps(*irreps: o3.Irreps) -> Tuple[o3.Irreps, ...]:
    return tuple(o3.Irreps(x) for x in irreps)


class ChannelwiseTensorProduct(nn.Module):
    """Channelwise ("uvu") tensor product with per-sample weights, e.g. from a radial network.

        out_{e, p, u, k} = alpha_p sum_v w_{e, p, u, v} sum_{i j} C^{l3 k}_{l1 i, l2 j} x1_{e, u, i} x2_{e, v, j}

    (Thomas et al. 2018, arXiv:1802.08219, Eq. 4; the MACE message of Batatia et al. 2022,
    arXiv:2206.07697, Eq. 8, with x1 = h_j, x2 = Y(r_ji), w = R(r_ji)). Equal to
    ``e3nn.o3.TensorProduct(irreps_in1, irreps_in2, irreps_out, instructions,
    shared_weights=False, internal_weights=False)``, weights included.

    Args:
        irreps_in1: irreps of x1 (node features h).
        irreps_in2: irreps of x2 (edge spherical harmonics Y).
        irreps_out: output irreps (``irreps_mid`` of ``uvu_instructions``).
        instructions: ``(i_in1, i_in2, i_out, "uvu", has_weight[, path_weight])`` tuples.
        irrep_normalization: "component" | "norm" | "none", as e3nn.
        path_normalization: "element" | "path" | "none", as e3nn.

    Shapes:
        x1 [E, irreps_in1.dim], x2 [E, irreps_in2.dim], weight [E, weight_numel]
        -> [E, irreps_out.dim]
    """

    def __init__(
        self, irreps_in1: o3.Irreps, irreps_in2: o3.Irreps, irreps_out: o3.Irreps,
        instructions: Sequence[tuple], *, irrep_normalization: IrrepNormalization = "component",
        path_normalization: PathNormalization = "element",
    ) -> None:
        super().__init__()
        self.irreps_in1, self.irreps_in2, self.irreps_out = _as_irreps(irreps_in1, irreps_in2, irreps_out)
        for ins in instructions:
            if ins[3] != "uvu" or self.irreps_out[ins[2]].mul != self.irreps_in1[ins[0]].mul:
                raise ValueError(f"not a channelwise (uvu) instruction: {ins}")
        self.plan = _CouplingPlan(self.irreps_in1, self.irreps_in2, self.irreps_out, instructions,
                                  irrep_normalization, path_normalization)
        self.weight_numel = self.plan.weight_numel
        # the fused kernel covers the MACE case: weighted paths, one x2 channel, one path per output
        paths = self.plan.paths
        self.fused = (
            all(p.has_weight and p.mul2 == 1 for p in paths)
            and sorted(p.i_out for p in paths) == list(range(len(self.irreps_out)))
        )
        starts1 = _offsets(self.plan.sizes1)
        starts_out = _offsets([mul * ir.dim for mul, ir in self.irreps_out])
        w_starts = _offsets(self.plan.weight_sizes)
        self._kernel_groups = tuple(
            KernelGroup(starts1[g.i_in1], g.mul1, g.dim1, g.t_start, g.num_cols, tuple(
                KernelPath(paths[n].col, paths[n].dim_out, starts_out[paths[n].i_out], w_starts[n]) for n in g.paths
            ))
            for g in self.plan.groups
        )

    def forward(self, x1: Tensor, x2: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        if self.fused:
            t_all = x2 @ self.plan.coupling                                          # [E, sum_p a k]
            return WeightedChannelwiseProduct.apply(x1, t_all, weight, self._kernel_groups, self.plan.dim_out)
        return self._forward_reference(x1, x2, weight)

    def _forward_reference(self, x1: Tensor, x2: Tensor, weight: Optional[Tensor]) -> Tensor:
        num_edges = x1.shape[0]
        ys = self.plan(x1, x2)                                                       # [E, C, V k] per path
        ws = weight.split(self.plan.weight_sizes, dim=1) if weight is not None else [None] * len(ys)
        parts: List[List[Tensor]] = [[] for _ in self.plan.out_sizes]
        for p, y, w in zip(self.plan.paths, ys, ws):
            if not p.has_weight:
                out = y.reshape(num_edges, p.mul1, p.mul2, p.dim_out).sum(2)         # [E, C, k]
            elif p.mul2 == 1:
                out = y * w.unsqueeze(-1)                                            # [E, C, k]
            else:
                out = torch.einsum("ecvk,ecv->eck", y.reshape(num_edges, p.mul1, p.mul2, p.dim_out),
                                   w.reshape(num_edges, p.mul1, p.mul2))            # [E, C, k]
            parts[p.i_out].append(out)
        return _assemble(self.plan.out_sizes, parts, x1)


class FullyConnectedTensorProduct(nn.Module):
    """Fully connected ("uvw") tensor product with learned, shared weights.

        out_{e, w, k} = sum_p alpha_p sum_{u v} W_{p, u v w} sum_{i j} C^{l3 k}_{l1 i, l2 j} x1_{e, u, i} x2_{e, v, j}

    over every allowed path (ir1 x ir2 -> ir_out) (Thomas et al. 2018, arXiv:1802.08219, Eq. 4).
    Equal to ``e3nn.o3.FullyConnectedTensorProduct`` with the same weights; weights start
    as standard normal, like e3nn's.

    Args:
        irreps_in1, irreps_in2: input irreps.
        irreps_out: output irreps.
        irrep_normalization: "component" | "norm" | "none", as e3nn.
        path_normalization: "element" | "path" | "none", as e3nn.

    Shapes:
        x1 [E, irreps_in1.dim], x2 [E, irreps_in2.dim] -> [E, irreps_out.dim]; weight [weight_numel]
    """

    def __init__(
        self, irreps_in1: o3.Irreps, irreps_in2: o3.Irreps, irreps_out: o3.Irreps, *,
        irrep_normalization: IrrepNormalization = "component", path_normalization: PathNormalization = "element",
    ) -> None:
        super().__init__()
        self.irreps_in1, self.irreps_in2, self.irreps_out = _as_irreps(irreps_in1, irreps_in2, irreps_out)
        instructions = [
            (i1, i2, i_out, "uvw", True)
            for i1, (_, ir1) in enumerate(self.irreps_in1)
            for i2, (_, ir2) in enumerate(self.irreps_in2)
            for i_out, (_, ir_out) in enumerate(self.irreps_out)
            if ir_out in ir1 * ir2
        ]
        self.instructions = instructions
        self.plan = _CouplingPlan(self.irreps_in1, self.irreps_in2, self.irreps_out, instructions,
                                  irrep_normalization, path_normalization)
        self.weight_numel = self.plan.weight_numel
        self.weight = nn.Parameter(torch.randn(self.weight_numel))

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        num_edges = x1.shape[0]
        ys = self.plan(x1, x2)                                                       # [E, C, V k] per path
        ws = self.weight.split(self.plan.weight_sizes)
        parts: List[List[Tensor]] = [[] for _ in self.plan.out_sizes]
        for p, y, w in zip(self.plan.paths, ys, ws):
            y = y.reshape(num_edges, p.mul1, p.mul2, p.dim_out)                      # [E, C, V, k]
            w = w.reshape(p.mul1, p.mul2, p.mul_out)                                 # [C, V, D]
            parts[p.i_out].append(torch.einsum("ecvk,cvd->edk", y, w))               # [E, D, k]
        return _assemble(self.plan.out_sizes, parts, x1)
