"""Model files: a model saved as plain data (its config, weights, molnets' format version and
conventions) and loaded with ``torch.load(weights_only=True)``: no module is ever pickled, and a
file saved by one version of molnets loads in the next.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Dict, Literal, Optional, Type, Union

import torch
from torch import nn

from .._archive import load_checked

__all__ = ["ModelName", "model_class", "save_model", "load_model", "FORMAT_VERSION", "CONVENTIONS"]

ModelName = Literal["schnet", "tensornet", "mace"]

FORMAT_VERSION = 1
CONVENTIONS = {
    "units": "energy eV, length Å, forces eV/Å, stress eV/Å^3",
    "edge_vector": "r_ij = x[senders] - x[receivers] + shifts @ cell (ASE/vesin 'D')",
    "forward": "per-atom energies [N], eV",
    "stress": "sigma = (1/V) dE/d(eps), symmetric strain, ASE's sign",
}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def model_class(name: ModelName) -> type:
    """The model class saved under ``name`` (the one name -> class switch of molnets)."""
    if name == "schnet":
        from .schnet import SchNet

        return SchNet
    if name == "tensornet":
        from .tensornet import TensorNet

        return TensorNet
    if name == "mace":
        from .mace import MACE

        return MACE
    raise ValueError(f"unknown model {name!r}; known: {typing.get_args(ModelName)}")


def save_model(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Save a model as plain data: {"format", "version", "conventions", "model", "config",
    "dtype", "state_dict"}. The model needs a ``name`` (a ``ModelName``) and a frozen
    dataclass ``config``; no module is pickled, so the file loads with ``weights_only=True``.
    """
    from .base import Potential  # (base imports this module)

    if isinstance(model, Potential):
        model = model.model
    if not dataclasses.is_dataclass(model.config):
        raise TypeError(f"{type(model).__name__}.config must be a dataclass, got {type(model.config)}")
    dtypes = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    dtype = next((k for k, v in _DTYPES.items() if dtypes == {v}), "float32")
    torch.save(
        {
            "format": "molnets",
            "version": FORMAT_VERSION,
            "conventions": dict(CONVENTIONS),
            "model": model.name,
            "config": dataclasses.asdict(model.config),
            "dtype": dtype,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        path,
    )


def load_model(
    path: Union[str, os.PathLike],
    *,
    map_location: Union[str, torch.device] = "cpu",
    model_type: Optional[Type[nn.Module]] = None,
) -> nn.Module:
    """Load a model saved by ``save_model`` (``torch.load(weights_only=True)``, never unpickling code).

    Args:
        path: the file.
        map_location: device to load onto.
        model_type: class to rebuild (e.g. a user's subclass); default ``model_class(name)``.

    Raises:
        ValueError: the file is not a molnets model, is corrupt (unreadable, a checksum of its
            archive that does not match, missing entries), is from a newer format, or its weights
            do not fit the model it names (a subclass's file: pass ``model_type``).
    """
    name = os.fspath(path)
    data = load_checked(name, "molnets model file", map_location)
    if not isinstance(data, dict) or data.get("format") != "molnets":
        raise ValueError(f"{name!r} is not a molnets model file (no 'format': 'molnets')")
    version = data.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{name!r} has format version {version!r}; this molnets reads versions <= "
                         f"{FORMAT_VERSION}: upgrade molnets")
    if version < 1:
        raise ValueError(f"{name!r} has format version {version!r}; versions start at 1: the file is corrupt")
    missing = [key for key in ("model", "config", "state_dict") if key not in data]
    if missing:
        raise ValueError(f"{name!r} is a corrupt molnets model file: it has no {missing}")
    dtype = data.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ValueError(f"{name!r} is a corrupt molnets model file: dtype {dtype!r} is not one of {tuple(_DTYPES)}")
    cls = model_type if model_type is not None else model_class(data["model"])
    model = cls(config_from_dict(cls.config_class, data["config"]))
    model.to(_DTYPES[dtype])
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as error:  # missing, unexpected or mis-shaped weights
        hint = "" if model_type is not None else " (a file saved from a subclass loads with model_type=that class)"
        raise ValueError(f"the weights of {name!r} do not fit {cls.__name__}{hint}: {error}") from error
    return model.to(map_location)


def config_from_dict(config_class: type, data: Dict) -> object:
    """Rebuild a frozen config dataclass from ``asdict`` output (lists become tuples again)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{config_class.__name__} has no fields {unknown}")
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
