"""What depends on frozen weights alone, kept from call to call.

A calculator runs a model with frozen parameters (``requires_grad`` False): tensors built from
the weights alone (ACE's weights folded into the coupling, an equivariant linear map as one
block matrix) are then the same at every step, and rebuilding them is a fixed cost per call that
dominates on small molecules. ``frozen_cached`` keeps such a tensor in a module's dict and
rebuilds it when any weight changes: in place (its version counter), by a new storage
(``load_state_dict`` into a new tensor, a device move, ``p.data = new``) or a dtype cast. An
in-place write through ``p.data`` (``p.data.copy_(q)``) is not seen: ``.data`` is a tensor with a
version counter of its own, and comparing the weights' values at every call would cost more than
the cache saves (README, "Changing a frozen model's weights"). Never under
``torch.compile`` or ``torch.export`` (there the tensor is built in the traced graph), never
while a weight needs a gradient (training).

Frozen weights also allow a layer (or a whole small model) to run as one autograd node whose
backward gives the gradients of its geometric inputs only (``models._tensornet_kernel``,
``models._schnet_kernel``, the MACE-style atomic basis
``layers._atomic_basis_kernels.FrozenAtomicBasis``; on large systems the filter networks,
``layers._message_kernels.FrozenFilter``; the MACE-style product basis as compiled terms,
``_ace_kernel.NativeProductBasis``): ``frozen_kernel_applies`` and ``frozen_on_cpu_eager``
say when such a kernel runs (``parameters_of`` walks the weights they test),
``reference_gradients`` is its backward when a graph of the backward is wanted (through the
layer's differentiable reference).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor

__all__ = ["frozen_cached", "same_values", "traced", "parameters_of", "frozen_on_cpu_eager", "frozen_kernel_applies",
           "reference_gradients"]


Built = TypeVar("Built")


def frozen_cached(cache: Dict[str, Tuple[tuple, Any, Tuple[Tensor, ...]]], name: str, weights: Sequence[Tensor],
                  build: Callable[[], Built], inputs: Sequence[Tensor] = ()) -> Built:
    """``build()``, kept in ``cache[name]`` while ``weights`` are frozen and unchanged (module
    docstring) and ``inputs`` (small tensors an argument of the call gives, not owned by the module,
    e.g. a basis at r = 0) have the values of the cached build's: they are compared by value (a
    fresh tensor may reuse the address of an earlier, different one), so keep them small."""
    if (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or any(w.requires_grad for w in weights) or any(x.requires_grad for x in inputs)):
        return build()
    key = tuple((w._version, w.data_ptr(), w.dtype, w.device) for w in weights)
    cached = cache.get(name)
    if cached is None or cached[0] != key or not same_values(cached[2], inputs):
        # A normal tensor even when the first call runs under torch.inference_mode(): an
        # inference tensor kept here would break every later call that records a graph.
        with torch.inference_mode(False):
            cached = cache[name] = (key, build(), tuple(x.detach().clone() for x in inputs))
    return cached[1]


def same_values(kept: Sequence[Tensor], inputs: Sequence[Tensor]) -> bool:
    """Whether ``inputs`` equal ``kept`` one by one: shape, dtype, device and every value."""
    return len(kept) == len(inputs) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(kept, inputs))


def traced() -> bool:
    """Whether ``torch.compile``, ``torch.export`` or a ``torch.func`` transform is tracing the
    caller: then the plain operations run, and nothing is kept between calls."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch._C._are_functorch_transforms_active())


def parameters_of(module: torch.nn.Module) -> List[Tensor]:
    """Every parameter of ``module`` and its submodules (a shared one may appear twice): what
    ``module.parameters()`` yields, walked without its names and de-duplication, in half the time
    (a model of some 20 modules: 18 instead of 39 µs, a fixed cost of every call that asks whether
    the weights are frozen)."""
    found: List[Tensor] = []
    stack = [module]
    while stack:
        m = stack.pop()
        found += [p for p in m._parameters.values() if p is not None]
        stack += [child for child in m._modules.values() if child is not None]
    return found


def frozen_on_cpu_eager(layer: torch.nn.Module, like: Tensor, constants: Sequence[Tensor] = (),
                        parameters: Optional[Sequence[Tensor]] = None) -> bool:
    """The conditions every frozen-weight kernel shares: eager mode on the CPU (neither
    ``torch.compile``, ``torch.export`` nor a ``torch.func`` transform tracing: they need the
    reference's operations), no weight of ``layer`` and none of ``constants`` (inputs the kernel
    gives no gradient) needs a gradient (``parameters``: ``parameters_of(layer)`` when the caller
    has it already). Flags only."""
    return (like.device.type == "cpu" and not traced()
            and not any(c.requires_grad for c in constants)
            and not any(p.requires_grad for p in (parameters_of(layer) if parameters is None else parameters)))


def frozen_kernel_applies(layer: torch.nn.Module, like: Tensor, num_pairs: int, message_numel: int,
                          constants: Sequence[Tensor] = (), parameters: Optional[Sequence[Tensor]] = None) -> bool:
    """Whether a frozen-layer kernel of a small system (one autograd node with a hand-written
    backward, e.g. ``models._tensornet_kernel``) runs for ``layer``: ``frozen_on_cpu_eager`` and
    the num_pairs messages of message_numel numbers fit in one chunk of
    ``layers._message_kernels`` (above that the chunked kernels of the reference are the fast
    way). Shapes and flags only."""
    from .layers._message_kernels import _chunk_size  # (layers import this module)

    return frozen_on_cpu_eager(layer, like, constants, parameters) and num_pairs <= _chunk_size(message_numel)


def reference_gradients(reference: Callable[..., Tensor], inputs: Sequence[Tensor], needs: Sequence[bool],
                        grad: Tensor, num_args: int) -> Tuple[Optional[Tensor], ...]:
    """A frozen-layer kernel's backward when a graph of it is wanted (double backward): the
    gradients of ``reference(*inputs)`` (the layer's differentiable operations) with respect to
    the ``inputs`` flagged in ``needs``, differentiable; None for the other of the kernel's
    ``num_args`` arguments. The inputs are taken to be the kernel's first arguments, in order: a
    kernel whose differentiable inputs stand elsewhere places the gradients itself.

    The reference runs on fresh views of the inputs: an input can depend on another (node
    features on the radial basis, through earlier layers), and gradients with respect to the
    inputs themselves would then also collect those earlier paths, which the outer backward
    walks again."""
    wanted = [k for k, need in enumerate(needs) if need]
    with torch.enable_grad():
        views = [x.view_as(x) for x in inputs]
        grads = torch.autograd.grad(reference(*views), [views[k] for k in wanted], grad, create_graph=True,
                                    allow_unused=True)
    result: List[Optional[Tensor]] = [None] * num_args
    for k, g in zip(wanted, grads):
        result[k] = g
    return tuple(result)
