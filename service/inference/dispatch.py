"""The API-server side of inference: preprocess off the event loop, queue, await the answer.

Runs in each forked API-server process. Image decoding and resizing run in a thread pool
(PIL and torch release the GIL), so they overlap with the workers' forward passes instead
of running in series with them inside the worker; a lone small image that finds its process
idle is decoded on the event loop itself, sparing a lone client the hand-off. With
``decode_on_worker`` (``--decode-on worker``), JPEGs the worker's device can decode travel as
bytes once their header passed the limits here, and the worker decodes them in batches
(nvJPEG on a GPU). Items reach the
workers through the request queue (``service.inference.request_queue``), put by a thread of
this process so that the event loop never waits for it; their answers come back into
LitServe's response buffer (over this process's answer socket, ``service.inference.answers``); each
one is awaited until its deadline (``timeout_s``, or sooner where the request asks), which
also travels with the item: a worker refuses an item whose deadline passed before it took it.
A request's images are admitted before they are decoded (``service.inference.admission``): over the
bound, the request is refused whole with a 503.

Each queued item carries ``arriving``: how many more images this process will queue soon
(being decoded now, or later items of the same request). A worker waits for its batch to
fill only while that is above zero, so a lone request does not sit out the batch timeout.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from litserve.server import ResponseBufferItem
from litserve.utils import LitAPIStatus
from PIL import Image

from models import CheckpointMeta
from models.transforms import resize_crop
from service.errors import GatewayTimeout, NotReady, Overloaded, by_name
from service.inference.admission import Admission, Ticket
from service.inference.answers import to_buffer
from service.inference.decode import DecodeLimits, check_image, decode_checked, device_decodable
from service.inference.request_queue import Feeder, Item

INLINE_MAX_PIXELS = 1_000_000  # an idle process decodes an image up to this size on its event loop (a few ms)


@dataclass(frozen=True)
class ModelView:
    """What the HTTP side knows of a served slot."""

    name: str
    version: str
    meta: CheckpointMeta


@dataclass
class Result:
    """One image's answer as the worker sent it, plus the timings the HTTP side measured."""

    probabilities: np.ndarray
    top: list[tuple[str, int, float]]
    version: str
    slot: str
    batch_size: int
    queue_wait_s: float
    shadow: tuple[str, int] | None = None  # the canary's version and top class, when it shadowed this image


