"""Keep freed memory for reuse: large CPU systems without a page fault per page per call.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves a block above
its mmap threshold (at most 32 MB) with a fresh ``mmap`` and gives it back to the kernel on
``free``; every page of the next such block is then faulted in and zeroed by the kernel on
first touch. A model on a large system allocates per-edge tensors of hundreds of MB at every
call, so each of them costs one more pass over memory, and the more memory a call holds, the
more each fault costs: measured here, TensorNet-style energy + forces on fcc Cu (float32,
2 threads) took 583 µs/atom at 2048 atoms and 866 µs/atom at 6912 with glibc's defaults,
498 and 520 µs/atom after ``reuse_freed_memory()`` (linear in N). Small molecules do not
change (their blocks stay below the threshold).

The same setting for a whole process, set before it starts (any program, the peers in
``benchmarks/`` included)::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 python md.py
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["reuse_freed_memory", "freed_memory_is_reused"]

# mallopt parameters of glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


# set at start by the environment (MALLOC_MMAP_MAX_=0, as in the module docstring), or later by
# reuse_freed_memory()
_reused = os.environ.get("MALLOC_MMAP_MAX_") == "0"


def freed_memory_is_reused() -> bool:
    """Whether this process keeps freed memory for reuse: ``reuse_freed_memory()`` succeeded, or
    the process started with ``MALLOC_MMAP_MAX_=0``. Then no block is a fresh mapping, and what
    molnets does to avoid large fresh blocks (``layers._message_kernels.FrozenFilter``) is skipped."""
    return _reused


def reuse_freed_memory() -> bool:
    """Make this process keep freed memory in its heap for the next allocation (glibc only).

    Sets glibc's ``mallopt(M_MMAP_MAX, 0)`` (no block of its own mapping, however large) and
    ``mallopt(M_TRIM_THRESHOLD, 2^31 - 1)`` (the heap is not shrunk until 2 GB lie free at its
    top): a freed tensor's pages are reused as they are, with no page faults. The price: the
    process keeps its peak memory until it exits, as a GPU caching allocator does. Process-wide
    and for the rest of the process; call it once, before the first large call (see the module
    docstring for the measured effect and the equivalent environment variables).

    Returns:
        True if set; False where the C library is not glibc (macOS, Windows, musl), which is
        then left as it is.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global _reused
    _reused = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _reused
