# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # From the ACE equation to a trained potential
#
# This tutorial walks through the ideas behind modern molecular networks with molnets itself:
# every number and every figure on this page is computed by the code above it. It runs as a
# plain script (`python tutorial.py`, about a minute on a laptop CPU) and the test suite
# executes it end to end (`tests/test_docs.py`), so it cannot go stale.
#
# 1. invariant and equivariant labels, shown by rotating the input of a model;
# 2. why 3D coordinates matter: two molecules that message passing on bonds cannot separate;
# 3. forces as F = -∇U, by autograd, checked against finite differences;
# 4. the ACE atomic basis A term by term, and the body-ordered product basis B;
# 5. the design space: SchNet-, TensorNet- and MACE-style models side by side;
# 6. normalization, a short training run, a parity plot and molecular dynamics.
#
# Checks are numerical, so the tutorial works in float64 (training in section 6 uses float32,
# as one would on real data).

# %%
import time
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import molnets
from molnets import AtomicGraph, MACE, MACEConfig, Potential, SchNet, SchNetConfig, TensorNet, TensorNetConfig
from molnets.testing import decalin_and_bicyclopentyl, random_graph, random_orthogonal, transform

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Three small models of the three families (tiny widths: this is about symmetry, not accuracy).
species = (1, 6, 8, 29, 79)
schnet = SchNet(SchNetConfig(species=species, cutoff=4.0, num_channels=16, num_basis=16, num_layers=2))
tensornet = TensorNet(TensorNetConfig(species=species, cutoff=4.0, num_channels=8, num_layers=2, num_rbf=8))
mace = MACE(MACEConfig(species=species, cutoff=4.0, num_channels=8, lmax=2, hidden_lmax=1, correlation=3,
                       num_layers=2, num_bessel=6, radial_mlp=(16,), readout_hidden=8))
models = {"SchNet": schnet, "TensorNet": tensornet, "MACE": mace}

# %% [markdown]
# ## 1. Invariant, equivariant and tensor labels
#
# Before choosing an architecture, sort the labels of the task by how they transform when the
# whole system is rotated by R (an orthogonal 3×3 matrix, x → R x):
#
# | label | rank | under a rotation R |
# | --- | --- | --- |
# | energy U, charges, band gap | 0 (scalar) | unchanged: U(R x) = U(x) |
# | forces F, dipole μ | 1 (vector) | rotate: F(R x) = R F(x) |
# | stress σ, polarizability α | 2 (tensor) | rotate on both sides: σ(R x) = R σ(x) Rᵀ |
#
# A molnets model predicts per-atom energies, which are invariant by construction;
# `Potential` differentiates their sum. Forces come out as vectors and stress as a rank-2
# tensor *automatically*: the derivative of an invariant with respect to positions rotates
# with them. Below, a random periodic Cu/Au cell is rotated by a random R and the MACE-style
# model is evaluated on both. A dipole-like vector μ = Σ_i q_i x_i, built from per-atom
# scalars q_i of the model, shows the same rule for a vector label that is not a derivative.

# %%
graph = random_graph(8, cutoff=4.0, species=(29, 79), periodic=True, density=0.06, seed=1)
R = random_orthogonal(seed=3)
rotated = transform(graph, R)
potential = Potential(mace, compute_stress=True)

out, out_rot = potential(graph), potential(rotated)
centre = graph.positions.mean(0)
dipole = (out["energies"][:, None] * (graph.positions - centre)).sum(0)
dipole_rot = (out_rot["energies"][:, None] * (rotated.positions - centre @ R.T)).sum(0)

errors = {
    "energy   |U(Rx) - U(x)|": (out_rot["energy"] - out["energy"]).abs().max(),
    "forces   |F(Rx) - R F(x)|": (out_rot["forces"] - out["forces"] @ R.T).abs().max(),
    "dipole   |μ(Rx) - R μ(x)|": (dipole_rot - R @ dipole).abs().max(),
    "stress   |σ(Rx) - R σ R^T|": (out_rot["stress"][0] - R @ out["stress"][0] @ R.T).abs().max(),
}
naive = {
    "forces if treated as invariant |F(Rx) - F(x)|": (out_rot["forces"] - out["forces"]).abs().max(),
    "stress if treated as invariant |σ(Rx) - σ(x)|": (out_rot["stress"] - out["stress"]).abs().max(),
}
for name, value in {**errors, **naive}.items():
    print(f"{name:48s} {float(value.detach()):.2e}")
