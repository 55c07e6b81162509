"""The ACE atomic basis A on the pairs of a symmetric neighbor list, radial weights folded first.

The same function and the same parameters as ``molnets.ace.AtomicBasis`` (its reference,
which it wraps), computed with less work:

    A_{i,k l3 m3} = (1/n̄) Σ_{j∈N(i)} Σ_{paths (l1 l2 l3)} R_{k,path}(r_ji) Σ_{m1 m2} C^{l3 m3}_{l1 m1, l2 m2} Y_{l1}^{m1}(r̂_ji) (W h_j)_{k, l2 m2}

(Drautz 2019, Eq. 22; Batatia et al. 2022 "MACE", Eqs. 8-9).

- The radial MLP R depends on |r_ij| only: it runs once per pair {i, j} (half the edges), the
  dominant dense-layer cost; both directions of the pair read the same row.
- R is folded into the node features first, X_{k,(path, m2)} = R_{k,path} (W h_j)_{k, l2 m2}
  (Σ_paths (2 l2 + 1) numbers per channel, 22 for 0e+1o features and lmax 3), then one batched
  product with K_{(path, m2), l3 m3} = Σ_{m1} C Y_{l1}^{m1} (computed without channels) sums all
  paths into A: no [E, C, Q] intermediate, no gathers, no dense path-summing product.
- On the CPU in eager mode, X, the per-edge messages and their gradients are built chunk by chunk
  of pairs in reused buffers (``_atomic_basis_kernels.AtomicBasisMessages``, tested equal to
  ``atomic_basis_messages``): no [E, M, C] tensor in memory. With frozen weights
  (``_atomic_basis_kernels.FrozenAtomicBasis``, also on a molecule whose messages fit in one chunk,
  from 512 KiB of them on: ``FROZEN_KERNEL_BYTES``) K and the radial weights of each input irrep
  are formed chunk by chunk too, and their gradients go straight to Y and R: no [E, M, rows] or
  [P, n_b, C] tensor either.
"""

from __future__ import annotations

import copy
from typing import List

import torch
from e3nn import o3
from torch import Tensor, nn

from molnets._ace_coupling import irreps_slices
from molnets._constants import float64_constant, register_constant, restore_constants
from molnets._frozen import frozen_cached, parameters_of
from molnets.ace import AtomicBasis
from molnets.layers._atomic_basis_kernels import FrozenAtomicBasis, atomic_basis, frozen_atomic_basis_applies
from molnets.layers.mlp import radial_filter

__all__ = ["PairAtomicBasis"]


