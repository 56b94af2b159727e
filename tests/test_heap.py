"""Freed heap memory goes back to the system when a process asks (service.control.memory).

Run in a fresh interpreter, so that the heap's state is the test's alone: 100 MiB of blocks
small enough to live on the heap are allocated, touched and freed while one block allocated
after them stays, so glibc cannot give the pages back by shrinking the heap's top; they stay
resident until ``release_freed_memory`` (what an idle worker and an API server after a
checkpoint validation call).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.control.memory import release_freed_memory

PROBE = """
import json
from service.control.memory import release_freed_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

blocks = [bytearray(b"x" * (64 << 10)) for _ in range(1600)]
pinned = bytearray(b"y" * (64 << 10))
del blocks
freed = rss_mib()
released = release_freed_memory()
print(json.dumps({"freed": freed, "released": released, "after": rss_mib()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not release_freed_memory(), reason="glibc only")
def test_freed_heap_memory_leaves_the_process_when_released() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    probe = json.loads(out.stdout)
    assert probe["released"] is True
    assert probe["freed"] - probe["after"] > 60, probe  # 100 MiB freed but resident before, most of it given back
