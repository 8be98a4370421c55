"""glibc allocator settings: measured by their effect (page faults), in child processes."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

CHILD = """
import resource, torch
from edge_runtime.memory import after_loading, fix_mmap_threshold
assert fix_mmap_threshold()
after_loading()
x = torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    t = torch.empty(3 << 18)  # 3 MiB of fp32: above 1 MiB, below 32 MiB
    t.fill_(1.0)
    del t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(low_memory: bool) -> int:
    env = {**os.environ, "EDGE_RT_LOW_MEMORY": "1" if low_memory else ""}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


def test_training_reuses_the_heap_unless_low_memory_is_asked():
    pages = 50 * (3 << 20) // 4096  # every buffer a fresh zero-filled mapping
    heap, low = faults(False), faults(True)
    assert low > 0.8 * pages, (low, pages)
    assert heap < 0.2 * pages, (heap, pages)
