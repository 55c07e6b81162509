"""Crash-safe checkpoints: atomic writes and the random-number state of a run.

A file is written to ``<name>.tmp.<pid>`` in the same folder, flushed and fsync'ed, then
moved over ``<name>`` with ``os.replace`` (atomic on POSIX and Windows). A process killed at
any moment (``kill -9`` included) therefore leaves either the previous complete file or the
new complete file, never a truncated one; a stale temporary file is ignored and overwritten
next time.

Checkpoints hold only tensors and plain Python data (no pickled modules or classes), so they
load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from typing import Any, BinaryIO, Callable, Dict, Union

import numpy as np
import torch

from .._archive import load_checked

__all__ = ["atomic_write", "atomic_save", "load_checkpoint", "atomic_write_text", "rng_state", "set_rng_state"]

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a temporary file next to ``path``, fsync, then ``os.replace``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    # Make the rename itself durable (POSIX); not possible on every platform/file system.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically (write a temporary file, fsync, ``os.replace``)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: PathLike) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by ``atomic_save`` (``weights_only=True``).

    Raises:
        ValueError: naming the file, when it is unreadable, not a checkpoint's dict, or corrupt
            (an entry of its archive whose checksum does not match: ``torch.load`` alone would
            read flipped bits into the weights and the optimizer's state).
    """
    path = os.fspath(path)
    state = load_checked(path, "checkpoint", map_location)
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} is not a checkpoint (it holds a {type(state).__name__}, not a dict)")
    return state


def rng_state() -> Dict[str, Any]:
    """The state of Python's, NumPy's, torch's CPU and (if any) CUDA random generators."""
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
         np_state["has_gauss"], np_state["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(value):
    """Tuples to lists recursively (``weights_only`` loads lists and tuples alike)."""
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value
