"""Load shedding: a bounded queue, summed over every process of one server.

``QueueLedger`` is a few integers in shared memory, created by the main process before the API
servers fork and handed to the spawned workers with their LitAPI: the images admitted and not
yet taken by a worker (``depth``: decoding or waiting), of those the images on the request
queue (``queued``), the images admitted and not yet answered (``held``: waiting, decoding or
running), the images workers have taken since start (``taken``, the drain rate's clock), which
workers are running a batch now (``busy``, for their thread counts) and which are idle, done
with their last batch and not yet holding the next (``idle``: the lowest idle one takes the
next, ``service.inference.worker.LowestIdleFirst``). An API server admits a
request's images (all of them or none) before decoding them; a worker takes them off ``depth``
when it takes them off the queue, the request gives them back to ``held`` once it has its
answers. The bound is therefore exact across API-server processes, and ``headswap_queue_depth``
and ``headswap_admitted_images`` are read from the same cells.

``Admission`` is the API-server side: the bound (``--max-queue``), the drain rate measured from
``taken``, and the 503 with ``Retry-After`` for a request over the bound. A number bounds the
images waiting (``depth``); auto bounds the images in the server (``held``), which is what an
admitted image's answer time follows (Little's law: held / drain rate): a bound on the waiting
images alone lets a full queue add the batches already running to every admitted image's wait.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable

from service.errors import Overloaded

AUTO_QUEUE_S = 1.0  # auto bound: the images in the server, about this many seconds of work at the measured drain rate ...
AUTO_QUEUE_MAX = 1024  # ... and at most this many images (each waits as a decoded tensor)
RATE_SAMPLE_S = 0.5  # drain rate: one sample of ``taken`` per this interval ...
RATE_SAMPLES = 10  # ... over the last this many samples (about 5 s)

_DEPTH, _TAKEN, _HELD, _QUEUED = 0, 1, 2, 3


class QueueLedger:
    """Shared counters of one server's queue. Safe to use from any process it was handed to.

    Built with the spawn context so that it travels to LitServe's spawned workers inside the
    pickled LitAPI; forked API servers inherit the same memory.
    """

    def __init__(self, workers: int) -> None:
        ctx = mp.get_context("spawn")
        self._lock = ctx.Lock()
        self._cells = ctx.RawArray("q", 4)
        self._busy = ctx.RawArray("b", max(1, workers))
        self._idle = ctx.RawArray("b", max(1, workers))

    def try_admit(self, n: int, bound: int, *, held: bool = False) -> bool:
        """Add ``n`` images unless that would take the images waiting (with ``held``: the images in
        the server) past ``bound`` (0: no bound). True when admitted."""
        with self._lock:
            if bound and self._cells[_HELD if held else _DEPTH] + n > bound:
                return False
            self._cells[_DEPTH] += n
            self._cells[_HELD] += n
            return True

    def release(self, n: int, answered: int = 0) -> None:
        """``n`` admitted images will not be queued after all (a bad image, an error); ``answered``
        images of a request that has its answers leave the server."""
        if n or answered:
            with self._lock:
                self._cells[_DEPTH] -= n
                self._cells[_HELD] -= answered

    def put(self, n: int, *, again: bool = False) -> None:
        """``n`` admitted images went onto the request queue; ``again``: images their request had
        already given back (``release``), counted as waiting again since a worker will take them."""
        with self._lock:
            self._cells[_QUEUED] += n
            if again:
                self._cells[_DEPTH] += n

    def take(self, n: int) -> None:
        """A worker took ``n`` queued images off the queue (to run them or to refuse them)."""
        if n:
            with self._lock:
                self._cells[_DEPTH] -= n
                self._cells[_QUEUED] -= n
                self._cells[_TAKEN] += n

    def depth(self) -> int:
        return max(0, self._cells[_DEPTH])

    def queued(self) -> int:
        return max(0, self._cells[_QUEUED])  # a worker may take an image before its put is counted

    def held(self) -> int:
        return max(0, self._cells[_HELD])

    def taken(self) -> int:
        return self._cells[_TAKEN]

    def set_busy(self, worker: int, busy: bool) -> None:
        with self._lock:
            self._busy[worker % len(self._busy)] = busy

    def begin_batch(self, worker: int) -> int:
        """Mark ``worker`` busy; returns how many other workers are busy. One step under the lock, so
        of two workers starting together at least one sees the other."""
        me = worker % len(self._busy)
        with self._lock:
            self._busy[me] = True
            return sum(1 for i, busy in enumerate(self._busy) if busy and i != me)

    def set_idle(self, worker: int, idle: bool) -> None:
        """``worker`` is idle (done with its batch, going to the queue or waiting on it) or not (it
        took an item). One byte, written only by that worker: no lock."""
        self._idle[worker % len(self._idle)] = idle

    def idle_below(self, worker: int) -> int:
        """How many workers of lower index than ``worker`` are idle."""
        return sum(self._idle[:min(worker, len(self._idle))])


class Ticket:
    """One request's admitted images: each is handed to the queue (``handed``) or given back at close."""

    def __init__(self, ledger: QueueLedger, n: int) -> None:
        self.ledger = ledger
        self.size = n
        self.pending = n
        self.closed = False

    def handed(self) -> None:
        """One image went into the queue: from now on the worker that takes it accounts for it."""
        if self.closed:  # queued after the request gave its images back: count it again, the worker will take it
            self.ledger.put(1, again=True)
        else:
            self.pending -= 1
            self.ledger.put(1)

    def close(self) -> None:
        if not self.closed:
            self.ledger.release(self.pending, answered=self.size)
            self.pending = 0
            self.closed = True

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DrainRate:
    """Images per second taken off the queue, over the last few seconds (per process, no I/O)."""

    def __init__(self, read: Callable[[], int], clock: Callable[[], float] = time.monotonic) -> None:
        self.read = read
        self.clock = clock
        self.samples: deque[tuple[float, int]] = deque(maxlen=RATE_SAMPLES)

    def __call__(self) -> float:
        now, taken = self.clock(), self.read()
        if not self.samples or now - self.samples[-1][0] >= RATE_SAMPLE_S:
            self.samples.append((now, taken))
        first_t, first_n = self.samples[0]
        return (taken - first_n) / (now - first_t) if now - first_t >= RATE_SAMPLE_S else 0.0


