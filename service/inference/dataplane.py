"""The data plane: "infer these images" for every protocol, in one place.

``DataPlane.infer`` takes an ``InferenceRequest`` (encoded images or normalised pixels, top-k,
the request's own timeout, its routing key or pinned version) and returns an ``Inference`` or
raises a typed ``RequestError``. On the way it checks that a worker can answer, admits the
request's images (all or none, before decoding), chooses the slot (canary weight, sticky by key,
or the pinned version's), decodes off the event loop, queues every image and awaits them until
the deadline, and keeps the canary's books: its errors and shadow agreements feed the guard,
which rolls the canary back when it breaks the policy. The HTTP routes (and any later protocol)
only translate their wire format to and from these types.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from service.control.controller import Controller
from service.control.routing import CanaryGuard, choose_slot
from service.control.slots import SLOT_NAMES, ServingState, SharedState
from service.errors import SERVER_SIDE, NotFound, NotReady, Overloaded, RequestError
from service.inference.admission import Ticket
from service.inference.dispatch import Dispatcher, ModelView, Result
from service.observability.metrics import Metrics

log = logging.getLogger("headswap.inference")
T = TypeVar("T")


@dataclass(frozen=True)
class InferenceRequest:
    """One request's images, from any protocol: ``images`` (encoded bytes) or ``pixels`` (normalised
    float32, (B, 3, S, S)); ``timeout_s`` is the request's own budget (it can only shorten
    --timeout-s), counted from ``started``; ``key`` makes canary routing sticky; ``version`` pins
    the served version that must answer (None: route by the canary weight)."""

    images: Sequence[bytes] | None = None
    pixels: np.ndarray | None = None
    top_k: int = 5
    timeout_s: float | None = None
    started: float = field(default_factory=time.monotonic)
    key: str | None = None
    version: str | None = None

    @property
    def size(self) -> int:
        return len(self.images) if self.images is not None else 0 if self.pixels is None else int(self.pixels.shape[0])


@dataclass(frozen=True)
class Inference:
    """Every image's result, in request order, and the version that answered."""

    results: list[Result]
    view: ModelView

    @property
    def first(self) -> Result:
        return self.results[0]


