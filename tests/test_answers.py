"""The answer sockets (service.inference.answers): a worker's answers reach the API server's event
loop intact, whatever the framing on the wire; anything that is not a well-formed plain answer is
dropped with its connection and never unpickled into code; a sender that cannot reach the socket
says so, so that the answer goes through LitServe's queue instead."""

from __future__ import annotations

import asyncio
import enum
import os
import pickle
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from service.inference import answers
from service.inference.answers import HEADER, AnswerListener, AnswerSender, plain, to_buffer

UID = "0123456789abcdef0123456789abcdef"


def _listen(actions: Callable[[str], None], until: int, timeout_s: float = 10.0) -> list[tuple[str, Any]]:
    """Run a listener as API server 3 on a fresh name, run ``actions(name)`` in a thread, and
    return what it delivered once ``until`` answers are in (or the timeout passed)."""
    name = f"headswap-test-{os.getpid()}-{secrets.token_hex(4)}"
    got: list[tuple[str, Any]] = []

    async def main() -> None:
        done = asyncio.Event()

        def deliver(uid: str, answer: Any) -> None:
            got.append((uid, answer))
            if len(got) >= until:
                done.set()

        async with AnswerListener(name).serve(3, deliver):
            thread = threading.Thread(target=actions, args=(name,))
            thread.start()
            try:
                await asyncio.wait_for(done.wait(), timeout_s)
            except TimeoutError:
                pass
            await asyncio.to_thread(thread.join)

    asyncio.run(main())
    return got


def _raw(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(answers.address(name, 3))
    return sock


def _send_once(name: str, uid: str, answer: dict[str, Any]) -> bool:
    sender = AnswerSender(name)
    try:
        return sender.send(3, uid, answer)
    finally:
        sender.close()


def _frame(uid: str, payload: bytes) -> bytes:
    return HEADER.pack(len(uid) + len(payload)) + uid.encode() + payload


def test_answers_arrive_whole_and_in_order_from_each_sender() -> None:
    big = {"probabilities": np.arange(1000, dtype=np.float32).tobytes(), "top": [("cat", 3, 0.5)], "version": "v1",
           "slot": "stable", "shadow": None, "batch_size": 16, "started": 1.5, "finished": 2.5}
    sent: list[bool] = []

    def actions(name: str) -> None:
        senders = [AnswerSender(name), AnswerSender(name)]
        for i in range(20):
            sent.append(senders[i % 2].send(3, f"{i:032x}", {**big, "i": i}))
        for sender in senders:
            sender.close()

    got = _listen(actions, until=20)
    assert sent == [True] * 20
    assert sorted(got, key=lambda g: g[0]) == [(f"{i:032x}", {**big, "i": i}) for i in range(20)]
    assert [a["i"] for _, a in got if a["i"] % 2 == 0] == list(range(0, 20, 2))  # one connection keeps its order


def test_a_frame_split_anywhere_is_put_back_together() -> None:
    wire = _frame(UID, pickle.dumps({"a": b"x" * 70_000})) * 2

    def actions(name: str) -> None:
        with _raw(name) as sock:
            start = 0
            for cut in (1, 3, 40, 70_000, len(wire) - 5, len(wire)):  # inside the header, the uid, the body
                sock.sendall(wire[start:cut])
                start = cut
                time.sleep(0.01)  # separate reads, most likely

    got = _listen(actions, until=2)
    assert got == [(UID, {"a": b"x" * 70_000})] * 2


def test_a_sender_gone_mid_frame_costs_only_that_frame() -> None:
    """A worker killed while writing an answer leaves half a frame on its own connection; the
    listener drops it with the connection, and the next worker's answers arrive."""
    whole = _frame(UID, pickle.dumps({"n": 1}))

    def actions(name: str) -> None:
        with _raw(name) as sock:
            sock.sendall(whole + whole[:10])  # one answer, then the start of another, then gone
        assert _send_once(name, UID.replace("0", "f"), {"n": 2})

    got = _listen(actions, until=2)
    assert got == [(UID, {"n": 1}), (UID.replace("0", "f"), {"n": 2})]


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.getpid, ())


