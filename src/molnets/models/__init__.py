"""Interatomic potentials: per-atom energy models and the ``Potential`` that differentiates them."""

from . import base, serialization
from .base import DesignSpace, Potential, count_parameters
from .serialization import CONVENTIONS, FORMAT_VERSION, ModelName, load_model, model_class, save_model
from .mace import MACE, MACEConfig
from .schnet import SchNet, SchNetConfig
from .tensornet import TensorNet, TensorNetConfig

__all__ = [*base.__all__, *serialization.__all__, "SchNet", "SchNetConfig", "TensorNet", "TensorNetConfig", "MACE", "MACEConfig"]