assert all(float(v.detach()) < 1e-10 for v in errors.values())
assert all(float(v.detach()) > 1e-4 for v in naive.values())

# %% [markdown]
# The equivariant relations hold to float64 rounding (~1e-15); reading forces or stress as if
# they were invariant is wrong by many orders of magnitude more. The figure shows the same for
# rotations by an angle θ about one axis: the energy is flat, a force component oscillates,
# and R⁻¹ F(R x) is flat again.

# %%
axis_angles = np.linspace(0, 2 * np.pi, 13)
energy_curve, force_curve, force_back = [], [], []
for theta in axis_angles:
    c, s = np.cos(theta), np.sin(theta)
    Rz = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    o = Potential(mace)(transform(graph, Rz))
    energy_curve.append(float(o["energy"][0].detach()))
    force_curve.append(float(o["forces"][0, 0].detach()))
    force_back.append(float((o["forces"] @ Rz)[0, 0].detach()))
fig, ax = plt.subplots(1, 2, figsize=(8, 3))
ax[0].plot(axis_angles, energy_curve, "o-", ms=3)
ax[0].set(xlabel="rotation angle θ about z (rad)", ylabel="energy (eV)", title="invariant")
ax[1].plot(axis_angles, force_curve, "o-", ms=3, label="F_x of atom 0 in the rotated frame")
ax[1].plot(axis_angles, force_back, "s--", ms=3, label="the same, rotated back: (Rᵀ F)_x")
ax[1].set(xlabel="rotation angle θ about z (rad)", ylabel="force (eV/Å)", title="equivariant")
ax[1].legend(fontsize=7)
fig.tight_layout()
fig.savefig("equivariance.png", dpi=100)
plt.close(fig)

# %% [markdown]
# ## 2. Why coordinates matter: decalin and bicyclopentyl
#
# Decalin (two fused six-rings) and bicyclopentyl (two five-rings joined by a bond) are both
# C₁₀H₁₈. On the bond graph every atom of one has a partner of the same element and degree in
# the other: two CH carbons with three carbon neighbours, eight CH₂ carbons, eighteen H.
#
# Message passing on a graph without geometry is at most as powerful as the 1-dimensional
# Weisfeiler-Lehman (1-WL) colour refinement (Xu et al., ICLR 2019; Morris et al., AAAI 2019):
# start from the element as colour, then repeatedly replace each atom's colour by the pair
# (own colour, multiset of neighbour colours). If the two colour histograms agree at every
# round, no such network can map the two molecules to different outputs. Here is 1-WL in a few
# lines, on the bonds found with molnets' own neighbor list (bonds are shorter than 1.6 Å):

# %%
decalin, bicyclopentyl = decalin_and_bicyclopentyl()


def bond_graph(atoms, bond_length=1.6):
    positions = torch.tensor(atoms.positions)
    receivers, senders, _ = molnets.neighbor_list(positions, bond_length)
    neighbours = [[] for _ in range(len(atoms))]
    for i, j in zip(receivers.tolist(), senders.tolist()):
        neighbours[i].append(j)
    return neighbours


def weisfeiler_lehman(atoms, rounds=4):
    """Colour histograms of 1-WL refinement, one per round; colours are nested tuples."""
    neighbours = bond_graph(atoms)
    colours = [int(z) for z in atoms.numbers]
    histograms = [Counter(colours)]
    for _ in range(rounds):
        colours = [(colours[i], tuple(sorted(colours[j] for j in nb))) for i, nb in enumerate(neighbours)]
        histograms.append(Counter(colours))
    return histograms


degrees = {name: Counter((int(z), len(nb)) for z, nb in zip(atoms.numbers, bond_graph(atoms)))
           for name, atoms in [("decalin", decalin), ("bicyclopentyl", bicyclopentyl)]}
print("(element, degree) counts, decalin:      ", sorted(degrees["decalin"].items()))
print("(element, degree) counts, bicyclopentyl:", sorted(degrees["bicyclopentyl"].items()))
wl_decalin, wl_bicyclopentyl = weisfeiler_lehman(decalin), weisfeiler_lehman(bicyclopentyl)
for t, (a, b) in enumerate(zip(wl_decalin, wl_bicyclopentyl)):
    print(f"1-WL round {t}: {len(a)} colours, histograms identical: {a == b}")
