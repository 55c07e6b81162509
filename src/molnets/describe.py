"""Where models stand in the design space of message-passing potentials, as small tables.

Every molnets model has ``design_space() -> DesignSpace``: message type, body order of one
message, number of message-passing layers T, cutoff r_c, receptive field T r_c and number of
parameters (the axes along which Batatia et al., "The design space of E(3)-equivariant
atom-centered interatomic potentials", 2022, line the field up).
"""

from __future__ import annotations

from typing import List, Sequence

from torch import nn

from .models.base import DesignSpace, Potential

__all__ = ["describe", "compare", "design_space_table"]

_COLUMNS = ("model", "message type", "body order", "layers", "cutoff (Å)", "receptive field (Å)", "parameters")


def _design_space(model: nn.Module) -> DesignSpace:
    if isinstance(model, Potential):
        model = model.model
    return model.design_space()


def design_space_table(spaces: Sequence[DesignSpace]) -> str:
    """A markdown table with one row per ``DesignSpace``."""
    rows: List[Sequence[str]] = [
        (
            s.model,
            s.message_type.replace("|", "\\|"),  # a "|" would split the markdown cell
            str(s.body_order),
            str(s.num_layers),
            f"{s.cutoff:g}",
            f"{s.receptive_field:g}",
            f"{s.num_parameters:,}",
        )
        for s in spaces
    ]
    widths = [max(len(c), *(len(r[k]) for r in rows)) for k, c in enumerate(_COLUMNS)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(_COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in rows])


def describe(model: nn.Module, *, print_table: bool = True) -> str:
    """Print (and return) the design-space table of one model or ``Potential``.

    >>> from molnets.models import SchNet, SchNetConfig
    >>> text = describe(SchNet(SchNetConfig(species=(1, 8), num_channels=8, num_basis=4)), print_table=False)
    >>> text.splitlines()[2].split("|")[3].strip()  # body order of a SchNet message
    '2'
    """
    table = design_space_table([_design_space(model)])
    if print_table:
        print(table)
    return table


def compare(models: Sequence[nn.Module], *, print_table: bool = True) -> str:
    """Print (and return) one design-space table with a row per model."""
    table = design_space_table([_design_space(m) for m in models])
    if print_table:
        print(table)
    return table
