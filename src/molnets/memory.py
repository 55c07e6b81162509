"""Keep freed memory for reuse: CPU calls without a page fault per page of their temporaries.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves a block above
its mmap threshold (at most 32 MB) with a fresh ``mmap`` and gives it back to the kernel on
``free``; every page of the next such block is then faulted in and zeroed by the kernel on
first touch. Below the threshold blocks come from the heap, but ``free`` gives the top of the
heap back to the kernel as soon as more than the trim threshold (twice the mmap threshold)
lies free there. Both thresholds start at 128 KiB and rise only when the process frees a
mapped block larger than the current one (to its size, at most 32 MiB), so how often a call
faults its memory in again depends on what the process freed before.

Two settings, both process-wide:

- ``keep_heap_between_calls()`` raises the thresholds to glibc's own maxima (32 and 64 MiB)
  the way glibc does it, by allocating and freeing one 32 MiB block: a step's temporaries
  below 32 MiB are then reused by the next step instead of being faulted in again. Small
  molecules, energy + forces (2 threads): SchNet-style aspirin float64 150-260 page faults a
  call before, ~1 after; TensorNet-style aspirin float64 570-670, ~4; MACE-style aspirin
  float32 190-290, ~5 (~2.2 µs of kernel time each). Six processes each way, one after the
  other: the median call 1.13x faster (TensorNet-style) and 1.06x (SchNet-style), the best
  call 0-4%: what an MD run gains, more than a best-of benchmark shows.
  Training steps too (MACE-style and SchNet-style on a batch of 128 atoms of Cu, three
  processes each way: median step ~1.1x). ``MolnetsCalculator`` makes it on the CPU unless told
  not to (``keep_heap=False``), and the ``molnets`` command before any subcommand. Cost: up to
  64 MiB of freed memory stays with the process.
- ``reuse_freed_memory()`` also keeps blocks above 32 MiB in the heap and never trims it: for
  large systems, whose per-edge tensors are hundreds of MB at every call. Measured here,
  TensorNet-style energy + forces on fcc Cu (float32, 2 threads) took 583 µs/atom at 2048
  atoms and 866 µs/atom at 6912 with glibc's defaults, 498 and 520 µs/atom after
  ``reuse_freed_memory()`` (linear in N). Cost: the process keeps its peak memory until it
  exits, as a GPU caching allocator does.

The second for a whole process, set before it starts (any program, the peers in
``benchmarks/`` included)::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 python md.py
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_heap_between_calls", "reuse_freed_memory", "freed_memory_is_reused"]

# mallopt parameters of glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's largest dynamic mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
_MAX_MMAP_THRESHOLD = 32 * 2**20


# set at start by the environment (MALLOC_MMAP_MAX_=0, as in the module docstring), or later by
# reuse_freed_memory()
_reused = os.environ.get("MALLOC_MMAP_MAX_") == "0"


def freed_memory_is_reused() -> bool:
    """Whether this process keeps freed memory for reuse: ``reuse_freed_memory()`` succeeded, or
    the process started with ``MALLOC_MMAP_MAX_=0``. Then no block is a fresh mapping, and what
    molnets does to avoid large fresh blocks (``layers._message_kernels.FrozenFilter``) is skipped."""
    return _reused


def _glibc():
    """The C library, if this is Linux (glibc; elsewhere None)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_heap_between_calls() -> bool:
    """Let glibc keep up to 64 MiB of freed heap for the next call (process-wide, glibc only).

    Allocates and frees one block of just under 32 MiB. glibc serves it with its own mapping
    and, freeing it, raises its dynamic mmap threshold to that size (its maximum) and its trim
    threshold to twice that: from then on blocks under 32 MiB come from the heap, and the heap
    is given back to the kernel only when more than 64 MiB lie free at its top. This is the
    state glibc reaches by itself once a process has freed any block of that size; nothing is
    switched off (a process started with ``MALLOC_*`` thresholds, which fix them, is left as
    it is). What it saves: the page faults of a call's temporaries, which the heap's trimming
    at every call's end otherwise brings back (module docstring: hundreds a call on a small
    molecule; its median call 1.06-1.13x faster). Calling it again does nothing more.

    Returns:
        True where the C library is glibc's (the block was allocated and freed), else False.
    """
    libc = _glibc()
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):  # glibc only
        return False
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    block = libc.malloc(_MAX_MMAP_THRESHOLD - 2 * 4096)  # its chunk, rounded to pages: <= the maximum
    if not block:
        return False
    libc.free(block)
    return True


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
    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global _reused
    _reused = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _reused
