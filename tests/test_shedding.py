"""The early refusal at the HTTP protocol: a full queue answers POST /predict at its headers,
skips its body, and the connection carries on; everything it cannot judge alone reaches the app."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from uvicorn.logging import AccessFormatter

from service.errors import Overloaded
from service.http.shedding import ShedEarly
from tests.server import free_port

BODY = b"\xff\xd8" + bytes(range(256)) * 200  # 51 KB, like a photo: longer than one read


@dataclass
class Counted:
    """A metric family that records the labels of each child used and what it was given."""

    seen: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    def labels(self, *values: str) -> Counted:
        self._labels = values
        return self

    def inc(self, amount: float = 1) -> None:
        self.seen.append((self._labels, amount))

    observe = inc


@dataclass
class Metrics:
    rejected: Counted = field(default_factory=Counted)
    requests: Counted = field(default_factory=Counted)
    request_duration: Counted = field(default_factory=Counted)


@dataclass
class App:
    """An ASGI app that answers 200 with what it received: method, path and the body's length."""

    calls: list[tuple[str, str, int]] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        self.calls.append((scope["method"], scope["path"], len(body)))
        answer = json.dumps({"path": scope["path"], "length": len(body)}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})


@dataclass
class Served:
    port: int
    app: App
    metrics: Metrics
    full: threading.Event  # set: the queue has no room

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


@contextmanager
def serving() -> Iterator[Served]:
    port, app, metrics, full = free_port(), App(), Metrics(), threading.Event()
    full.set()

    def refusal(images: int) -> Overloaded | None:
        return Overloaded(f"overloaded: {images} more image has no room", retry_after=3) if full.is_set() else None

    protocol = ShedEarly.judging(refusal=refusal, metrics=metrics,
                                 model_label=lambda name: "default" if name is None else name)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, lifespan="off",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.01)
    try:
        yield Served(port, app, metrics, full)
    finally:
        server.should_exit = True
        thread.join(10)


def post(path: str, body: bytes = BODY, *, headers: str = "", chunked: bool = False) -> bytes:
    if chunked:
        half = len(body) // 2
        framed = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:])) + b"0\r\n\r\n"
        return f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n{headers}\r\n".encode() + framed
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


class Answers:
    """HTTP/1.1 responses (each with a Content-Length) read off a socket, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.data = sock, b""

    def _fill(self, until: Callable[[], bool]) -> None:
        while not until():
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed before a whole response: {self.data!r}"
            self.data += chunk

    def next(self) -> tuple[int, dict[str, str], bytes]:
        self._fill(lambda: b"\r\n\r\n" in self.data)
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        self._fill(lambda: len(self.data) >= length)
        body, self.data = self.data[:length], self.data[length:]
        return int(lines[0].split()[1]), headers, body

    def closed(self) -> bool:
        """True when nothing is left after the responses read and the server has closed the connection
        at once (within 2 s: before uvicorn's keep-alive timeout, 5 s, would close it anyway)."""
        self.sock.settimeout(2)
        return self.data == b"" and self.sock.recv(1) == b""


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_refused_predict_gets_its_503_and_the_connection_serves_the_next_request(chunked: bool) -> None:
    with serving() as served, served.connect() as sock:
        answers = Answers(sock)
        sock.sendall(post("/predict", chunked=chunked))
        status, headers, body = answers.next()
        assert (status, headers["retry-after"], headers["content-type"]) == (503, "3", "application/json")
        assert json.loads(body) == {"error": "overloaded: 1 more image has no room"}
        assert "connection" not in headers and "date" in headers and "server" in headers  # uvicorn's own headers
        served.full.clear()  # room again: the same connection's next request reaches the app whole
        sock.sendall(post("/predict", chunked=chunked))
        assert answers.next()[0] == 200
        assert answers.data == b""  # nothing more: the refused request's body was skipped, not answered
        assert served.app.calls == [("POST", "/predict", len(BODY))]
        assert served.metrics.rejected.seen == [(("overload",), 1)]
        assert served.metrics.requests.seen == [(("predict", "503", "none", "default"), 1)]
        assert [labels for labels, _ in served.metrics.request_duration.seen] == [("predict", "default")]


def test_requests_sent_together_are_each_answered_in_order() -> None:
    """A refused request's body is skipped even when the next request follows it in the same packet."""
    with serving() as served, served.connect() as sock:
        sock.sendall(post("/models/cats/predict") + post("/predict") + b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        answers = Answers(sock)
        assert [answers.next()[0] for _ in range(3)] == [503, 503, 200]
        assert answers.data == b""
        assert served.app.calls == [("GET", "/health", 0)]
        assert [labels[3] for labels, _ in served.metrics.requests.seen] == ["cats", "default"]


@pytest.mark.parametrize("request_line", ["POST /predict HTTP/1.1\r\nConnection: close", "POST /predict HTTP/1.0"])
def test_a_refusal_closes_the_connection_when_the_request_asks_to(request_line: str) -> None:
    with serving() as served, served.connect() as sock:
        sock.sendall(f"{request_line}\r\nHost: t\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY)
        answers = Answers(sock)
        status, headers, _ = answers.next()
        assert (status, headers["connection"]) == (503, "close")
        assert answers.closed()
        assert served.app.calls == []


@pytest.mark.parametrize(("path", "extra"), [
    ("/v2/models/cats/infer", ""),  # its image count is in its body: the route admits it whole or not
    ("/models/a/b/predict", ""),  # not a model's route
    ("/predict", "Expect: 100-continue\r\n"),  # its client waits before it sends the body
])
def test_what_the_protocol_cannot_judge_alone_reaches_the_app(path: str, extra: str) -> None:
    with serving() as served, served.connect() as sock:
        request = post(path, headers=extra)
        sock.sendall(request[: -len(BODY)] if extra else request)  # headers only, when its client waits
        if extra:  # the client waits for 100 Continue, which the app's first receive() sends
            assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
            sock.sendall(BODY)
        assert Answers(sock).next()[0] == 200
        assert served.app.calls == [("POST", path, len(BODY))]
        assert served.metrics.rejected.seen == []


def test_a_refusal_is_logged_as_uvicorn_logs_a_request_when_the_access_log_is_on() -> None:
    """The line goes through uvicorn's access formatter, as an answered request's does."""
    lines: list[str] = []

    class Kept(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Kept()
    handler.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False))
    access = logging.getLogger("uvicorn.access")
    with serving() as served:
        access.addHandler(handler)
        level, access.level = access.level, logging.INFO
        try:
            with served.connect() as sock:
                client = "%s:%d" % sock.getsockname()
                sock.sendall(post("/predict?top_k=2") + b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                answers = Answers(sock)
                assert [answers.next()[0] for _ in range(2)] == [503, 200]
        finally:
            access.removeHandler(handler)
            access.level = level
    assert lines == [f'{client} - "POST /predict?top_k=2 HTTP/1.1" 503 Service Unavailable',
                     f'{client} - "GET /health HTTP/1.1" 200 OK']
