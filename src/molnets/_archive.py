"""Files that ``torch.save`` writes, checked before ``torch.load`` reads them (private)."""

from __future__ import annotations

import os
import zipfile

__all__ = ["check_archive"]


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