class DataPlane:
    """Inference for one server's model; one per API-server process (built before they fork)."""

    def __init__(self, dispatcher: Dispatcher, model_name: str, shared: SharedState, *, is_ready: Callable[[], bool],
                 is_serving: Callable[[], bool], metrics: Metrics, guard: CanaryGuard, controller: Controller) -> None:
        self.dispatcher = dispatcher
        self.model_name = model_name
        self.shared = shared
        self.is_ready = is_ready
        self.is_serving = is_serving
        self.metrics = metrics
        self.guard = guard
        self.controller = controller
        self._views: tuple[int, dict[str, ModelView]] = (-1, {})
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- what is served ---------------------------------------------------------------------
    def state(self) -> ServingState:
        return self.shared.read()

    def views(self) -> dict[str, ModelView]:
        """Each served slot's name, version and metadata (rebuilt only when the state changes)."""
        state = self.state()
        if self._views[0] != state.generation:
            self._views = (state.generation, {slot: ModelView(self.model_name, spec.version, spec.checkpoint_meta)
                                              for slot, spec in state.slots().items()})
        return self._views[1]

    def resolve(self, name: str, version: str | None = None) -> str | None:
        """The slot serving ``version`` of model ``name`` (None: no version pinned). Raises NotFound."""
        if name != self.model_name:
            raise NotFound(f"unknown model {name!r}: this server serves {self.model_name!r}", reason="model")
        if version is None:
            return None
        views = self.views()
        for slot in SLOT_NAMES:
            if slot in views and views[slot].version == version:
                return slot
        raise NotFound(f"model {name!r} has no served version {version!r} (serving: "
                       f"{', '.join(v.version for v in views.values())})", reason="version")

    def view_of(self, version: str) -> ModelView | None:
        """The served slot's view that has ``version`` (the canary may have other classes)."""
        return next((view for view in self.views().values() if view.version == version), None)

    # ---- inference --------------------------------------------------------------------------
    async def infer(self, request: InferenceRequest, *, routed: Callable[[str], None] | None = None) -> Inference:
        """Run every image of ``request`` on one slot. ``routed`` hears the slot once it is chosen.

        Raises NotReady (no worker yet), NotFound (a pinned version nobody serves), Overloaded
        (over --max-queue: nothing was queued), GatewayTimeout (past the deadline) and the
        errors of decoding and of the worker (the first, once every image has finished)."""
        if not self.is_serving():
            raise NotReady("not ready: no inference worker has the model loaded yet", reason="not_ready")
        deadline = self.dispatcher.deadline(request.timeout_s, since=request.started)
        with self._admit(request.size) as ticket:  # the whole request, or none of it
            slot = self._slot(request)
            if routed is not None:
                routed(slot)
            view = self.views()[slot]
            if request.images is not None:
                images: list[torch.Tensor | bytes] = await gather(self.dispatcher.preprocess(d, view.meta) for d in request.images)
                normalized = False
            else:
                assert request.pixels is not None
                images, normalized = list(torch.from_numpy(request.pixels)), True
            results = await gather(
                self._one(image, slot=slot, top_k=request.top_k, deadline=deadline, ticket=ticket, normalized=normalized,
                          following=len(images) - 1 - i) for i, image in enumerate(images))
        return Inference(results, self.view_of(results[0].version) or view)

    def _admit(self, images: int) -> Ticket:
        admission = self.dispatcher.admission
        try:
            return admission.admit(images)
        except Overloaded:
            self.metrics.rejected.labels("overload").inc(images)
            raise

    def _slot(self, request: InferenceRequest) -> str:
        if request.version is not None:
            slot = self.resolve(self.model_name, request.version)
            assert slot is not None
            return slot
        state = self.state()
        return choose_slot(state.weight, state.canary is not None, request.key)

    async def _one(self, image: torch.Tensor | bytes, *, slot: str, top_k: int, deadline: float, ticket: Ticket,
                   normalized: bool, following: int) -> Result:
        """One admitted image through ``slot``, with the canary's bookkeeping and shadowing."""
        try:
            result = await self.dispatcher.infer(image, slot=slot, top_k=top_k, deadline=deadline, ticket=ticket,
                                                 normalized=normalized, following=following)
        except RequestError as exc:
            canary = self.state().canary
            if slot == "canary" and isinstance(exc, SERVER_SIDE) and canary is not None:
                self._judge(self.guard.record_canary(canary.version, True))
            raise
        if result.slot == "canary":
            self._judge(self.guard.record_canary(result.version, False))
        state = self.state()
        if result.slot == "stable" and state.canary is not None and state.shadow and random.random() * 100 < state.shadow:
            self._spawn(self._shadow(image, result, normalized))
        return result

    async def _shadow(self, image: torch.Tensor | bytes, stable: Result, normalized: bool) -> None:
        """Run a stable-served image on the canary off the response path; count top-1 agreement.
        Best effort: skipped when the queue is full."""
        ticket = self.dispatcher.admission.try_admit(1)
        if ticket is None:
            return
        try:
            with ticket:
                canary = await self.dispatcher.infer(image, slot="canary", top_k=1, normalized=normalized,
                                                     deadline=self.dispatcher.deadline(), ticket=ticket)
        except RequestError:
            return
        if canary.slot != "canary":
            return  # the canary went away meanwhile
        agree = canary.top[0][1] == stable.top[0][1]
        self.metrics.shadow_comparisons.inc()
        if agree:
            self.metrics.shadow_agreements.inc()
        self._judge(self.guard.record_shadow(canary.version, agree))

    def _judge(self, reason: str | None) -> None:
        if reason is None:
            return
        log.warning("canary guard: %s, rolling back the canary", reason)
        self._spawn(asyncio.to_thread(self._auto_rollback, reason))

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _auto_rollback(self, reason: str) -> None:
        try:
            self.controller.rollback(caller="guard", reason=reason)
        except RequestError as exc:  # already rolled back by another process
            log.info("guard rollback skipped: %s", exc)


async def gather(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Every call's result; once all have finished (none is left running past the request and
    its admission), the first error among them is raised."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
