"""molnets.memory: freed memory is reused without page faults (reuse_freed_memory, keep_heap_between_calls)."""

import subprocess
import sys

import pytest

# The end of each script below: run its step() four times (the heap settles), then print the
# minor page faults of four more.
_COUNT_FAULTS = """
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

# Allocate, touch and free a 64 MB tensor (above glibc's largest mmap threshold, 32 MB) a few
# times, then count the minor page faults of four more rounds (the heap settles in the first).
_SCRIPT = """
import resource, sys, torch
import molnets.memory
if sys.argv[1] == "reuse":
    assert molnets.memory.reuse_freed_memory()
def step():
    x = torch.ones(16 * 2**20)  # 64 MB of float32
    del x
""" + _COUNT_FAULTS

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


# Blocks under the mmap threshold (raised to 1 MiB by freeing a 1 MiB block first) come from
# the heap; 16 of 512 KiB freed together leave 8 MiB free at the heap's top, above the trim
# threshold (2 MiB), so glibc gives them back and the next step faults them in again. malloc
# and free directly, and memory.py loaded alone: importing torch frees blocks of its own, which
# leaves the thresholds at sizes that differ from run to run.
_HEAP_SCRIPT = """
import ctypes, importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("memory", sys.argv[2])
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(2**20))
if sys.argv[1] == "keep":
    assert memory.keep_heap_between_calls()
def step():
    blocks = [libc.malloc(2**19) for _ in range(16)]
    for block in blocks:
        ctypes.memset(block, 1, 2**19)
    for block in blocks:
        libc.free(block)
""" + _COUNT_FAULTS

HEAP_PAGES = 16 * 2**19 // 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what this changes")
def test_kept_heap_is_not_trimmed_between_calls():
    import molnets.memory

    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT, mode, molnets.memory.__file__],
                              capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    assert faults("default") > 3 * HEAP_PAGES   # trimmed at every step: its pages faulted in again
    assert faults("keep") < HEAP_PAGES // 8     # kept: the same pages again


@pytest.mark.parametrize("keep_heap", [True, False])
def test_calculator_keeps_the_heap_on_the_cpu_unless_told_not_to(monkeypatch, keep_heap):
    import molnets.calculator
    from molnets import MolnetsCalculator, SchNet, SchNetConfig

    made = []
    monkeypatch.setattr(molnets.calculator, "keep_heap_between_calls", lambda: made.append(1) or True)
    MolnetsCalculator(SchNet(SchNetConfig(species=(1,), num_channels=4, num_layers=1)), device="cpu",
                      keep_heap=keep_heap)
    assert len(made) == int(keep_heap)
