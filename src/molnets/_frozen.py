"""What depends on frozen weights alone, kept from call to call.

A calculator runs a model with frozen parameters (``requires_grad`` False): tensors built from
the weights alone (ACE's weights folded into the coupling, an equivariant linear map as one
block matrix) are then the same at every step, and rebuilding them is a fixed cost per call that
dominates on small molecules. ``frozen_cached`` keeps such a tensor in a module's dict and
rebuilds it when any weight changes: in place (its version counter), by a new storage
(``load_state_dict`` into a new tensor, a device move) or a dtype cast. Never under
``torch.compile`` or ``torch.export`` (there the tensor is built in the traced graph), never
while a weight needs a gradient (training).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["frozen_cached"]


def frozen_cached(cache: Dict[str, Tuple[tuple, Tensor]], name: str, weights: Sequence[Tensor],
                  build: Callable[[], Tensor]) -> Tensor:
    """``build()``, kept in ``cache[name]`` while ``weights`` are frozen and unchanged (module docstring)."""
    if (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or any(w.requires_grad for w in weights)):
        return build()
    key = tuple((w._version, w.data_ptr(), w.dtype, w.device) for w in weights)
    cached = cache.get(name)
    if cached is None or cached[0] != key:
        cached = cache[name] = (key, build())
    return cached[1]
