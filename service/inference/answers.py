"""A worker's answers back to the API server that queued the items: one Unix socket per API server.

LitServe carries answers through one ``multiprocessing.Manager`` queue per API server: each
answer is an RPC from the worker into the manager process, another out of it from a thread of
the API server blocked in a ``get``, then a hop from that thread onto the event loop (about
1 ms for a lone client on 2 cores). Here every API server also listens on its own abstract
Unix socket, and each worker keeps one connection to each API server it answers: one writer
per connection and no lock that a killed process could leave held. The API server's event
loop reads the answers itself and wakes the request awaiting each. A worker killed in the
middle of an answer leaves a partial frame on its own connection only, which ends with it.

An answer that cannot go this way (the socket is not there, a send fails or times out, or the
answer holds something other than plain data) goes through LitServe's queue as before.

Frames: a 4-byte big-endian length of the rest, the item's 32-character uid, then the answer
pickled. The listener reads only connections from processes of its own user (SO_PEERCRED)
and unpickles without any global (dicts, lists, tuples, strings, bytes and numbers only), so no
connection can make it run code.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import pickle
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from litserve.utils import LitAPIStatus

log = logging.getLogger("headswap.answers")
HEADER = struct.Struct("!I")
UID_BYTES = 32  # uuid4().hex
MAX_FRAME = 64 * 1024 * 1024  # far above any answer (the probabilities of 1000 classes are 4 KB)
SEND_TIMEOUT_S = 5.0  # a send that cannot finish in this time (the API server stopped) goes by the queue
RETRY_S = 1.0  # after a failed connect or send, the queue only, for this long
_PLAIN = (str, bytes, int, float, bool, type(None))


def address(name: str, consumer: int) -> str:
    """The abstract socket (no file: it goes with the last process holding it) of API server ``consumer``."""
    return f"\0{name}-{consumer}"


class AnswerListener:
    """The API-server side: built before the API servers fork, listening in each one's lifespan."""

    def __init__(self, name: str) -> None:
        self.name = name

    def serve_app(self, server: Any, app: Any) -> AbstractAsyncContextManager[None]:
        """``serve`` as ``app``, one API server of LitServer ``server``, into its response buffer, beside
        LitServe's own consumer of its answer queue (run within the app's lifespan)."""
        return self.serve(app.response_queue_id, to_buffer(server.response_buffer, LitAPIStatus.OK))

    @asynccontextmanager
    async def serve(self, consumer: int, deliver: Callable[[str, Any], None]) -> AsyncIterator[None]:
        """Listen as API server ``consumer`` while inside; ``deliver(uid, answer)`` on the event loop.
        Where the socket cannot be made (no abstract Unix sockets on this system), answers come by
        LitServe's queue alone: slower, never lost."""
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_unix_server(lambda: _Reader(deliver), address(self.name, consumer))
        except OSError as exc:
            log.warning("answers come through LitServe's queue: no answer socket for API server %d (%s)", consumer, exc)
            server = None
        try:
            yield
        finally:
            if server is not None:
                server.close()


def to_buffer(buffer: MutableMapping[str, Any], status: Any) -> Callable[[str, Any], None]:
    """A ``deliver`` that hands each answer to LitServe's response buffer as its own consumer does:
    the item's ``response`` is set to (answer, status) and its event set."""

    def deliver(uid: str, answer: Any) -> None:
        item = buffer.get(uid)
        if item is not None:  # else its request ended (deadline, client gone)
            item.response = (answer, status)
            item.event.set()

    return deliver


class _Reader(asyncio.Protocol):
    def __init__(self, deliver: Callable[[str, Any], None]) -> None:
        self.deliver = deliver
        self.pending = bytearray()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # uvloop's is not an asyncio.Transport
        self.transport = transport
        sock = transport.get_extra_info("socket")
        uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1] if sock else -1
        if uid != os.getuid():
            log.warning("refused an answer connection from user %d", uid)
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.pending += data
        while len(self.pending) >= HEADER.size:
            (length,) = HEADER.unpack_from(self.pending)
            if length < UID_BYTES or length > MAX_FRAME:
                self._drop(f"a frame of {length} bytes")
                return
            end = HEADER.size + length
            if len(self.pending) < end:
                return
            frame = bytes(self.pending[HEADER.size:end])
            del self.pending[:end]
            try:
                uid, answer = frame[:UID_BYTES].decode("ascii"), _PlainUnpickler(io.BytesIO(frame[UID_BYTES:])).load()
            except (pickle.UnpicklingError, UnicodeDecodeError, ValueError, EOFError) as exc:
                self._drop(f"an unreadable frame ({exc})")
                return
            self.deliver(uid, answer)

    def _drop(self, what: str) -> None:
        log.warning("answer connection closed: %s", what)
        self.pending.clear()
        assert self.transport is not None
        self.transport.close()


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


class AnswerSender:
    """The worker side: one blocking connection per API server, opened at its first answer."""

    def __init__(self, name: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self._sockets: dict[int, socket.socket] = {}
        self._retry_at: dict[int, float] = {}

    def send(self, consumer: int, uid: str, answer: dict[str, Any]) -> bool:
        """Send ``answer`` for ``uid`` to API server ``consumer``; False where it must go by the queue."""
        if len(uid) != UID_BYTES or not plain(answer) or self.clock() < self._retry_at.get(consumer, 0.0):
            return False
        body = uid.encode("ascii") + pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            sock = self._sockets.get(consumer) or self._connect(consumer)
            sock.sendall(HEADER.pack(len(body)) + body)
            return True
        except OSError as exc:  # refused, gone, timed out: a partial frame dies with the connection
            self._close(consumer)
            self._retry_at[consumer] = self.clock() + RETRY_S
            log.debug("answers to API server %d go by the queue for %.0f s: %s", consumer, RETRY_S, exc)
            return False

    def _connect(self, consumer: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.connect(address(self.name, consumer))
        except OSError:
            sock.close()
            raise
        self._sockets[consumer] = sock
        return sock

    def _close(self, consumer: int) -> None:
        sock = self._sockets.pop(consumer, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for consumer in list(self._sockets):
            self._close(consumer)


def plain(value: Any) -> bool:
    """Whether ``value`` is made only of what the listener unpickles: None, bools, numbers, strings,
    bytes, and lists, tuples and str-keyed dicts of those."""
    if isinstance(value, _PLAIN):
        return type(value) in _PLAIN  # not a subclass (an enum, numpy's float64): those pickle as globals
    if type(value) in (list, tuple):
        return all(plain(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and plain(v) for k, v in value.items())
    return False
