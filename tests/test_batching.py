"""When a worker waits to fill a batch: only while the API servers say more images are coming.

The worker side (``InferenceLoop.get_batch_requests``) runs against a scripted queue, so what
it waited for is recorded, not timed; the API-server side (``Dispatcher``) against a captured
queue put.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from models import CheckpointMeta
from service.errors import (
    GatewayTimeout,
    InternalError,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    Unprocessable,
    UnsupportedMediaType,
)
from service.http.errors import status_of
from service.inference import dispatch, worker
from service.inference.admission import Admission, QueueLedger
from service.inference.decode import DecodeLimits
from service.inference.worker import HeapTrim, InferenceLoop, failure
from tests.images import jpeg
from tests.test_admission import queue_up


class ScriptedQueue:
    """``ready`` items are queued now; ``late`` items arrive one at a time, each only to a take
    that finds nothing queued and waits."""

    def __init__(self, ready: list[Any], late: list[Any] = ()) -> None:
        self.ready = list(ready)
        self.late = list(late)
        self.takes: list[int] = []  # how many items each take asked for
        self.waits: list[float] = []  # the timeout of every take that waited

    def take(self, most: int, timeout: float) -> list[Any]:
        self.takes.append(most)
        if self.ready:
            taken, self.ready = self.ready[:most], self.ready[most:]
            return taken
        if timeout <= 0:
            return []
        self.waits.append(timeout)
        return [self.late.pop(0)] if self.late else []


def entry(uid: str, arriving: int | None) -> tuple:
    payload = {"slot": "stable"} if arriving is None else {"slot": "stable", "arriving": arriving}
    return (0, uid, 1e12, payload)  # arrived in the future: never late


class ScriptedAPI(SimpleNamespace):
    """What the loop reads of ClassifierAPI, recording what it reports as taken and refused."""

    def __init__(self, max_batch_size: int = 8, max_queue_wait_s: float = 0.0) -> None:
        super().__init__(batch_timeout=5.0, max_batch_size=max_batch_size,
                         config=SimpleNamespace(timeout_s=30.0, max_queue_wait_s=max_queue_wait_s), ledger=None, index=0)
        self.taken: list[int] = []
        self.refused: list[str] = []

    def took(self, count: int, refusals: list[str]) -> None:
        self.taken.append(count)
        self.refused.extend(refusals)


def api(max_batch_size: int = 8, max_queue_wait_s: float = 0.0) -> ScriptedAPI:
    return ScriptedAPI(max_batch_size, max_queue_wait_s)


def uids(batch: list[tuple]) -> list[str]:
    return [uid for _, uid, _ in batch]


def test_a_lone_request_runs_without_waiting_for_the_batch_timeout() -> None:
    queue = ScriptedQueue([entry("a", 0)], late=[entry("never", 0)])
    batch, late = InferenceLoop().get_batch_requests(api(), queue, None)
    assert uids(batch) == ["a"] and late == []
    assert queue.waits == []  # no take that waited: the late item was not waited for


def test_queued_requests_are_drained_and_the_newest_hint_decides() -> None:
    queue = ScriptedQueue([entry("a", 2), entry("b", 1), entry("c", 0)], late=[entry("never", 0)])
    batch, _ = InferenceLoop().get_batch_requests(api(), queue, None)
    assert uids(batch) == ["a", "b", "c"]
    assert queue.takes == [8, 5] and queue.waits == []  # everything queued in one call, then what came meanwhile


def test_what_was_queued_while_the_first_take_was_answered_joins_the_batch() -> None:
    """The worker was slow to run once its first item came (descheduled, or stopped): what other
    requests queued meanwhile runs in the same batch, though the first item's hint said no more."""
    queue = ScriptedQueue([entry("a", 0)])
    take, meanwhile = queue.take, [entry("b", 0), entry("c", 0)]

    def then_more_came(most: int, timeout: float) -> list[Any]:
        taken = take(most, timeout)
        queue.ready += meanwhile
        meanwhile.clear()
        return taken

    queue.take = then_more_came  # type: ignore[method-assign]
    batch, _ = InferenceLoop().get_batch_requests(api(), queue, None)
    assert uids(batch) == ["a", "b", "c"] and queue.waits == []


