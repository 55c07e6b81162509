"""ASE calculator for any molnets model: energy, free energy, forces, stress, per-atom energies."""

from __future__ import annotations

import copy
import math
import os
from typing import Optional, Sequence, Union

import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress
from torch import nn

from .graph import AtomicGraph
from .memory import keep_heap_between_calls
from .models.base import Potential
from .models.serialization import load_model
from .neighbors import Backend

__all__ = ["MolnetsCalculator"]


class MolnetsCalculator(Calculator):
    """An ``ase.calculators.calculator.Calculator`` around a molnets model.

    Units are ASE's: energy eV, forces eV/Å, stress eV/Å³ in Voigt order (xx, yy, zz, yz,
    xz, xy) with ASE's sign (σ = (1/V) ∂E/∂ε). Stress is given for structures with a periodic
    direction and a non-zero cell volume; asking a molecule for stress raises ASE's
    ``PropertyNotImplementedError``.

    The model, its ``Potential`` wrappers and (if asked) its compiled version are built once
    and reused at every step; only the graph (neighbor list within the model's cutoff) is
    rebuilt for each new geometry. On the CPU it lets glibc keep up to 64 MiB of freed heap
    between steps (``molnets.memory.keep_heap_between_calls``, process-wide, glibc's own state
    after any 32 MiB block is freed): one step's temporaries are reused by the next instead of
    being faulted in again (hundreds of page faults a step on a small molecule; the median step
    1.06-1.13x faster on aspirin). For systems of thousands of atoms, also call
    ``molnets.memory.reuse_freed_memory()`` once first (a process-wide setting this calculator
    does not make on its own): it keeps the cost per atom flat in N.

    Args:
        model_or_path: a per-atom energy model, a ``Potential`` (its model is used) or the
            path of a file written by ``save_model`` / ``Potential.save``. The calculator
            runs its own frozen copy (parameters without gradients, as mace-torch's calculator
            runs its models): the module passed in is not changed, and later changes to it do
            not reach the calculator. Frozen parameters let layers keep what depends on the
            weights alone from step to step (``ace.ProductBasis``).
        device: where the model runs, e.g. "cpu" or "cuda".
        dtype: float dtype of the model and the graph (float64 for MD and finite differences).
        compile: ``torch.compile`` backend (e.g. "inductor"), or None for eager. The
            ``Potential`` is compiled whole: energy, forces and stress are one graph with
            dynamic sizes (compiled once, reused as the neighbor count changes). Compiled code
            skips the element check of the model, so the calculator checks the elements
            itself.
        neighbor_backend: backend of ``molnets.neighbor_list``.
        cutoff: neighbor cutoff in Å, at least the model's ``config.cutoff`` (its default);
            pairs beyond the model's cutoff add nothing.
        keep_heap: on the CPU, call ``molnets.memory.keep_heap_between_calls()`` (default
            True); False leaves the C library's malloc as it is.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        model_or_path: Union[nn.Module, str, os.PathLike],
        *,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float64,
        compile: Optional[str] = None,
        neighbor_backend: Backend = "auto",
        cutoff: Optional[float] = None,
        keep_heap: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if keep_heap and torch.device(device).type == "cpu":
            keep_heap_between_calls()
        if isinstance(model_or_path, Potential):
            model = copy.deepcopy(model_or_path.model)
        elif isinstance(model_or_path, nn.Module):
            model = copy.deepcopy(model_or_path)
        else:
            model = load_model(model_or_path, map_location=device)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.cutoff = float(cutoff if cutoff is not None else model.config.cutoff)
        if not math.isfinite(self.cutoff) or self.cutoff < model.config.cutoff:
            # a smaller neighbor cutoff than the model's drops pairs the model sees: wrong energies
            raise ValueError(f"cutoff {self.cutoff} Å: the neighbor cutoff must be finite and at least the "
                             f"model's ({model.config.cutoff} Å)")
        self.species: Sequence[int] = tuple(model.config.species)
        self.neighbor_backend = neighbor_backend
        self.potential = Potential(self.model).eval()
        self.potential_with_stress = Potential(self.model, compute_stress=True).eval()
        if compile is not None:  # energy, forces (and stress) as one compiled graph each
            self.potential = torch.compile(self.potential, fullgraph=True, dynamic=True, backend=compile)
            self.potential_with_stress = torch.compile(
                self.potential_with_stress, fullgraph=True, dynamic=True, backend=compile
            )

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        unknown = sorted(set(self.atoms.numbers.tolist()) - set(self.species))
        if unknown:
            raise ValueError(f"the model knows the elements Z = {tuple(self.species)}, got unknown Z = {unknown}")
        graph = AtomicGraph.from_ase(
            self.atoms, self.cutoff, backend=self.neighbor_backend, dtype=self.dtype, device=self.device
        )
        periodic = bool(self.atoms.pbc.any()) and abs(self.atoms.cell.volume) > 0
        potential = self.potential_with_stress if periodic else self.potential
        out = potential(graph)
        energy = float(out["energy"].detach().sum())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().cpu().double().numpy(),
            "energies": out["energies"].detach().cpu().double().numpy(),
        }
        if periodic:
            stress = out["stress"][0].detach().cpu().double().numpy()
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