class Admission:
    """The API-server side of shedding. ``bound`` is ``--max-queue``: an int, the most images
    waiting (0: unbounded), or None for auto: the most images in the server, about ``AUTO_QUEUE_S``
    of work at the measured drain rate, at least ``floor`` (two full batches per worker: one
    running, one waiting for it, so no worker waits for a batch to fill) and at most
    ``AUTO_QUEUE_MAX`` (or ``floor`` if larger)."""

    def __init__(self, ledger: QueueLedger, bound: int | None, floor: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = ledger
        self.fixed = bound
        self.floor = floor
        self.rate = DrainRate(ledger.taken, clock)

    def bound(self) -> int:
        if self.fixed is not None:
            return self.fixed
        return min(max(self.floor, int(self.rate() * AUTO_QUEUE_S)), max(self.floor, AUTO_QUEUE_MAX))

    def admit(self, n: int) -> Ticket:
        """Admit ``n`` images (all or none). Raises Overloaded (503 with Retry-After) over the bound."""
        bound = self.bound()
        if not self.ledger.try_admit(n, bound, held=self.fixed is None):
            raise self._refusal(bound)
        return Ticket(self.ledger, n)

    def refusal(self, n: int) -> Overloaded | None:
        """The Overloaded that ``admit(n)`` would raise now, admitting nothing (None: it would admit).
        For refusing before any work is spent on a request; ``admit`` still decides."""
        bound = self.bound()
        return self._refusal(bound) if bound and self.counted() + n > bound else None

    def counted(self) -> int:
        """What the bound holds: the images waiting (a number) or in the server (auto)."""
        return self.ledger.depth() if self.fixed is not None else self.ledger.held()

    def _refusal(self, bound: int) -> Overloaded:
        counted, retry_after = self.counted(), self.retry_after()
        what = "waiting" if self.fixed is not None else "in the server (waiting or running)"
        return Overloaded(f"overloaded: {counted} images are {what}, the bound is {bound} "
                          f"(--max-queue {self.fixed if self.fixed is not None else 'auto'}); "
                          f"retry after {retry_after} s", retry_after=retry_after)

    def retry_after(self) -> int:
        """Whole seconds until the images the bound holds, as they are now, are through at the
        measured rate (at least 1)."""
        rate = self.rate()
        if rate <= 0:
            return 1
        return max(1, math.ceil(self.counted() / rate))