class PairAtomicBasis(nn.Module):
    """``AtomicBasis`` with the radial MLP on pairs and one batched coupling (same output).

    Edge convention: edges k and k + P are the two directions of pair k (E = 2P), so
    ``edge_radial`` has one row per pair.

    Args:
        reference: the ``AtomicBasis`` whose parameters (``channel_weights``, ``radial_weights``)
            and coupling coefficients are used; it stays the test oracle.

    Shapes:
        h [N, irreps_in.dim], edge_sh [E, irreps_sh.dim], edge_radial [P, K], senders [E],
        receivers [E]  ->  A [N, C, M]
    """

    def __init__(self, reference: AtomicBasis) -> None:
        super().__init__()
        self.basis = reference
        self.irreps_in, self.irreps_out = reference.irreps_in, reference.irreps_out
        irreps_A = o3.Irreps([(1, ir) for _, ir in reference.irreps_out])
        h_slices = irreps_slices(o3.Irreps([(1, ir) for _, ir in reference.irreps_in]))
        A_slices = irreps_slices(irreps_A)
        # the reference's paths, in its order: (index of the h irrep, T columns, A components)
        paths = []
        col = 0
        for o0, o1, ir3 in A_slices:
            for _, _, ir1 in irreps_slices(reference.irreps_sh):
                for b, (_, _, ir2) in enumerate(h_slices):
                    if ir3 in ir1 * ir2:
                        paths.append((b, col, col + ir3.dim, o0, o1))
                        col += ir3.dim
        assert len(paths) == reference.num_paths and col == reference.cg.shape[2]
        # rows r = (path, m2), grouped by the h irrep: its paths [n_b] and coupling [M_sh, M rows]
        cg = float64_constant(reference, "cg")  # [M_sh, M_h, Q], exact even if reference.cg is float32
        groups, rows = [], []
        for b, (b0, b1, _) in enumerate(h_slices):
            group = [p for p, path in enumerate(paths) if path[0] == b]
            groups.append(torch.tensor(group))  # [n_b]
            for p in group:
                _, c0, c1, o0, o1 = paths[p]
                for m2 in range(b0, b1):
                    row = torch.zeros(cg.shape[0], irreps_A.dim, dtype=torch.float64)
                    row[:, o0:o1] = cg[:, m2, c0:c1]
                    rows.append(row)
        dtype = reference.cg.dtype
        self.num_h_irreps = len(h_slices)
        for b, group in enumerate(groups):
            self.register_buffer(f"paths_of{b}", group, persistent=False)  # [n_b]
        # the radial MLP's outputs (channel k, path) in the order (path grouped by h irrep, k)
        self.path_counts = [len(group) for group in groups]  # n_b
        C, num_paths = reference.num_channels, reference.num_paths
        order = [k * num_paths + int(p) for p in torch.cat(groups) for k in range(C)]
        self.register_buffer("outputs_by_path", torch.tensor(order), persistent=False)  # [C paths]
        self._frozen: dict = {}
        coupling = torch.stack(rows, dim=2).flatten(1)  # [M_sh, M rows]: K_e = Y_e @ coupling is [M, rows]
        register_constant(self, "coupling", coupling, persistent=False, dtype=dtype)  # [M_sh, M rows]
        self.num_components, self.num_rows = irreps_A.dim, len(rows)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        return restore_constants(super()._apply(fn, recurse))

    def paths_of(self) -> List[Tensor]:
        """The paths from each input irrep b, [n_b] (long) each, in the order of X's rows."""
        return [getattr(self, f"paths_of{b}") for b in range(self.num_h_irreps)]

    def forward(self, h: Tensor, edge_sh: Tensor, edge_radial: Tensor, senders: Tensor, receivers: Tensor) -> Tensor:
        # Channels last inside (contiguous for the elementwise products), [N, C, M] outside.
        basis = self.basis
        N, P, C = h.shape[0], edge_radial.shape[0], basis.num_channels
        node_feats = []
        for (start, stop, mul, dim), W in zip(basis.in_slices, basis.channel_weights):
            h_b = h[:, start:stop].reshape(N, mul, dim).transpose(1, 2).reshape(N * dim, mul)   # [N d, u]
            node_feats.append((h_b @ W).view(N, dim, W.shape[1]))  # [N, 2 l2 + 1, C]: Σ_u h_{n u b} W_{u c}
        if frozen_atomic_basis_applies(self, h, P, self.num_components, self.num_rows, C):
            R = radial_filter(self._network_by_path(), edge_radial).view(P, basis.num_paths, C)  # [P, paths, C]
            A = FrozenAtomicBasis.apply(edge_sh, R, senders, receivers, self, *node_feats)  # [N, M, C]
        else:
            R = radial_filter(basis.radial_weights, edge_radial).view(P, C, basis.num_paths).transpose(1, 2)
            radial = [_select_paths(R, paths) for paths in self.paths_of()]              # [P, n_b, C] per irrep
            A = self._messages(edge_sh, radial, node_feats, senders, receivers)          # [N, M, C]
        return A.transpose(1, 2) * basis.inv_avg_num_neighbors  # [N, C, M]

    def _messages(self, edge_sh: Tensor, radial: List[Tensor], node_feats: List[Tensor], senders: Tensor,
                  receivers: Tensor) -> Tensor:
        """Σ_j K_e X_e in differentiable operations (``_atomic_basis_kernels.atomic_basis``), from Y
        [E, M_sh], the radial weights of each input irrep R_b [P, n_b, C] and its node features
        Wh_b [N, d_b, C]. -> [N, M, C]"""
        K = (edge_sh @ self.coupling).view(edge_sh.shape[0], self.num_components, self.num_rows)  # [E, M, rows]: C · Y
        return atomic_basis(K, senders, receivers, node_feats[0].shape[0], radial, node_feats)

    def _network_by_path(self) -> nn.Module:
        """The radial MLP with its last layer's outputs in the order (path grouped by input irrep,
        channel), so that its output is R [P, paths, C] with each irrep's paths one slice: what
        ``FrozenAtomicBasis`` reads, without a transposing copy. A copy with the last layer's
        rows permuted, kept while the weights are frozen and unchanged (``molnets._frozen``)."""
        network = self.basis.radial_weights

        def build() -> nn.Module:
            twin = copy.deepcopy(network).requires_grad_(False)
            last = [m for m in twin.modules() if type(m) is nn.Linear][-1]
            last.weight.copy_(last.weight[self.outputs_by_path])
            if last.bias is not None:
                last.bias.copy_(last.bias[self.outputs_by_path])
            return twin

        return frozen_cached(self._frozen, "network_by_path", parameters_of(network), build)


def _select_paths(R: Tensor, paths: Tensor) -> Tensor:
    """R[:, paths]: an index_select eagerly; compiled, a product with a one-hot matrix, whose
    backward is a product too (the index_select's would be an index_add, which the compiler
    turns into atomic adds on the CPU).

    Shapes:
        R [P, paths, C], paths [n]  ->  [P, n, C]
    """
    if torch.compiler.is_compiling():
        one_hot = torch.nn.functional.one_hot(paths, R.shape[1]).to(R.dtype)          # [n, paths]
        return torch.einsum("nk,pkc->pnc", one_hot, R)                                  # [P, n, C]
    return R.index_select(1, paths)
