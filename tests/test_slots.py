"""The shared serving state: atomic writes, cached reads, the cross-process lock and worker acks."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from models import CheckpointMeta
from service.control.slots import SLOT_NAMES, ModelState, ServingState, SharedState, SlotSpec, WorkerAck, atomic_write
from tests.conftest import CLASSES7

META = CheckpointMeta.for_arch("resnet18", CLASSES7, created_at="2026-01-01T00:00:00Z").to_dict()


def _slot(checkpoint: str = "base.safetensors", *merges: str, version: str = "aaaaaaaaaaaa") -> SlotSpec:
    return SlotSpec(checkpoint=checkpoint, merges=merges, version=version, meta=META, loaded_at="2026-01-02T03:04:05Z")


SHAPES = ModelState(
    stable=_slot("base.safetensors", "head-a.safetensors", version="111111111111"),
    canary=SlotSpec(checkpoint="base.safetensors", merges=("head-a.safetensors", "head-b.safetensors"),
                    version="222222222222", meta=META, loaded_at="t",
                    merge_report={"merged": ["fc.weight", "fc.bias"], "skipped": []}, backbone="bbbbbbbbbbbb"),
    weight=10, shadow=5,
    previous_stable=_slot("old.safetensors", version="000000000000"),
)
FULL = ServingState(
    generation=7, models={"shapes": SHAPES, "glyphs": ModelState(stable=_slot("glyphs.safetensors", version="333333333333"),
                                                                 rollout_error="bad entry")},
    default="shapes", revision="2026-12-01.1", rollout_error="rollout spec not applied: boom",
)


def _weighted(weight: int) -> ServingState:
    return FULL.with_model("shapes", replace(SHAPES, weight=weight))


@pytest.fixture()
def shared(tmp_path: Path) -> SharedState:
    state = SharedState(tmp_path / "state")
    state.create_dirs()
    return state


# --- SlotSpec and ServingState -----------------------------------------------------------------

def test_slot_public_fields() -> None:
    slot = SHAPES.canary
    assert slot is not None
    assert slot.public() == {
        "checkpoint": "base.safetensors", "merges": ["head-a.safetensors", "head-b.safetensors"],
        "version": "222222222222", "arch": "resnet18", "num_classes": 7, "class_names": CLASSES7,
        "loaded_at": "t", "merge_report": {"merged": ["fc.weight", "fc.bias"], "skipped": []}, "backbone": "bbbbbbbbbbbb",
    }


def test_slot_public_without_meta() -> None:
    assert SlotSpec(checkpoint="a.pt").public() == {
        "checkpoint": "a.pt", "merges": [], "version": "", "arch": None, "num_classes": None, "class_names": None,
        "loaded_at": "", "merge_report": None, "backbone": "",
    }


def test_slot_checkpoint_meta() -> None:
    meta = _slot().checkpoint_meta
    assert meta == CheckpointMeta.from_dict(META)
    assert (meta.arch, meta.num_classes, meta.class_names) == ("resnet18", 7, CLASSES7)


def test_state_json_round_trip() -> None:
    text = FULL.to_json()
    assert ServingState.from_dict(json.loads(text)) == FULL
    assert json.loads(text)["models"]["shapes"]["canary"]["merges"] == ["head-a.safetensors", "head-b.safetensors"]


def test_state_json_round_trip_without_optional_slots() -> None:
    state = ServingState(generation=1, models={"m": ModelState(stable=_slot())}, default="m")
    back = ServingState.from_dict(json.loads(state.to_json()))
    assert back == state
    assert back.model().canary is None and back.model().previous_stable is None
    assert back.model("m").stable.merges == ()


def test_state_of_an_earlier_release_reads_as_one_model_named_by_its_metadata() -> None:
    old = {"generation": 4, "stable": asdict(_slot(version="111111111111")), "canary": None, "weight": 0, "shadow": 0,
           "previous_stable": None, "revision": "r1", "rollout_error": "boom"}
    state = ServingState.from_dict(json.loads(json.dumps(old)))
    assert state == ServingState(generation=4, models={"resnet18": ModelState(stable=_slot(version="111111111111"))},
                                 default="resnet18", revision="r1", rollout_error="boom")


def test_slots_and_next() -> None:
    assert SLOT_NAMES == ("stable", "canary")
    assert SHAPES.slots() == {"stable": SHAPES.stable, "canary": SHAPES.canary}
    plain = ModelState(stable=_slot())
    assert plain.slots() == {"stable": plain.stable}
    after = FULL.with_model("shapes", replace(SHAPES, weight=50))
    assert (after.generation, after.model().weight, after.model().shadow, after.model().canary) == (8, 50, 5, SHAPES.canary)
    assert FULL.generation == 7 and FULL.model().weight == 10  # frozen: with_model() makes a new state
    assert list(after.models) == ["shapes", "glyphs"]  # a changed model keeps its place
    assert [(m, slot, spec.version) for m, slot, spec in FULL.served()] == [
        ("shapes", "stable", "111111111111"), ("shapes", "canary", "222222222222"), ("glyphs", "stable", "333333333333")]
    removed = FULL.with_model("glyphs", None)
    assert list(removed.models) == ["shapes"] and removed.generation == 8
    with pytest.raises(KeyError):
        FULL.model("nope")


# --- SharedState read and write ----------------------------------------------------------------

def test_write_then_read(shared: SharedState) -> None:
    assert shared.exists() is False
    shared.write(FULL)
    assert shared.exists() is True
    assert shared.path == shared.root / "state.json"
    assert shared.read() == FULL
    assert json.loads(shared.path.read_text()) == json.loads(FULL.to_json())
    assert sorted(p.name for p in shared.root.iterdir()) == ["blobs", "state.json", "workers"]  # no temp files


def test_second_instance_reads_what_the_first_wrote(shared: SharedState) -> None:
    shared.write(FULL)
    assert SharedState(shared.root).read() == FULL


def test_read_is_cached_until_the_file_changes(shared: SharedState) -> None:
    shared.write(FULL)
    first = shared.read()
    assert shared.read() is first  # no re-parse
    shared.write(FULL.next())
    second = shared.read()
    assert second is not first
    assert second.generation == 8


def test_read_sees_a_same_size_write_with_the_same_mtime(shared: SharedState) -> None:
    # weight 10 -> 20: same size; pin the mtime too, as a coarse clock would in one tick
    shared.write(FULL)
    assert shared.read().model().weight == 10
    mtime = os.stat(shared.path).st_mtime_ns
    size = os.stat(shared.path).st_size
    shared.write(replace(FULL, models={**FULL.models, "shapes": replace(SHAPES, weight=20)}))
    os.utime(shared.path, ns=(mtime, mtime))
    assert os.stat(shared.path).st_size == size
    assert shared.read().model().weight == 20  # the new file has a new inode


def test_reads_follow_many_quick_writes(shared: SharedState) -> None:
    reader = SharedState(shared.root)
    for weight in range(10, 100):  # all two-digit weights: every file has the same size
        shared.write(_weighted(weight))
        assert reader.read().model().weight == weight


def test_read_of_a_missing_state_raises(shared: SharedState) -> None:
    with pytest.raises(FileNotFoundError):
        shared.read()


def test_blob_path(shared: SharedState) -> None:
    assert shared.blob("abcdef012345") == shared.root / "blobs" / "abcdef012345.safetensors"


def test_failed_write_keeps_the_old_state_and_leaves_no_temp_file(shared: SharedState,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    shared.write(FULL)

    def refuse(src: str, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        shared.write(FULL.next())
    monkeypatch.undo()
    assert shared.read() == FULL
    assert sorted(p.name for p in shared.root.iterdir()) == ["blobs", "state.json", "workers"]


# --- lock --------------------------------------------------------------------------------------

def _try_lock(path: Path) -> bool:
    """Whether an exclusive flock on ``path`` is free right now (a fresh open file description)."""
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def test_lock_is_held_inside_and_free_after(shared: SharedState) -> None:
    with shared.lock():
        assert _try_lock(shared.root / "lock") is False
    assert _try_lock(shared.root / "lock") is True


def test_lock_is_released_when_the_body_raises(shared: SharedState) -> None:
    with pytest.raises(RuntimeError, match="boom"), shared.lock():
        raise RuntimeError("boom")
    assert _try_lock(shared.root / "lock") is True


def test_lock_serialises_threads(shared: SharedState) -> None:
    # each lock() opens the file anew, and flock is per open file description: threads exclude
    counter = shared.root / "counter"
    counter.write_text("0")

    def bump() -> None:
        for _ in range(100):
            with shared.lock():
                value = int(counter.read_text())
                time.sleep(0)  # let the other thread run between read and write
                counter.write_text(str(value + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.read_text() == "400"


def _hold_lock(root: str, held: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event) -> None:
    with SharedState(Path(root)).lock():
        held.set()
        release.wait(30)


def test_lock_serialises_processes(shared: SharedState) -> None:
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_lock, args=(str(shared.root), held, release))
    child.start()
    try:
        assert held.wait(60), "child never took the lock"
        assert _try_lock(shared.root / "lock") is False
        entered = threading.Event()

        def enter() -> None:
            with shared.lock():
                entered.set()

        waiter = threading.Thread(target=enter)
        waiter.start()
        assert not entered.wait(0.3)  # blocked while the other process holds it
        release.set()
        assert entered.wait(30)
        waiter.join()
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0


# --- acks and wait_for -------------------------------------------------------------------------

def _ack(worker: str, generation: int, error: str | None = None) -> WorkerAck:
    return WorkerAck(worker=worker, pid=1000 + int(worker[-1]), generation=generation,
                     versions={"shapes": {"stable": "111111111111"}}, error=error)


def test_ack_round_trip(shared: SharedState) -> None:
    shared.ack(_ack("w0", 3))
    shared.ack(_ack("w1", 4, error="load failed"))
    assert shared.acks() == {"w0": _ack("w0", 3), "w1": _ack("w1", 4, error="load failed")}
    shared.ack(_ack("w0", 5))  # a worker's newer ack replaces its older one
    assert shared.acks()["w0"].generation == 5
    assert sorted(p.name for p in shared.workers.iterdir()) == ["w0.json", "w1.json"]


def test_acks_skips_unreadable_files(shared: SharedState) -> None:
    shared.ack(_ack("w0", 3))
    (shared.workers / "half.json").write_text('{"worker": "half", "pid"')
    (shared.workers / "odd.json").write_text('{"worker": "odd", "colour": "blue"}')
    (shared.workers / "list.json").write_text("[1, 2]")
    (shared.workers / "notes.txt").write_text("ignored")
    assert shared.acks() == {"w0": _ack("w0", 3)}


def test_wait_for_returns_at_once_when_every_worker_acked(shared: SharedState) -> None:
    shared.ack(_ack("w0", 5))
    shared.ack(_ack("w1", 6))  # a newer generation counts too
    started = time.monotonic()
    acks = shared.wait_for(5, 2, timeout=30)
    assert time.monotonic() - started < 1
    assert set(acks) == {"w0", "w1"}


def test_wait_for_waits_for_a_late_ack(shared: SharedState) -> None:
    shared.ack(_ack("w0", 5))
    shared.ack(_ack("w1", 4))  # still on the old generation
    timer = threading.Timer(0.2, lambda: shared.ack(_ack("w1", 5)))
    timer.start()
    try:
        acks = shared.wait_for(5, 2, timeout=30)
    finally:
        timer.join()
    assert {w: a.generation for w, a in acks.items()} == {"w0": 5, "w1": 5}


def test_wait_for_returns_on_an_error_ack(shared: SharedState) -> None:
    shared.ack(_ack("w0", 5, error="out of memory"))
    started = time.monotonic()
    acks = shared.wait_for(5, 4, timeout=30)
    assert time.monotonic() - started < 1
    assert acks == {"w0": _ack("w0", 5, error="out of memory")}


def test_wait_for_ignores_an_error_from_an_older_generation(shared: SharedState) -> None:
    shared.ack(_ack("w0", 4, error="old failure"))
    started = time.monotonic()
    assert shared.wait_for(5, 1, timeout=0.2) == {}
    assert time.monotonic() - started >= 0.2


def test_wait_for_times_out_with_what_it_has(shared: SharedState) -> None:
    shared.ack(_ack("w0", 5))
    shared.ack(_ack("w1", 3))
    started = time.monotonic()
    acks = shared.wait_for(5, 3, timeout=0.15)
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 2
    assert acks == {"w0": _ack("w0", 5)}


class _FrozenClockFile:
    """A text file whose mtime is pinned on close: a coarse file-system clock that did not tick."""

    def __init__(self, fd: int, mtime_ns: int) -> None:
        self._fh = _REAL_FDOPEN(fd, "w")
        self._mtime_ns = mtime_ns

    def write(self, text: str) -> int:
        return self._fh.write(text)

    def __enter__(self) -> _FrozenClockFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.flush()
        os.utime(self._fh.fileno(), ns=(self._mtime_ns, self._mtime_ns))
        self._fh.close()


_REAL_FDOPEN = os.fdopen


def test_read_sees_two_same_size_writes_within_one_clock_tick(shared: SharedState,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    shared.write(FULL)
    reader = SharedState(shared.root)
    assert reader.read().model().weight == 10
    first = os.stat(shared.path)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r": _FrozenClockFile(fd, first.st_mtime_ns))
    shared.write(_weighted(20))
    shared.write(_weighted(30).next())  # generation 9, weight 30: the same size as the first file
    monkeypatch.undo()
    now = os.stat(shared.path)
    assert now.st_size == first.st_size
    if now.st_ino != first.st_ino:
        pytest.skip("this file system did not reuse the inode, so the cache key differs anyway")
    assert reader.read().model().weight == 30


def test_atomic_write_replaces_the_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text("old")
    atomic_write(path, '{"new": 1}')
    assert path.read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
