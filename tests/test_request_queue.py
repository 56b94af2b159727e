"""The request queue: batches taken in one call, the API server's puts off its event loop."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
import torch

from service.errors import NotReady
from service.inference import dispatch
from service.inference.admission import Admission, QueueLedger
from service.inference.decode import DecodeLimits
from service.inference.request_queue import Feeder, RequestQueue, start_queue


def item(uid: str) -> tuple:
    return (0, uid, 0.0, {"uid": uid})


def uids(items: list[tuple]) -> list[str]:
    return [uid for _, uid, _, _ in items]


def test_take_gives_what_is_queued_oldest_first_up_to_the_most_asked() -> None:
    queue = RequestQueue()
    queue.put_many([item("a"), item("b")])
    queue.put_many([item("c")])
    assert uids(queue.take(2, 0.0)) == ["a", "b"]
    assert queue.qsize() == 1
    assert uids(queue.take(8, 0.0)) == ["c"]
    assert queue.take(8, 0.0) == []


def test_take_waits_for_the_first_item_and_no_longer_than_its_timeout() -> None:
    queue = RequestQueue()
    started = time.monotonic()
    assert queue.take(4, 0.05) == []
    assert time.monotonic() - started >= 0.05
    threading.Timer(0.05, queue.put_many, ([item("late"), item("later")],)).start()
    assert uids(queue.take(4, 10.0)) == ["late", "later"]  # woken by the put, with what came with it


def test_two_takers_never_get_the_same_item() -> None:
    queue = RequestQueue()
    got: list[list[tuple]] = []
    takers = [threading.Thread(target=lambda: got.append(queue.take(3, 10.0))) for _ in range(2)]
    for taker in takers:
        taker.start()
    time.sleep(0.05)  # both wait
    queue.put_many([item(str(i)) for i in range(3)])
    queue.put_many([item("3")])
    for taker in takers:
        taker.join(10)
    assert sorted(uid for taken in got for uid in uids(taken)) == ["0", "1", "2", "3"]


def _take_in_a_worker(queue: Any, out: Any) -> None:
    out.put(uids(queue.take(16, 10.0)))


def test_the_queue_process_serves_a_spawned_worker() -> None:
    """As LitServe hands it to its workers: the proxy pickled into a spawned process (with the key
    to the queue process), taking what this process put."""
    server, queue = start_queue()
    try:
        ctx = mp.get_context("spawn")
        out = ctx.SimpleQueue()
        worker = ctx.Process(target=_take_in_a_worker, args=(queue, out))
        worker.start()
        queue.put_many([item("a"), item("b")])
        assert out.get() == ["a", "b"]
        worker.join(30)
        assert worker.exitcode == 0 and queue.qsize() == 0
    finally:
        server.shutdown()


class SlowQueue:
    """A queue whose first put_many holds until released, so that items pile up behind it."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        self.fail = fail
        self.done = threading.Condition()

    def put_many(self, items: list[tuple]) -> None:
        if not self.calls:
            self.release.wait(10)
        with self.done:
            self.calls.append(uids(items))
            self.done.notify_all()
        if self.fail:
            raise BrokenPipeError("the queue process is gone")

    def wait(self, calls: int) -> list[list[str]]:
        with self.done:
            assert self.done.wait_for(lambda: len(self.calls) >= calls, timeout=10)
            return self.calls


def test_the_feeder_puts_what_piled_up_during_its_last_call_in_one_call_in_order() -> None:
    queue = SlowQueue()
    feeder = Feeder(queue, lost=lambda items: pytest.fail("nothing is lost"))
    for uid in "abcd":
        feeder.put(item(uid))
    time.sleep(0.05)  # the thread took "a" (or more) and holds in its call
    queue.release.set()
    calls = queue.wait(1)
    while sum(map(len, calls)) < 4:
        calls = queue.wait(len(calls) + 1)
    assert [uid for call in calls for uid in call] == ["a", "b", "c", "d"]
    assert len(calls) <= 2  # "a" alone, then the three that waited for it together


def test_items_the_feeder_cannot_queue_are_reported_and_it_goes_on() -> None:
    queue = SlowQueue(fail=True)
    queue.release.set()
    lost: list[list[str]] = []
    feeder = Feeder(queue, lost=lambda items: lost.append(uids(items)))
    feeder.put(item("a"))
    queue.wait(1)
    feeder.put(item("b"))
    queue.wait(2)
    deadline = time.monotonic() + 10
    while len(lost) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lost == [["a"], ["b"]]


def test_a_request_whose_item_never_reached_the_queue_is_answered_503_at_once() -> None:
    """The queue process is gone (the server is stopping): the request hears NotReady now, not a
    504 at its deadline."""
    queue = SlowQueue(fail=True)
    queue.release.set()
    server = type("Server", (), {"response_buffer": {}, "app": type("App", (), {"response_queue_id": 0})})()
    dispatcher = dispatch.Dispatcher(server, queue, DecodeLimits(1000, 1000), timeout_s=30, threads=1,
                                     admission=Admission(QueueLedger(1), None, floor=1))

    async def scenario() -> float:
        started = time.monotonic()
        with pytest.raises(NotReady) as info:
            await dispatcher.infer(torch.zeros(3, 4, 4, dtype=torch.uint8), model="m", slot="stable", top_k=1,
                                   deadline=dispatcher.deadline())
        assert info.value.reason == "stopping" and "stopping" in str(info.value)
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 10  # the deadline was 30 s away
    assert server.response_buffer == {}