assert degrees["decalin"] == degrees["bicyclopentyl"]
assert all(a == b for a, b in zip(wl_decalin, wl_bicyclopentyl))

# %% [markdown]
# 1-WL cannot tell them apart. A molnets model reads the 3D geometry: edges within a cutoff
# (here 4 Å, well beyond the bonds), with distances (SchNet), Cartesian tensors (TensorNet) or
# spherical harmonics (MACE). Each of the three untrained models gives the two isomers
# different energies:

# %%
graphs = {name: AtomicGraph.from_ase(atoms, cutoff=4.0) for name, atoms in
          [("decalin", decalin), ("bicyclopentyl", bicyclopentyl)]}
isomer_energies = {}
for name, model in models.items():
    e = {mol: float(Potential(model, compute_forces=False)(g)["energy"][0]) for mol, g in graphs.items()}
    isomer_energies[name] = e
    print(f"{name:10s} U(decalin) = {e['decalin']:+.6f} eV   U(bicyclopentyl) = {e['bicyclopentyl']:+.6f} eV   "
          f"difference {e['decalin'] - e['bicyclopentyl']:+.2e} eV")
    assert abs(e["decalin"] - e["bicyclopentyl"]) > 1e-6

fig, ax = plt.subplots(1, 2, figsize=(8, 3))
for k, (name, wl) in enumerate([("decalin", wl_decalin), ("bicyclopentyl", wl_bicyclopentyl)]):
    final = sorted(wl[-1].values(), reverse=True)
    ax[0].bar(np.arange(len(final)) + 0.4 * k, final, width=0.4, label=name)
ax[0].set(title="1-WL colour histogram after 4 rounds", xlabel="colour class", ylabel="atoms")
ax[0].legend(fontsize=8)
x = np.arange(len(models))
ax[1].bar(x - 0.2, [isomer_energies[m]["decalin"] for m in models], width=0.4, label="decalin")
ax[1].bar(x + 0.2, [isomer_energies[m]["bicyclopentyl"] for m in models], width=0.4, label="bicyclopentyl")
ax[1].set_xticks(x, list(models))
ax[1].set(title="energies of untrained 3D models", ylabel="U (eV)")
ax[1].legend(fontsize=8)
fig.tight_layout()
fig.savefig("weisfeiler_lehman.png", dpi=100)
plt.close(fig)

# %% [markdown]
# ## 3. Forces are the negative gradient of the energy
#
# A conservative force field is F_i = -∂U/∂x_i. `Potential` obtains it by reverse-mode
# autograd: one backward pass gives all 3N components at the cost of about two energy
# evaluations, and energy is conserved in MD by construction. We check it against central
# finite differences along a random direction d,
#
#     -F·d ≈ (U(x + h d) - U(x - h d)) / 2h,
#
# whose error is O(h²) truncation plus O(ε/h) rounding, smallest around h ≈ ε^(1/3) ≈ 1e-5 Å.

# %%
energy_only = Potential(mace, compute_forces=False)
forces = Potential(mace)(graph)["forces"]
direction = torch.randn_like(graph.positions)
direction = direction / direction.norm()
exact = float(-(forces * direction).sum())


def energy_at(positions):
    return float(energy_only(graph._replace(positions=positions))["energy"][0])


steps = np.logspace(-7, -1, 7)
fd_errors = []
for h in steps:
    fd = (energy_at(graph.positions + h * direction) - energy_at(graph.positions - h * direction)) / (2 * h)
    fd_errors.append(abs(fd - exact))
best = int(np.argmin(fd_errors))
print(f"autograd:           -F·d = {exact:+.12f} eV/Å")
print(f"best central FD:    h = {steps[best]:.0e} Å, error {fd_errors[best]:.1e} eV/Å")
assert fd_errors[best] < 1e-8 * max(1.0, abs(exact))