@pytest.mark.parametrize("bad", [
    pytest.param(_frame(UID, pickle.dumps(_Evil())), id="a-pickled-global"),
    pytest.param(_frame(UID, pickle.dumps(np.float32(1.0))), id="a-numpy-scalar"),
    pytest.param(HEADER.pack(answers.MAX_FRAME + 1) + b"\0" * 64, id="oversized"),
    pytest.param(HEADER.pack(5) + b"short", id="shorter-than-a-uid"),
    pytest.param(_frame(UID, b"not a pickle"), id="not-a-pickle"),
])
def test_a_bad_frame_is_dropped_with_its_connection_and_nothing_else(bad: bytes, caplog: pytest.LogCaptureFixture) -> None:
    after: list[bytes] = []

    def actions(name: str) -> None:
        with _raw(name) as sock:
            sock.sendall(bad + _frame(UID, pickle.dumps({"same": "connection"})))
            after.append(sock.recv(1))  # b"": the listener closed this connection
        assert _send_once(name, UID, {"next": "connection"})

    got = _listen(actions, until=1)
    assert got == [(UID, {"next": "connection"})]
    assert after == [b""]
    assert "answer connection closed" in caplog.text


def test_a_sender_without_a_listener_says_so_and_waits_before_trying_again() -> None:
    now = [100.0]
    sender = AnswerSender(f"headswap-test-nobody-{secrets.token_hex(4)}", clock=lambda: now[0])
    assert sender.send(0, UID, {"a": 1}) is False
    connects: list[int] = []

    def refused(consumer: int) -> socket.socket:
        connects.append(consumer)
        raise ConnectionRefusedError

    sender._connect = refused  # type: ignore[method-assign]
    now[0] += answers.RETRY_S / 2
    assert sender.send(0, UID, {"a": 1}) is False
    assert connects == []  # within RETRY_S: not tried again
    now[0] += answers.RETRY_S
    assert sender.send(0, UID, {"a": 1}) is False  # tried again, refused again
    assert connects == [0]


class _Status(enum.Enum):
    OK = 1


@pytest.mark.parametrize(("value", "expected"), [
    ({"probabilities": b"\0" * 8, "top": [("a", 1, 0.5)], "shadow": None, "ok": True}, True),
    ({"nested": {"list": [1, 2.0, "3", (4, b"5")]}}, True),
    ({"x": np.float32(1.0)}, False),
    ({"x": np.arange(3)}, False),
    ({"x": _Status.OK}, False),
    ({1: "not a str key"}, False),
    ({"x": {1, 2}}, False),
])
def test_only_plain_answers_go_by_socket(value: Any, expected: bool) -> None:
    assert plain(value) is expected
    sender = AnswerSender(f"headswap-test-nobody-{secrets.token_hex(4)}")
    sender._connect = lambda consumer: pytest.fail("a non-plain answer must not be sent")  # type: ignore[method-assign]
    if not expected:
        assert sender.send(0, UID, value) is False


def test_to_buffer_wakes_the_waiting_request_and_ignores_one_that_ended() -> None:
    class Item:
        def __init__(self) -> None:
            self.event = threading.Event()
            self.response: Any = None

    item = Item()
    buffer = {UID: item}
    deliver = to_buffer(buffer, "OK")
    deliver(UID, {"a": 1})
    deliver("f" * 32, {"b": 2})  # its request ended: nothing to wake
    assert item.event.is_set() and item.response == ({"a": 1}, "OK")
    assert list(buffer) == [UID]


def test_a_listener_that_cannot_bind_serves_on_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    """The API server starts either way: its answers then come by LitServe's queue (the worker's
    connect fails and it falls back), so a system without abstract sockets still serves."""
    name = f"headswap-test-{os.getpid()}-{secrets.token_hex(4)}"
    inside: list[bool] = []

    async def main() -> None:
        async with AnswerListener(name).serve(3, lambda uid, answer: None):
            async with AnswerListener(name).serve(3, lambda uid, answer: None):  # the same address: taken
                inside.append(True)

    asyncio.run(main())
    assert inside == [True]
    assert "no answer socket for API server 3" in caplog.text
