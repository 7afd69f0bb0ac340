import subprocess
import sys

import pytest

from prune_cli.core import allocator

# Runs in a child process: mallopt changes the allocator of the whole process.
CHILD = """
import ctypes, ctypes.util, os, resource, sys
from prune_cli.core.allocator import keep_freed_memory
tuned = keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 48 << 20  # a 48 MiB block (above glibc's largest mmap threshold), touched and freed 20 times
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, sum(faults[10:]))
"""


def run_child(env_extra: dict) -> tuple[str, int]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_kept_memory_is_not_faulted_in_again():
    tuned, faults = run_child({})
    assert tuned == "True"
    assert faults < 100  # 10 rounds of 12288 pages each would fault ~123k times if returned to the OS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_a_malloc_tunable_in_the_environment_is_respected():
    tuned, faults = run_child({"MALLOC_ARENA_MAX": "2"})
    assert tuned == "False"
    assert faults > 10 * 12000  # glibc default: a 48 MiB block is mmap-ed and faulted in every time


def test_off_linux_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
