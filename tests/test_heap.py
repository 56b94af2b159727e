"""Freed heap memory goes back to the system when a process asks, and start-up's objects are
spared later cyclic collections (service.control.memory).

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
from service.inference import worker

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


FREEZE = """
import gc, json
import service.server  # what an API server has imported when it forks
from service.control.memory import freeze_survivors

frozen = freeze_survivors()
walked = len(gc.get_objects())  # what a full collection walks from now on
a, b = [], []
a.append(b)
b.append(a)  # a reference cycle made after the freeze
del a, b
print(json.dumps({"frozen": frozen, "walked": walked, "collected": gc.collect()}))
"""


def test_freezing_start_up_spares_later_collections_the_imports_but_not_new_garbage() -> None:
    out = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, timeout=120, check=True)
    probe = json.loads(out.stdout)
    assert probe["frozen"] > 100_000, probe  # torch, torchvision, the web stack: for good
    assert probe["walked"] < probe["frozen"] / 20, probe
    assert probe["collected"] >= 2, probe  # the new cycle is still collected


def test_a_worker_freezes_its_imports_before_it_builds_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen reference cycle is never collected: a model frozen at start-up and later swapped out
    would stay resident for good, so the freeze comes before the Engine (and its models) exist."""
    calls: list[str] = []

    class Built(Exception):
        pass

    def engine(*args: object, **kwargs: object) -> None:
        calls.append("engine")
        raise Built

    monkeypatch.setattr(worker, "freeze_survivors", lambda: calls.append("freeze"))
    monkeypatch.setattr(worker, "Engine", engine)
    monkeypatch.setattr(worker.signal, "signal", lambda *args: None)
    threads = worker.torch.get_num_threads()
    config = worker.WorkerConfig(state_dir="", device="cpu", precision="fp32", threads=threads, max_batch_size=4,
                                 batch_timeout_s=0.0, timeout_s=1.0)
    with pytest.raises(Built):
        worker.ClassifierAPI(config).setup("cpu")
    assert calls == ["freeze", "engine"]
