"""Files that ``torch.save`` writes, checked as ``torch.load`` reads them (private)."""

from __future__ import annotations

import os
import zipfile
from typing import Any, Union

import torch

__all__ = ["check_archive", "load_checked"]


def check_archive(path: str, what: str) -> None:
    """Raise a ValueError naming ``path`` when it is a zip archive (what ``torch.save`` writes)
    with an entry whose CRC-32 does not match its bytes. ``torch.load`` does not check them: it
    reads such a file without a word, with the flipped bits in the tensors (one flipped bit of a
    model file turned a weight of 0.09 into 1.6e307). ``what`` names the kind of file in the
    message ("molnets model file", "checkpoint"). Reads the file once more (a model's few MB)."""
    if not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return  # missing: torch.load says so; not a zip archive: torch.load refuses it
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise ValueError(f"{path!r} is not a readable {what}: {error}") from error
    if bad is not None:
        raise ValueError(f"{path!r} is a corrupt {what}: the checksum of its entry {bad!r} does not match "
                         "its contents")


def load_checked(path: str, what: str, map_location: Union[str, torch.device]) -> Any:
    """``torch.load(path, weights_only=True)`` after ``check_archive``; any failure to read the
    file but a missing one (a truncated or foreign file, a pickled class) is a ValueError that
    names ``path`` and ``what`` it should be."""
    check_archive(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # truncated or foreign file, unsafe globals
        # (the first line: torch's weights_only refusals go on for a page)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path!r} is not a readable {what}: {first_line}") from error
