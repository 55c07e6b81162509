"""molnets.memory.reuse_freed_memory: a freed large tensor's pages are reused without faults."""

import subprocess
import sys

import pytest

# Allocate, touch and free a 64 MB tensor (above glibc's largest mmap threshold, 32 MB) a few
# times, then count the minor page faults of four more rounds (the heap settles in the first).
_SCRIPT = """
import resource, sys, torch
import molnets.memory
if sys.argv[1] == "reuse":
    assert molnets.memory.reuse_freed_memory()
def touch():
    x = torch.ones(16 * 2**20)  # 64 MB of float32
    del x
for _ in range(4):
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

PAGES = 64 * 2**20 // 4096


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what this changes")
def test_freed_large_tensor_is_reused_without_page_faults():
    assert _faults("default") > 3 * PAGES        # glibc's default: a fresh mapping, every page faulted
    assert _faults("reuse") < PAGES // 4         # kept in the heap: the same pages again
