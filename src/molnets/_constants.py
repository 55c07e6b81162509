"""Constant float buffers that stay exact when a module is cast to float64 after it was built.

A model built under the default float32 dtype and then cast with ``.double()`` (or
``.to(torch.float64)``) must compute in full float64 precision: a coupling tensor (Clebsch-Gordan,
ACE U) or radial frequency stored in float32 and cast up keeps its float32 rounding (~1e-8
relative) and breaks float64 equivariance tests. So each such constant is computed in float64,
registered as a buffer in the default dtype, and its float64 master copy is kept on the module;
the module's ``_apply`` (which ``.to``/``.double()``/``.float()``/``.cuda()`` go through) rebuilds
the buffer from the master in the buffer's new dtype and device::

    def _apply(self, fn, recurse=True):
        return restore_constants(super()._apply(fn, recurse))

Buffer names and state-dict keys are those of plain ``register_buffer``.
"""

from __future__ import annotations

from typing import Dict, Optional, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["register_constant", "restore_constants", "float64_constant"]

_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


def register_constant(
    module: nn.Module, name: str, value: Tensor, *, persistent: bool = True, dtype: Optional[torch.dtype] = None
) -> None:
    """Register ``value`` (float64) as buffer ``name`` in ``dtype`` (default: the default dtype);
    keep ``value`` as its float64 master."""
    masters: Dict[str, Tensor] = module.__dict__.setdefault("_float64_constants", {})
    masters[name] = value.detach().to(torch.float64, copy=True)
    module.register_buffer(name, value.to(dtype or torch.get_default_dtype()), persistent=persistent)


def restore_constants(module: _ModuleT) -> _ModuleT:
    """Rebuild every constant buffer of ``module`` from its float64 master, in the buffer's dtype."""
    for name, master in module.__dict__.get("_float64_constants", {}).items():
        buffer = module._buffers[name]
        if buffer is not None and buffer.is_floating_point():
            module._buffers[name] = master.to(device=buffer.device, dtype=buffer.dtype, copy=True)
    return module


def float64_constant(module: nn.Module, name: str) -> Tensor:
    """The float64 master of constant buffer ``name`` (on the CPU), e.g. to build another constant."""
    return module.__dict__["_float64_constants"][name]