class Dispatcher:
    def __init__(self, server: Any, requests: Any, limits: DecodeLimits, timeout_s: float, threads: int, *,
                 admission: Admission, decode_on_worker: bool = False) -> None:
        """``server``: the LitServer (its response buffer and this process's answer channel);
        ``requests``: the request queue (``service.inference.request_queue``)."""
        self.server = server
        self.admission = admission
        self.decode_on_worker = decode_on_worker
        self.feeder = Feeder(requests, self._unqueued)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.limits = limits
        self.timeout_s = timeout_s
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._decoding = 0  # images of this process in the decode pool (event-loop thread only)

    def _executor(self) -> ThreadPoolExecutor:
        # API servers are forked after this object is built; threads do not survive a fork.
        if self._pool_pid != os.getpid():
            torch.set_num_threads(1)
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
            self._pool_pid = os.getpid()
        assert self._pool is not None
        return self._pool

    async def preprocess(self, data: bytes, meta: CheckpointMeta, *, alone: bool = False) -> torch.Tensor | bytes:
        """Encoded bytes -> uint8 (3, S, S) for ``meta``'s model; or, decoding on the worker, the bytes
        of a JPEG it can decode, header checked. Raises RequestError (4xx).

        ``alone``: the request's only image. When this process is idle besides it (nothing decoding,
        nothing awaiting a worker) and it is small (INLINE_MAX_PIXELS), it is decoded right here on
        the event loop, which has nothing else to do: the hand-off to a decode thread and back costs
        a lone client about 0.7 ms per request on 2 cores."""
        executor = self._executor()  # also sets this forked process's torch to one thread, inline too
        work = functools.partial(_prepare, data, self.limits, meta, self.decode_on_worker)
        if alone and not self._decoding and not self.server.response_buffer:
            image = check_image(data, self.limits)
            work = functools.partial(_finish, data, image, meta, self.decode_on_worker)  # its header is checked
            if image.width * image.height <= INLINE_MAX_PIXELS:
                return work()
        loop = asyncio.get_running_loop()
        self._decoding += 1
        try:
            return await loop.run_in_executor(executor, work)
        finally:
            self._decoding -= 1

    def deadline(self, request_timeout_s: float | None = None, *, since: float | None = None) -> float:
        """The time.monotonic by which a request that arrived at ``since`` (default: now) must be answered:
        ``timeout_s`` later, or sooner if the request asked for less."""
        budget = self.timeout_s if request_timeout_s is None else min(self.timeout_s, request_timeout_s)
        return (time.monotonic() if since is None else since) + budget

    async def infer(self, image: torch.Tensor | bytes, *, model: str, slot: str, top_k: int, deadline: float,
                    ticket: Ticket | None = None, normalized: bool = False, following: int = 0,
                    shadow: bool = False) -> Result:
        """Queue one image (pixels, or JPEG bytes from ``preprocess``) for ``model``'s ``slot`` and await its answer
        until ``deadline`` (time.monotonic); ``ticket``: the request's admission, handed the image once it is
        queued; ``following``: images of the same request queued right after this one; ``shadow``: the
        worker also runs the model's canary on it and says its top class. Raises RequestError subclasses."""
        payload: dict[str, Any] = {"model": model, "slot": slot, "top_k": top_k, "arriving": self._decoding + following,
                                   "deadline": deadline, "shadow": shadow}
        if isinstance(image, bytes):
            payload["jpeg"] = image
        else:
            array = image.contiguous().numpy()
            payload.update(data=array.tobytes(), shape=list(array.shape), dtype="float32" if normalized else "uint8")
        uid = uuid.uuid4().hex
        event = asyncio.Event()
        self.server.response_buffer[uid] = ResponseBufferItem(event=event)
        arrived = time.monotonic()
        budget = max(0.0, deadline - arrived)
        self._loop = asyncio.get_running_loop()
        try:
            self.feeder.put((self.server.app.response_queue_id, uid, arrived, payload))  # this API server's answer channel
            if ticket is not None:
                ticket.handed()
            await asyncio.wait_for(event.wait(), budget)
            data, _status = self.server.response_buffer[uid].response
        except (asyncio.TimeoutError, TimeoutError):
            raise GatewayTimeout(f"no answer by the request's deadline ({budget:.3f} s after "
                                 "it was queued: --timeout-s or the request's own timeout)", reason="timeout") from None
        finally:
            self.server.response_buffer.pop(uid, None)
        return _result(data, arrived, self.admission)

    def _unqueued(self, items: list[Item]) -> None:
        """From the feeder's thread: ``items`` never reached the queue (its process is gone: the
        server is stopping, or it was killed). Their requests are answered 503 now rather than at
        their deadline."""
        if self._loop is None:
            return
        deliver = to_buffer(self.server.response_buffer, LitAPIStatus.OK)
        refusal = {"error": "the request queue is gone (the server is stopping); retry", "type": NotReady.__name__,
                   "reason": "stopping"}
        for _, uid, _, _ in items:
            try:
                self._loop.call_soon_threadsafe(deliver, uid, refusal)
            except RuntimeError:  # the loop is closed: nobody awaits them any more
                return


def _prepare(data: bytes, limits: DecodeLimits, meta: CheckpointMeta, on_worker: bool) -> torch.Tensor | bytes:
    return _finish(data, check_image(data, limits), meta, on_worker)


def _finish(data: bytes, image: Image.Image, meta: CheckpointMeta, on_worker: bool) -> torch.Tensor | bytes:
    """``data``, whose header passed the limits (``image``, opened lazily), prepared for the queue."""
    if on_worker and device_decodable(data, image):
        return data
    return resize_crop(meta)(decode_checked(data, image)).contiguous()


def _result(data: Any, arrived: float, admission: Admission) -> Result:
    """A worker's answer as a Result, or its refusal as the error it raised (sent by type name)."""
    if not isinstance(data, dict):
        raise NotReady("the inference worker went away; retry", reason="worker_lost")
    if "error" in data:
        error, reason = by_name(data.get("type", "")), data.get("reason", "inference")
        if issubclass(error, Overloaded):  # not run: it waited past --max-queue-wait-ms
            raise Overloaded(data["error"], retry_after=admission.retry_after(), reason=reason)
        raise error(data["error"], reason=reason)
    return Result(
        probabilities=np.frombuffer(data["probabilities"], dtype=np.float32),
        top=[tuple(t) for t in data["top"]],
        version=data["version"],
        slot=data["slot"],
        batch_size=data["batch_size"],
        queue_wait_s=max(0.0, data["started"] - arrived),
        shadow=tuple(data["shadow"]) if data.get("shadow") else None,
    )
