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
    energy_curve.append(float(o["energy"][0]))
    force_curve.append(float(o["forces"][0, 0]))
    force_back.append(float((o["forces"] @ Rz)[0, 0]))
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