fig, ax = plt.subplots(figsize=(4.5, 3.2))
ax.loglog(steps, fd_errors, "o-", label="|central FD − autograd|")
ax.loglog(steps, fd_errors[-1] * (steps / steps[-1]) ** 2, "k--", lw=0.8, label="∝ h²")
ax.set(xlabel="step h (Å)", ylabel="error (eV/Å)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("finite_differences.png", dpi=100)
plt.close(fig)

# %% [markdown]
# ## 4. The ACE atomic basis, term by term
#
# The atomic cluster expansion (Drautz, PRB 99, 014104, 2019), in the form MACE uses
# (Batatia et al., NeurIPS 2022), builds for every atom i, channel k and output degree l₃:
#
#     A_{i,k l3 m3} = (1/n̄) Σ_{l1 m1, l2 m2} C^{l3 m3}_{l1 m1, l2 m2} Σ_{j∈N(i)} R_{k l1 l2 l3}(r_ij) Y_{l1}^{m1}(r̂_ij) (W h_j)_{k l2 m2}
#
# * **Y**: real spherical harmonics of the edge direction (`molnets.layers.spherical_harmonics`);
# * **C**: Clebsch-Gordan coefficients coupling l₁ ⊗ l₂ → l₃ (`molnets.layers.wigner_3j`, times
#   √(2l₃+1), divided by √(number of paths into l₃));
# * **R**: a learnable radial function of the distance, one per channel and path (an MLP on a
#   Bessel basis);
# * **W**: a channel mixing of the neighbour's features h_j, one matrix per degree l₂;
# * **h**: the neighbour's equivariant features (here random, as in a second layer);
# * **1/n̄**: the average number of neighbours.
#
# We evaluate `molnets.ace.AtomicBasis` on methanol and then rebuild every term with explicit
# loops over the coupling paths (l₁, l₂, l₃) allowed by the triangle and parity rules.

# %%
from ase.build import molecule
from e3nn import o3

from molnets.ace import AtomicBasis, ProductBasis
from molnets.graph import edge_vectors
from molnets.layers import BesselBasis, PolynomialEnvelope, scatter_sum, spherical_harmonics, wigner_3j

methanol = AtomicGraph.from_ase(molecule("CH3OH"), cutoff=3.0)
N, E = methanol.num_atoms, methanol.num_edges
vectors = edge_vectors(methanol)                                   # [E, 3] r_ij = x_j - x_i
lengths = vectors.norm(dim=1)                                      # [E]
radial = BesselBasis(3.0, 6)(lengths) * PolynomialEnvelope(3.0)(lengths)[:, None]  # [E, K]
Y = spherical_harmonics(vectors, lmax=2)                           # [E, 9]: l = 0, 1, 2

irreps_h, irreps_sh, irreps_A = o3.Irreps("4x0e + 4x1o"), o3.Irreps("0e + 1o + 2e"), o3.Irreps("4x0e + 4x1o + 4x2e")
h = torch.randn(N, irreps_h.dim)                                   # [N, 16]
n_bar = E / N
basis = AtomicBasis(irreps_h, irreps_sh, irreps_A, num_basis=6, avg_num_neighbors=n_bar, radial_hidden=(16,))
A = basis(h, Y, radial, methanol.senders, methanol.receivers)      # [N, C, M] = [6, 4, 9]
print(f"methanol: N = {N} atoms, E = {E} directed edges within 3 Å, n̄ = {n_bar:.2f}; A has shape {tuple(A.shape)}")

# the same A from its terms
C = 4
one = lambda irreps: [ir for _, ir in irreps]                      # the irreps of one channel
start = lambda irreps, k: sum(ir.dim for ir in one(irreps)[:k])    # offset of the k-th irrep
paths = [(a, b, c) for c, ir3 in enumerate(one(irreps_A)) for a, ir1 in enumerate(one(irreps_sh))
         for b, ir2 in enumerate(one(irreps_h)) if ir3 in ir1 * ir2]
R = basis.radial_weights(radial).reshape(E, C, len(paths))         # [E, C, P] R_{k, path}(r_ij)
Wh = [torch.einsum("nub,uc->ncb", h[:, s].reshape(N, 4, ir.dim), W)  # [N, C, 2 l2 + 1]  W h_j
      for s, (_, ir), W in zip(irreps_h.slices(), irreps_h, basis.channel_weights)]
A_by_hand = torch.zeros(N, C, 9)
for p, (a, b, c) in enumerate(paths):
    ir1, ir2, ir3 = one(irreps_sh)[a], one(irreps_h)[b], one(irreps_A)[c]
    fan_in = sum(1 for *_, c2 in paths if c2 == c)
    coupling = wigner_3j(ir1.l, ir2.l, ir3.l) * (ir3.dim / fan_in) ** 0.5   # [2l1+1, 2l2+1, 2l3+1]
    Y_l1 = Y[:, start(irreps_sh, a):start(irreps_sh, a) + ir1.dim]          # [E, 2l1+1]
    term = torch.einsum("abc,ea,ekb,ek->ekc", coupling, Y_l1, Wh[b][methanol.senders], R[:, :, p])  # [E, C, 2l3+1]
    A_path = scatter_sum(term, methanol.receivers, dim_size=N) / n_bar     # [N, C, 2l3+1]
    A_by_hand[:, :, start(irreps_A, c):start(irreps_A, c) + ir3.dim] += A_path
    print(f"path {p}: Y_{ir1.l} ⊗ h_{ir2.l} -> A_{ir3.l}   |contribution| = {float(A_path.norm()):.4f}")
error = float((A_by_hand - A.detach()).abs().max())
print(f"max |A(AtomicBasis) - A(by hand)| = {error:.1e}")
assert error < 1e-12

# %% [markdown]
# ### The product basis B is a polynomial in A
#
# One A is a sum over neighbours: a two-body function of the environment of i. The product
# basis multiplies ν copies of A and couples them back to a given degree L with fixed
# generalized Clebsch-Gordan tensors U^(ν) and learnable weights W^(ν):
#
#     B_{i,k,LM} = Σ_ν Σ_η W^(ν)_{z_i k η} Σ_{l m} U^(ν)_{LM, η, l m} Π_{t=1..ν} A_{i,k,l_t m_t}
#
# The ν-th term is a homogeneous polynomial of degree ν in A, a (ν+1)-body function. So
# scaling A by λ must scale the ν-th term by exactly λ^ν. `ProductBasis.terms` returns the
# terms separately:

# %%
species_index = torch.unique(methanol.atomic_numbers, return_inverse=True)[1]   # [N] 0..S-1
product = ProductBasis(irreps_A, o3.Irreps("4x0e + 4x1o"), correlation=3, num_species=3)
A0 = A.detach()
terms = product.terms(A0, species_index)                              # 3 x [N, 16]
lambdas = np.array([0.25, 0.5, 1.0, 2.0, 4.0])
norms = np.zeros((len(lambdas), 3))
for row, lam in enumerate(lambdas):
    scaled = product.terms(lam * A0, species_index)
    for nu in range(3):
        norms[row, nu] = float(scaled[nu].norm())
        assert torch.allclose(scaled[nu], lam ** (nu + 1) * terms[nu], rtol=1e-10, atol=1e-12)
for nu in range(3):
    slope = np.polyfit(np.log(lambdas), np.log(norms[:, nu]), 1)[0]
    print(f"ν = {nu + 1}: {product.num_couplings[nu]:2d} couplings η, |B_ν(λA)| ∝ λ^{slope:.6f}")
total = product(2 * A0, species_index).norm() / product(A0, species_index).norm()
print(f"the sum B = Σ_ν B_ν is not homogeneous: |B(2A)| / |B(A)| = {float(total):.3f}")

fig, ax = plt.subplots(figsize=(4.5, 3.2))
for nu in range(3):
    ax.loglog(lambdas, norms[:, nu] / norms[2, nu], "o-", label=f"ν = {nu + 1}  (slope {nu + 1})")
ax.set(xlabel="scale λ of A", ylabel="|B_ν(λ A)| / |B_ν(A)|", title="ν-th term of B is degree ν in A")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("ace_homogeneity.png", dpi=100)
plt.close(fig)

# %% [markdown]
# ## 5. The design space
#
# Batatia et al. ("The design space of E(3)-equivariant atom-centered interatomic
# potentials", 2022) place the models of the field along three axes: what a message carries
# (invariant scalars, Cartesian tensors, spherical irreps), the body order of one message,
# and how many message-passing layers there are (the receptive field is layers × cutoff).
# `molnets.compare` reads these from the models; the time per call (energy and forces of a
# 32-atom periodic Cu cell) is measured here.

# %%
from ase.build import bulk

table = molnets.compare(list(models.values()))
copper = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
copper.rattle(0.05, seed=0)
copper_graph = AtomicGraph.from_ase(copper, cutoff=4.0)
print(f"\ntime per call, energy + forces, {len(copper)} atoms, {copper_graph.num_edges} edges (float64, this CPU):")
for name, model in models.items():
    potential = Potential(model)
    potential(copper_graph)  # warm-up
    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        potential(copper_graph)
        seconds.append(time.perf_counter() - t0)
    print(f"  {name:10s} {1000 * min(seconds):7.1f} ms")

# %% [markdown]
# SchNet's messages are scalars of one distance (2-body), so it needs layers to see angles;
# TensorNet's Cartesian rank-2 messages and MACE's product basis carry angular information in
# every layer, and MACE's correlation order ν raises the body order of one layer to ν + 1.
#
# ## 6. Normalization, training and molecular dynamics
#
# The total energies of a quantum-chemistry code are dominated by the atoms themselves: a
# large constant per element, growing with the number of atoms. A network should not spend
# its capacity on them. The physics-based normalization (as in MACE) is:
#
# * **E0**: per-element reference energies, fitted to the composition by least squares
#   (or given, e.g. as isolated-atom energies), subtracted from every total energy;
# * **shift**: the mean remaining energy per atom;
# * **scale**: the RMS force component, so that the network's per-atom output is O(1).
#
# molnets writes them into the model's readout, E_i = scale · e_i + shift + E0[Z_i]
# (`molnets.training.compute_normalization`, `apply_normalization`). The data here are Cu/Au
# alloys sampled by ASE's EMT potential in molecular dynamics
# (`molnets.training.synthetic.emt_dataset`), made in seconds. EMT energies are already
# referenced to the bulk metals, so to see what E0 does we also add DFT-like constants of
# -1500 eV per Cu and -2800 eV per Au, and check that the least-squares fit finds them again.

# %%
import ase.io

from molnets.training import TrainConfig, compute_normalization, structures_from_atoms, train
from molnets.training.synthetic import emt_dataset

frames = emt_dataset(64, repeat=(2, 2, 1), num_trajectories=4, seed=0)
ase.io.write("emt.xyz", frames)
structures = structures_from_atoms(frames)
normalization = compute_normalization(structures, species=(29, 79))
print(f"{len(frames)} structures of {len(frames[0])} atoms, Au fractions",
      sorted({round(float(np.mean(f.numbers == 79)), 3) for f in frames}))
print("EMT data:           E0 =", {z: round(e, 4) for z, e in normalization.atomic_energies.items()},
      f"eV, shift = {normalization.shift:.1e} eV/atom, scale = RMS force = {normalization.scale:.3f} eV/Å")

offsets = {29: -1500.0, 79: -2800.0}
shifted = []
for s in structures:
    atoms = s.atoms.copy()
    atoms.calc = None
    atoms.info["energy"] = s.energy + sum(offsets[int(z)] for z in atoms.numbers)
    atoms.arrays["forces"] = s.forces
    shifted.append(atoms)
shifted = structures_from_atoms(shifted, stress_key=None)
normalization_dft = compute_normalization(shifted, species=(29, 79))
print("with the constants: E0 =", {z: round(e, 4) for z, e in normalization_dft.atomic_energies.items()}, "eV")
for z in (29, 79):
    assert abs(normalization_dft.atomic_energies[z] - normalization.atomic_energies[z] - offsets[z]) < 1e-6
assert abs(normalization_dft.scale - normalization.scale) < 1e-12

per_atom = np.array([s.energy / s.num_atoms for s in shifted])
gold = np.array([np.mean(s.atoms.numbers == 79) for s in shifted])
e0 = normalization_dft.atomic_energies
residual = np.array([(s.energy - sum(e0[int(z)] for z in s.atoms.numbers)) / s.num_atoms - normalization_dft.shift
                     for s in shifted])
print(f"spread of E/N: {per_atom.std():.1f} eV/atom raw, {residual.std():.4f} eV/atom after E0 and shift, "
      f"{residual.std() / normalization_dft.scale:.4f} in units of scale")
fig, ax = plt.subplots(1, 2, figsize=(8, 3))
ax[0].scatter(gold, per_atom, s=8)
ax[0].set(xlabel="Au fraction", ylabel="E / N (eV/atom)", title="total energies (with constants)")
ax[1].hist(residual / normalization_dft.scale, bins=20)
ax[1].set(xlabel="((E - Σ E0) / N - shift) / scale", ylabel="structures", title="what the network learns")
fig.tight_layout()
fig.savefig("normalization.png", dpi=100)
plt.close(fig)

# %% [markdown]
# A short training run (a time budget of 25 s; `molnets train` takes the same options
# from a YAML file). The trainer computes the same normalization from its training split.

# %%
config = TrainConfig(
    train_file="emt.xyz", model="mace", cutoff=4.0, output_dir="run", seed=0, progress=False,
    model_config=dict(num_channels=8, lmax=1, correlation=2, num_layers=1, radial_mlp=(16,), readout_hidden=8),
    batch_size=4, lr=1e-2, max_epochs=150, max_time=25.0, forces_weight=10.0, dtype="float32",
)
t0 = time.perf_counter()
result = train(config)
print(f"{result.epochs_run} epochs in {time.perf_counter() - t0:.0f} s")

# %% [markdown]
# A parity plot on new structures from an independent trajectory:

# %%
trained = result.potential.model.to(torch.float64)
test_frames = emt_dataset(12, repeat=(2, 2, 1), num_trajectories=2, seed=1)
test_graph = AtomicGraph.from_ase(test_frames, cutoff=4.0)
prediction = Potential(trained)(test_graph)
sizes = np.array([len(f) for f in test_frames])
e_ref = np.array([f.get_potential_energy() for f in test_frames]) / sizes
e_pred = prediction["energy"].detach().numpy() / sizes
f_ref = np.concatenate([f.get_forces() for f in test_frames]).ravel()
f_pred = prediction["forces"].detach().numpy().ravel()
energy_mae, forces_mae = np.abs(e_pred - e_ref).mean(), np.abs(f_pred - f_ref).mean()
print(f"test energy MAE {1000 * energy_mae:.1f} meV/atom, forces MAE {1000 * forces_mae:.0f} meV/Å "
      f"(predicting zero forces: {1000 * np.abs(f_ref).mean():.0f} meV/Å)")
assert forces_mae < np.abs(f_ref).mean()

fig, ax = plt.subplots(1, 2, figsize=(8, 3.6))
for axis, ref, pred, label in [(ax[0], e_ref, e_pred, "energy (eV/atom)"), (ax[1], f_ref, f_pred, "force component (eV/Å)")]:
    axis.scatter(ref, pred, s=6, alpha=0.6)
    lo, hi = min(ref.min(), pred.min()), max(ref.max(), pred.max())
    axis.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    axis.set(xlabel=f"EMT {label}", ylabel=f"molnets {label}", title=f"test MAE {np.abs(pred - ref).mean():.3g}")
fig.tight_layout()
fig.savefig("parity.png", dpi=100)
plt.close(fig)

# %% [markdown]
# Finally, the trained model drives NVE molecular dynamics through ASE. Because forces are the
# exact gradient of the energy (section 3), the total energy is conserved up to the
# integrator's O(Δt²) fluctuation.

# %%
from ase import units
from ase.md.verlet import VelocityVerlet

from molnets import MolnetsCalculator
from molnets.training.synthetic import thermalize

atoms = test_frames[0].copy()
atoms.calc = MolnetsCalculator(trained, dtype=torch.float64)
thermalize(atoms, 600.0, np.random.default_rng(0))  # Maxwell-Boltzmann velocities
dynamics = VelocityVerlet(atoms, timestep=2.0 * units.fs)
potential_energy, total_energy = [], []
for _ in range(60):
    dynamics.run(1)
    potential_energy.append(atoms.get_potential_energy())
    total_energy.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
potential_energy, total_energy = np.array(potential_energy), np.array(total_energy)
print(f"NVE, 60 steps of 2 fs: potential energy fluctuates by {np.ptp(potential_energy):.3f} eV, "
      f"total energy by {np.ptp(total_energy):.4f} eV")
assert np.ptp(total_energy) < 0.2 * np.ptp(potential_energy)

fig, ax = plt.subplots(figsize=(5, 3))
time_fs = 2.0 * np.arange(1, len(total_energy) + 1)
ax.plot(time_fs, potential_energy - total_energy[0], label="potential")
ax.plot(time_fs, total_energy - total_energy[0], label="total")
ax.set(xlabel="time (fs)", ylabel="energy - E_total(0) (eV)", title="NVE with MolnetsCalculator")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("md_energy.png", dpi=100)
plt.close(fig)