def test_the_worker_waits_while_images_are_on_their_way() -> None:
    queue = ScriptedQueue([entry("a", 2)], late=[entry("b", 1), entry("c", 0), entry("never", 0)])
    batch, _ = InferenceLoop().get_batch_requests(api(), queue, None)
    assert uids(batch) == ["a", "b", "c"]  # stopped once the newest said nothing more is coming
    assert len(queue.waits) == 2 and all(0 < t <= 5.0 for t in queue.waits)
    assert queue.takes == [8, 7, 7, 6]  # never more than the batch still has room for


def test_without_a_hint_the_worker_waits_as_before() -> None:
    queue = ScriptedQueue([entry("a", None)], late=[entry("b", None)])
    batch, _ = InferenceLoop().get_batch_requests(api(), queue, None)
    assert uids(batch) == ["a", "b"]
    assert len(queue.waits) == 2  # waited for b, then once more until the timeout ran out


def test_items_past_their_deadline_or_the_queue_wait_are_refused_without_running() -> None:
    now = time.monotonic()
    queue = ScriptedQueue([
        (0, "fresh", now, {"slot": "stable", "arriving": 3, "deadline": now + 30}),
        (0, "expired", now - 1, {"slot": "stable", "arriving": 2, "deadline": now - 0.5}),
        (0, "stale", now - 2, {"slot": "stable", "arriving": 1, "deadline": now + 30}),
        (0, "old", now - 40, {"slot": "stable", "arriving": 0}),  # no deadline of its own: --timeout-s
    ])
    scripted = api(max_queue_wait_s=1.5)
    batch, refused = InferenceLoop().get_batch_requests(scripted, queue, None)
    assert uids(batch) == ["fresh"]
    assert [(uid, r["type"], r["reason"]) for _, uid, r in refused] == [
        ("expired", "GatewayTimeout", "deadline"), ("stale", "Overloaded", "overload"), ("old", "GatewayTimeout", "deadline")]
    assert refused[1][2]["error"].startswith("overloaded: waited 2")
    assert scripted.taken == [4] and scripted.refused == ["deadline", "overload", "deadline"]


def test_a_full_batch_does_not_wait() -> None:
    queue = ScriptedQueue([entry(str(i), 5) for i in range(4)], late=[entry("never", 0)])
    batch, _ = InferenceLoop().get_batch_requests(api(max_batch_size=4), queue, None)
    assert uids(batch) == ["0", "1", "2", "3"] and queue.waits == [] and queue.takes == [4]


def test_a_worker_above_an_idle_one_leaves_its_work_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 1 does not touch the queue while worker 0 is idle and the queue holds no more than a
    batch for it (it would race worker 0 for it); worker 0 takes it and is no longer idle."""
    monkeypatch.setattr(worker, "IDLE_POLL_S", 0.01)  # an idle poll shorter than the stall limit
    ledger = QueueLedger(2)
    ledger.set_idle(0, True)
    ledger.set_idle(1, True)
    queue_up(ledger, 1)
    queue = ScriptedQueue([entry("a", 0)])
    above, lowest = api(), api()
    above.ledger, above.index, lowest.ledger = ledger, 1, ledger
    assert InferenceLoop().get_batch_requests(above, queue, None) == ([], [])
    assert len(queue.ready) == 1 and above.taken == []
    batch, _ = InferenceLoop().get_batch_requests(lowest, queue, None)
    assert uids(batch) == ["a"] and ledger.idle_below(1) == 0


class Timeline:
    """A queue whose every take that may wait is the script's next step: an entry, or None (nothing
    came); one that may not finds nothing."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)

    def take(self, most: int, timeout: float) -> list[Any]:
        if timeout <= 0:
            return []
        if not self.script:
            raise _Done
        step = self.script.pop(0)
        return [] if step is None else [step]


class _Done(Exception):
    """The timeline ran out: ends run_batched_loop."""


