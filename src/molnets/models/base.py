"""``Potential``: energy, forces and stress for any per-atom energy model (model files:
``models.serialization``).

This is the only place in molnets where forces and stress are computed (``torch.autograd.grad``
eagerly, ``torch.func.grad`` when traced by ``torch.compile``). A model is any
``nn.Module`` whose ``forward(graph: AtomicGraph) -> Tensor`` returns per-atom energies [N]
in eV; ``Potential`` sums them per structure and differentiates.

Stress convention (the same as ASE's, so that ``MolnetsCalculator`` gives ASE-compatible
stress): a symmetric strain ε deforms positions and cell as x -> x (1 + ε), cell -> cell (1 + ε)
(rows are lattice vectors), and

    σ = (1 / V) ∂E/∂ε |_{ε=0},

the same as ASE's ``calculate_numerical_stress`` ((E(+δ) - E(-δ)) / (2 δ V)). σ > 0 means
the energy rises on expansion, i.e. the structure pulls inwards (tensile stress); the
pressure is -trace(σ) / 3.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..graph import AtomicGraph
from ..layers.scatter import scatter_sum
from .serialization import load_model, save_model

__all__ = ["Potential", "DesignSpace", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of learnable scalars (each shared parameter once), frozen or not: a model's size,
    the same for the calculator's frozen copy as for the model being trained."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class DesignSpace:
    """Where a model stands in the design space of message-passing potentials.

    Fields:
        model: the model's name.
        message_type: what a message carries, e.g. "invariant scalars".
        body_order: body order of one message (2 = pairwise distances).
        num_layers: number of message-passing layers T.
        cutoff: r_c in Å.
        num_parameters: trainable scalars.
    """

    model: str
    message_type: str
    body_order: int
    num_layers: int
    cutoff: float
    num_parameters: int

    @property
    def receptive_field(self) -> float:
        """T * r_c in Å: how far information travels through the graph."""
        return self.num_layers * self.cutoff


class Potential(nn.Module):
    """Energy [B], per-atom energies [N], forces [N, 3] and stress [B, 3, 3] from any energy model.

        E_b = Σ_{i in b} E_i,   F_i = -∂E/∂x_i,   σ_b = (1 / V_b) ∂E_b/∂ε_b

    What is computed is fixed at construction (no per-call flags): ``compute_forces=False``
    is the energy-only mode, which builds no graph for the position derivatives. In training
    mode (``.train()``) the derivatives are built with ``create_graph=True``, so a loss on
    forces or stress can be back-propagated to the parameters (double backward). Forces are
    computed also under a caller's ``torch.no_grad()`` or ``torch.inference_mode()``, and from a
    graph built under the latter. Positions are checked for NaN and infinite values when the
    graph is built (``AtomicGraph.from_positions``), not at every call (that would be a host
    synchronization per call): a graph whose positions are replaced later is not checked again.

    Compiling: ``torch.compile(potential, fullgraph=True, dynamic=True)`` traces energy, forces
    and stress into one graph (when traced, the derivatives are taken by ``torch.func.grad``,
    which the compiler follows; ``autograd.grad`` would end the graph), with the same results
    and, in training mode, the same parameter gradients of a force loss. It is what
    ``MolnetsCalculator(compile=...)`` runs. ``torch.export`` takes the energy model instead
    (``molnets.testing.check_export``): wrap the loaded program in a ``Potential``.

    Args:
        model: module mapping an ``AtomicGraph`` to per-atom energies [N] in eV.
        compute_forces: whether to return forces (eV/Å).
        compute_stress: whether to return stress (eV/Å³); structures with a zero-volume cell
            (molecules) get a zero stress. Needs ``compute_forces``.

    Shapes:
        graph with N atoms, B structures  ->  {"energy": [B], "energies": [N],
        "forces": [N, 3] (if computed), "stress": [B, 3, 3] (if computed)}
    """

    def __init__(self, model: nn.Module, *, compute_forces: bool = True, compute_stress: bool = False) -> None:
        super().__init__()
        if compute_stress and not compute_forces:
            raise ValueError("compute_stress=True needs compute_forces=True")
        self.model = model
        self.compute_forces = bool(compute_forces)
        self.compute_stress = bool(compute_stress)

    def forward(self, graph: AtomicGraph) -> Dict[str, Tensor]:
        _check_model_matches_graph(self.model, graph)
        if not torch.compiler.is_compiling():
            # tensors made under torch.inference_mode() cannot be saved for a backward: copies
            graph = _without_inference_tensors(graph)
        if not self.compute_forces:
            energies = self.model(graph)                                               # [N]
            energy = scatter_sum(energies, graph.batch, dim_size=graph.num_graphs)     # [B]
            return {"energy": energy, "energies": energies}
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            with torch.inference_mode(False):  # forces also under a caller's inference_mode(); again,
                return self.forward(graph)  # as copies made under it are inference tensors too
        with torch.enable_grad():  # forces also under a caller's no_grad()
            return self._forward_with_derivatives(graph)

    def _forward_with_derivatives(self, graph: AtomicGraph) -> Dict[str, Tensor]:
        inputs = [graph.positions]                                                     # [N, 3]
        if self.compute_stress:
            inputs.append(torch.zeros_like(graph.cell))                                # strain [B, 3, 3]
        if torch.compiler.is_compiling():
            # Traced by torch.compile: the derivatives as a functional transform,
            # which the compiler traces into the same graph as the energy (one program for
            # energy, forces and stress; ``autograd.grad`` would break the graph).
            argnums = tuple(range(1, len(inputs) + 1))  # after the graph
            grads, (energy, energies) = torch.func.grad(self._total_energy, argnums, has_aux=True)(graph, *inputs)
            minus_grads = [-g for g in grads]                                          # -∂E/∂x, -∂E/∂ε
        else:
            inputs = [x if x.requires_grad else x.detach().requires_grad_(True) for x in inputs]
            energy, energies = self._energies(graph, *inputs)
            # -Σ_i ∂E_i/∂x from the per-atom energies (weights -1): the forces themselves, and
            # no backward through the sums
            minus_grads = torch.autograd.grad(energies, inputs, torch.full_like(energies, -1.0),
                                              create_graph=self.training)
        out = {"energy": energy, "energies": energies, "forces": minus_grads[0]}
        if self.compute_stress:
            volume = torch.linalg.det(graph.cell).abs()                                # [B]
            # Molecules (zero cell) get zero stress; the where keeps the graph NaN-free.
            safe_volume = torch.where(volume > 0, volume, torch.ones_like(volume))     # [B]
            stress = minus_grads[1] / -safe_volume[:, None, None]                      # [B, 3, 3]
            out["stress"] = torch.where(volume[:, None, None] > 0, stress, torch.zeros_like(stress))
        return out

    def _total_energy(
        self, graph: AtomicGraph, positions: Tensor, strain: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """Σ_b E_b, and (E_b [B], E_i [N]): what ``torch.func.grad`` differentiates."""
        energy, energies = self._energies(graph, positions, strain)
        return energy.sum(), (energy, energies)

    def _energies(
        self, graph: AtomicGraph, positions: Tensor, strain: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """(E_b [B], E_i [N]) at the given positions and (if given) strain."""
        cell = graph.cell
        if strain is not None:
            symmetric = 0.5 * (strain + strain.transpose(-2, -1))                      # [B, 3, 3]
            deformation = torch.eye(3, dtype=cell.dtype, device=cell.device) + symmetric  # [B, 3, 3]
            positions = torch.einsum("nx,nxy->ny", positions, deformation[graph.batch])  # [N, 3]
            cell = torch.einsum("bax,bxy->bay", cell, deformation)                     # [B, 3, 3]
        energies = self.model(graph._replace(positions=positions, cell=cell))          # [N]
        energy = scatter_sum(energies, graph.batch, dim_size=graph.num_graphs)         # [B]
        return energy, energies

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Save the wrapped model (see ``save_model``)."""
        save_model(self.model, path)

    @classmethod
    def load(
        cls,
        path: Union[str, os.PathLike],
        *,
        compute_forces: bool = True,
        compute_stress: bool = False,
        map_location: Union[str, torch.device] = "cpu",
        model_type: Optional[type] = None,
    ) -> "Potential":
        """A ``Potential`` around the model of ``path`` (see ``load_model``)."""
        model = load_model(path, map_location=map_location, model_type=model_type)
        return cls(model, compute_forces=compute_forces, compute_stress=compute_stress)


def _without_inference_tensors(graph: AtomicGraph) -> AtomicGraph:
    """The graph with a normal copy of each tensor made under ``torch.inference_mode()`` (such
    tensors cannot be saved for a backward, so forces could not be taken through them); the
    graph itself when it has none."""
    copies = {name: t.clone() for name, t in zip(graph._fields, graph) if t.is_inference()}
    return graph._replace(**copies) if copies else graph


def _check_model_matches_graph(model: nn.Module, graph: AtomicGraph) -> None:
    """Raise a ValueError naming the mismatch when the model's floating-point parameters and the
    graph's positions differ in dtype or device (instead of an error from deep inside a layer)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    positions = graph.positions
    if param is not None and param.dtype != positions.dtype:
        raise ValueError(f"the graph's positions are {positions.dtype} but the model's parameters are "
                         f"{param.dtype}: convert one of them (graph.to(dtype=...) or model.to(...))")
    if param is not None and param.device != positions.device:
        raise ValueError(f"the graph is on {positions.device} but the model is on {param.device}: move one "
                         "of them (graph.to(device) or model.to(device))")
