"""The request queue: every API server's images to the inference workers, in batches.

LitServe queues one item per call on a ``multiprocessing.Manager`` queue: each ``put`` is a
round trip to the manager process, on the API server's event loop, and each ``get`` another,
from the worker, so a worker gathering a batch of 16 made 16 round trips in series before its
forward pass. Here the queue lives in a process of its own (``RequestQueueServer``, a
``BaseManager`` like LitServe's) and speaks in lists: a worker takes up to a batch in one call
(``RequestQueue.take``), and each API server hands its items to a feeder thread (``Feeder``),
which puts everything that piled up during its last call in one call, so that the event loop
never waits for the queue process. Like LitServe's, the queue holds no lock across processes:
a process killed in the middle of a call loses only what that call carried.

An item is LitServe's tuple: (the API server's answer channel, uid, time queued, payload).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

log = logging.getLogger("headswap.queue")
Item = tuple[int, str, float, Any]
PROCESS_NAME = "headswap-queue"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RequestQueue:
    """The queue itself, in the queue process; every method is one call from another process."""

    def __init__(self) -> None:
        self._items: deque[Item] = deque()
        self._ready = threading.Condition()

    def put_many(self, items: list[Item]) -> None:
        """Queue ``items``, in order, after those already queued."""
        with self._ready:
            self._items.extend(items)
            self._ready.notify(len(items))

    def take(self, most: int, timeout: float) -> list[Item]:
        """Up to ``most`` items, oldest first: those queued now, else the first to come within
        ``timeout`` seconds (and any queued with it); [] when none came."""
        with self._ready:
            if not self._items:
                self._ready.wait_for(lambda: self._items, max(0.0, timeout))
            return [self._items.popleft() for _ in range(min(most, len(self._items)))]

    def qsize(self) -> int:
        return len(self._items)

    def pid(self) -> int:
        """The queue process's pid."""
        return os.getpid()


class RequestQueueServer(BaseManager):
    """The process holding one server's request queue (started before the API servers fork;
    its proxies travel to spawned workers pickled, with the authentication key)."""


RequestQueueServer.register("RequestQueue", RequestQueue, exposed=("put_many", "take", "qsize", "pid"))


def start_queue() -> tuple[RequestQueueServer, Any]:
    """A started queue process and a proxy to its queue (``put_many``, ``take``, ``qsize``, ``pid``). Call it
    from the thread that lives as long as the server: the queue process ends with that thread."""
    server = RequestQueueServer(ctx=mp.get_context("fork"))  # a fork starts at once; it imports nothing
    server.start(initializer=_queue_process)
    return server, server.RequestQueue()  # type: ignore[attr-defined]


def _queue_process() -> None:
    """In the queue process: named ``headswap-queue`` (ps, top); deaf to SIGTERM, so that a signal
    sent to the whole process group leaves it to carry the requests the API servers are draining
    (the main process shuts it down last); and ended by the kernel if the main process dies
    without doing so (Linux: PR_SET_PDEATHSIG)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        Path("/proc/self/comm").write_text(PROCESS_NAME)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the name and the guard are niceties
        pass


class Feeder:
    """One API server's puts, off its event loop: ``put`` hands an item to a thread of this
    process, which puts it on the queue together with any others handed meanwhile.

    ``lost(items)`` hears, from that thread, items it could not queue (the queue process is gone:
    shutting down); the requests awaiting them must be answered some other way.
    """

    def __init__(self, target: Any, lost: Callable[[list[Item]], None]) -> None:
        self.target = target
        self.lost = lost
        self._pending: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self._pid = -1  # the process whose thread feeds (threads do not survive a fork)

    def put(self, item: Item) -> None:
        if self._pid != os.getpid():
            self._pending = queue.SimpleQueue()
            threading.Thread(target=self._feed, name="queue-feeder", daemon=True).start()
            self._pid = os.getpid()
        self._pending.put(item)

    def _feed(self) -> None:
        pending = self._pending
        while True:
            items = [pending.get()]
            while True:
                try:
                    items.append(pending.get_nowait())
                except queue.Empty:
                    break
            try:
                self.target.put_many(items)
            except Exception as exc:  # noqa: BLE001 - any failure of the call: the items are not queued
                log.warning("could not queue %d item(s): %s", len(items), exc)
                self.lost(items)
