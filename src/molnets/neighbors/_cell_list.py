"""Pure-torch cell list (placeholder until the batched implementation lands)."""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

from ._geometry import System


def cell_list_neighbor_list(system: System, cutoff: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    raise NotImplementedError("the torch cell list is not written yet")