class LoopAPI(ScriptedAPI):
    """Enough of ClassifierAPI for run_batched_loop, answering every item with the trims so far."""

    def __init__(self, trims: list[int]) -> None:
        super().__init__(max_batch_size=4)
        self.config.answers = ""
        self.trims = trims

    def between_batches(self) -> None:
        pass

    def begin_batch(self) -> None:
        pass

    def end_batch(self) -> None:
        pass

    def observe(self, size: int) -> None:
        pass

    def decode_request(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    def batch(self, items: list[Any]) -> list[Any]:
        return items

    def predict(self, items: list[Any]) -> list[Any]:
        return items

    def unbatch(self, items: list[Any]) -> list[Any]:
        return items

    def encode_response(self, item: Any) -> dict[str, Any]:
        return {"trims_before": len(self.trims)}


@pytest.mark.parametrize(("after_s", "expected"), [(0.0, 2), (3600.0, 0)])
def test_an_idle_worker_gives_its_free_heap_back_once_per_idle_spell(after_s: float, expected: int) -> None:
    """Trimmed on the first idle poll after a batch (once however long the idleness), never
    while batches follow each other, never before a first batch; with a long spell, not at all."""
    trims: list[int] = []
    loop = InferenceLoop()
    loop.heap = HeapTrim(after_s=after_s, trim=lambda: trims.append(1))
    sent: list[Any] = []
    transport = SimpleNamespace(send=lambda item, consumer_id: sent.append(item))
    script = [None, entry("a", 0), entry("b", 0), None, None, None, entry("c", 0), None]
    with pytest.raises(_Done):
        loop.run_batched_loop(LoopAPI(trims), Timeline(script), transport, None)
    assert len(sent) == 3 and len(trims) == expected
    if expected:  # a and b ran back to back, untrimmed; c after the first trim
        assert [answer["trims_before"] for _, (answer, *_) in sent] == [0, 0, 1]


class CapturingServer:
    """What the dispatcher uses of LitServer, and a request queue that keeps the payloads put on it."""

    def __init__(self) -> None:
        self.response_buffer: dict[str, Any] = {}
        self.app = SimpleNamespace(response_queue_id=0)  # set per API-server process by LitServe
        self.queue = CapturingQueue()


class CapturingQueue:
    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.calls: list[int] = []  # items per put_many
        self.arrived = threading.Condition()

    def put_many(self, items: list[tuple]) -> None:
        with self.arrived:
            self.payloads.extend(item[3] for item in items)
            self.calls.append(len(items))
            self.arrived.notify_all()

    def wait(self, count: int) -> list[dict[str, Any]]:
        """The payloads, once ``count`` of them came from the dispatcher's feeder thread."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.payloads) >= count, timeout=10)
            return self.payloads


def test_dispatcher_hints_images_in_decode_and_later_items_of_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()

    def slow_decode(data: bytes, limits: DecodeLimits, meta: Any, on_worker: bool) -> torch.Tensor:
        gate.wait(10)
        return torch.zeros(3, 4, 4, dtype=torch.uint8)

    monkeypatch.setattr(dispatch, "_prepare", slow_decode)
    server = CapturingServer()
    dispatcher = dispatch.Dispatcher(server, server.queue, DecodeLimits(1000, 1000), timeout_s=0.05, threads=2,
                                     admission=Admission(QueueLedger(1), None, floor=1))
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)

    async def scenario() -> None:
        decoding = [asyncio.create_task(dispatcher.preprocess(b"x", None)) for _ in range(2)]
        await asyncio.sleep(0)  # both are in the decode pool now
        for following in (3, 0):
            with pytest.raises(GatewayTimeout):  # nobody answers: only the put matters here
                await dispatcher.infer(image, model="m", slot="stable", top_k=1, following=following,
                                       deadline=dispatcher.deadline())
        gate.set()
        await asyncio.gather(*decoding)
        with pytest.raises(GatewayTimeout):
            await dispatcher.infer(image, model="m", slot="stable", top_k=1, deadline=dispatcher.deadline(0.01))

    asyncio.run(scenario())
    assert [p["arriving"] for p in server.queue.wait(3)] == [2 + 3, 2, 0]


def test_a_lone_small_image_in_an_idle_process_is_decoded_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request's only image, nothing else decoding or awaiting a worker in this process, and small:
    decoded on the event loop's own thread, the same pixels as the pool gives. Anything else (another
    image of the request, an item awaiting a worker, a large image, a header over the limits) goes
    to the decode pool, or fails there as before."""
    threads: list[int] = []
    finish = dispatch._finish

    def recording(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return finish(*args)

    monkeypatch.setattr(dispatch, "_finish", recording)
    server = CapturingServer()
    dispatcher = dispatch.Dispatcher(server, server.queue, DecodeLimits(10_000_000, 4_000_000), timeout_s=1, threads=1,
                                     admission=Admission(QueueLedger(1), None, floor=1))
    meta = CheckpointMeta.for_arch("resnet18", ["a", "b"])
    small, large = jpeg(1), jpeg(2, size=(1200, 1000))
    assert 1200 * 1000 > dispatch.INLINE_MAX_PIXELS >= 500 * 375

    async def scenario() -> tuple[int, list[torch.Tensor]]:
        loop_thread = threading.get_ident()
        inline = await dispatcher.preprocess(small, meta, alone=True)
        pooled = await dispatcher.preprocess(small, meta)
        await dispatcher.preprocess(large, meta, alone=True)
        server.response_buffer["busy"] = object()
        await dispatcher.preprocess(small, meta, alone=True)
        server.response_buffer.clear()
        with pytest.raises(PayloadTooLarge):
            await dispatcher.preprocess(jpeg(3, size=(2500, 2000)), meta, alone=True)
        return loop_thread, [inline, pooled]

    loop_thread, (inline, pooled) = asyncio.run(scenario())
    assert threads[0] == loop_thread
    assert all(t != loop_thread for t in threads[1:]) and len(threads) == 4
    assert inline.dtype == torch.uint8 and inline.shape == (3, 224, 224) and torch.equal(inline, pooled)


def test_the_deadline_is_the_server_timeout_or_the_request_s_shorter_one_and_travels_with_the_item() -> None:
    server = CapturingServer()
    dispatcher = dispatch.Dispatcher(server, server.queue, DecodeLimits(1000, 1000), timeout_s=0.05, threads=1,
                                     admission=Admission(QueueLedger(1), None, floor=1))
    before = time.monotonic()
    default, shorter, longer = dispatcher.deadline(), dispatcher.deadline(0.01), dispatcher.deadline(60)
    after = time.monotonic()
    assert before + 0.05 <= default <= after + 0.05
    assert before + 0.01 <= shorter <= after + 0.01
    assert before + 0.05 <= longer <= after + 0.05  # a request cannot ask for more than --timeout-s

    async def scenario() -> None:
        with pytest.raises(GatewayTimeout):
            await dispatcher.infer(torch.zeros(3, 4, 4, dtype=torch.uint8), model="m", slot="stable", top_k=1,
                                   deadline=shorter)

    asyncio.run(scenario())
    assert server.queue.wait(1)[0]["deadline"] == shorter


@pytest.mark.parametrize(("kind", "status"), [
    (PayloadTooLarge, 413), (UnsupportedMediaType, 415), (Unprocessable, 422), (RequestError, 400),
    (GatewayTimeout, 504), (InternalError, 500), (Overloaded, 503)])
def test_an_error_raised_in_a_worker_reaches_the_client_as_itself(kind: type[RequestError], status: int) -> None:
    """The worker sends an item's error by its type's name; the API server raises that type again,
    so its status comes from the one table, not from a second, lossy one."""
    error = kind("too big", retry_after=1) if kind is Overloaded else kind("too big", reason="why")
    admission = Admission(QueueLedger(1), None, floor=1)
    with pytest.raises(kind) as info:
        dispatch._result(failure(error), time.monotonic(), admission)
    assert type(info.value) is kind and str(info.value) == "too big" and status_of(info.value) == status
    assert info.value.reason == error.reason


def test_an_unknown_error_name_from_a_worker_is_a_plain_client_error() -> None:
    with pytest.raises(RequestError) as info:
        dispatch._result({"error": "odd", "type": "NoSuchError", "reason": "x"}, time.monotonic(),
                         Admission(QueueLedger(1), None, floor=1))
    assert type(info.value) is RequestError and status_of(info.value) == 400
