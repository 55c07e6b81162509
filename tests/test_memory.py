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


_FLAG_SCRIPT = """
import sys, torch
import molnets.memory
from molnets.layers import _message_kernels
from molnets.layers.mlp import MLP
before = molnets.memory.freed_memory_is_reused()
net = MLP([4, 8]).requires_grad_(False)
_message_kernels.FRESH_MAPPING_BYTES = 0  # any size would take the chunked filter kernel
runs_before = _message_kernels.filter_kernel_applies(net, torch.zeros(10, 4))
if sys.argv[1] == "call":
    assert molnets.memory.reuse_freed_memory()
print(before, runs_before, molnets.memory.freed_memory_is_reused(), _message_kernels.filter_kernel_applies(net, torch.zeros(10, 4)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what this changes")
@pytest.mark.parametrize("how", ["call", "environment"])
def test_reused_freed_memory_is_known_and_turns_off_the_chunked_filter(how):
    """freed_memory_is_reused() follows reuse_freed_memory() and a start with MALLOC_MMAP_MAX_=0;
    then the chunked filter kernel (which only avoids fresh blocks) does not run."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_MAX_"}
    if how == "environment":
        env["MALLOC_MMAP_MAX_"] = "0"
    done = subprocess.run([sys.executable, "-c", _FLAG_SCRIPT, how], capture_output=True, text=True, check=True,
                          env=env)
    before, runs_before, after, runs_after = done.stdout.split()
    assert (before, runs_before) == (("True", "False") if how == "environment" else ("False", "True"))
    assert (after, runs_after) == ("True", "False")
