"""The data plane: "infer these images" for every protocol, in one place.

``DataPlane.infer`` takes an ``InferenceRequest`` (encoded images or normalised pixels, top-k,
the request's own timeout, the model it names, its routing key or pinned version) and returns an
``Inference`` or raises a typed ``RequestError``. On the way it checks that a worker can answer,
admits the request's images (all or none, before decoding), chooses the model's slot (its canary
weight, sticky by key, or the pinned version's), decodes off the event loop, queues every image
and awaits them until the deadline, and keeps each canary's books: its errors and shadow
agreements feed the guard, which rolls that model's canary back when it breaks the policy. The HTTP routes (and any later protocol)
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
from service.control.slots import SLOT_NAMES, ModelState, ServingState, SharedState, SlotSpec
from service.errors import SERVER_SIDE, NotFound, NotReady, Overloaded, RequestError
from service.inference.admission import Ticket
from service.inference.dispatch import Dispatcher, ModelView, Result
from service.observability.metrics import NO_MODEL, Metrics, model_label
from service.protocols.admin import check_model_name

log = logging.getLogger("headswap.inference")
T = TypeVar("T")


@dataclass(frozen=True)
class InferenceRequest:
    """One request's images, from any protocol: ``images`` (encoded bytes) or ``pixels`` (normalised
    float32, (B, 3, S, S)); ``model`` the served model's name (None: the default one); ``timeout_s`` is the request's own budget (it can only shorten
    --timeout-s), counted from ``started``; ``key`` makes canary routing sticky; ``version`` pins
    the served version that must answer (None: route by the canary weight)."""

    images: Sequence[bytes] | None = None
    pixels: np.ndarray | None = None
    top_k: int = 5
    timeout_s: float | None = None
    started: float = field(default_factory=time.monotonic)
    key: str | None = None
    version: str | None = None
    model: str | None = None

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
    """Inference for every model of one server; one per API-server process (built before they fork)."""

    def __init__(self, dispatcher: Dispatcher, shared: SharedState, *, is_ready: Callable[[], bool],
                 is_serving: Callable[[], bool], metrics: Metrics, guard: CanaryGuard, controller: Controller,
                 metrics_max_models: int = 100) -> None:
        self.dispatcher = dispatcher
        self.shared = shared
        self.is_ready = is_ready
        self.is_serving = is_serving
        self.metrics = metrics
        self.guard = guard
        self.controller = controller
        self.metrics_max_models = metrics_max_models
        self._views: tuple[int, dict[str, dict[str, ModelView]]] = (-1, {})
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- what is served ---------------------------------------------------------------------
    def state(self) -> ServingState:
        return self.shared.read()

    @property
    def default_model(self) -> str:
        return self.state().default

    def models(self) -> list[str]:
        """The served models' names, the default first."""
        return self.state().names()

    def views(self, model: str | None = None) -> dict[str, ModelView]:
        """Each served slot of ``model`` (None: the default): its name, version and metadata (rebuilt
        only when the state changes). Raises NotFound for a model not served."""
        state = self.state()
        if self._views[0] != state.generation:
            self._views = (state.generation, {
                name: {slot: ModelView(name, spec.version, spec.checkpoint_meta) for slot, spec in served.slots().items()}
                for name, served in state.models.items()})
        return self._views[1][self.model_of(model)]

    def model_of(self, name: str | None) -> str:
        """The served model ``name`` (None: the default). Raises RequestError (400) for a name that
        no model can have, NotFound naming the served ones."""
        if name is not None:
            check_model_name(name)
        return self.state().name_of(name)

    def resolve(self, name: str | None, version: str | None = None) -> str | None:
        """The slot serving ``version`` of model ``name`` (None: no version pinned). Raises NotFound."""
        views = self.views(name)
        if version is None:
            return None
        for slot in SLOT_NAMES:
            if slot in views and views[slot].version == version:
                return slot
        raise NotFound(f"model {self.model_of(name)!r} has no served version {version[:80]!r} (serving: "
                       f"{', '.join(v.version for v in views.values())})", reason="version")

    def metric_model(self, name: str | None) -> str:
        """The ``model`` metrics label of a request that names ``name`` (None: the default model):
        "none" when it names no served model, "other" beyond --metrics-max-models."""
        state = self.state()
        name = state.default if name is None else name
        if name not in state.models:
            return NO_MODEL
        return model_label(name, state.names(), self.metrics_max_models)

    def resident(self) -> set[str]:
        """The served models whose weights every inference worker holds."""
        return self.shared.held()[1] & set(self.state().models)

    def view_of(self, model: str, version: str) -> ModelView | None:
        """The served slot's view of ``model`` that has ``version`` (the canary may have other classes)."""
        return next((view for view in self.views(model).values() if view.version == version), None)

    # ---- inference --------------------------------------------------------------------------
    async def infer(self, request: InferenceRequest, *, routed: Callable[[str], None] | None = None) -> Inference:
        """Run every image of ``request`` on one slot of its model. ``routed`` hears the slot once it is chosen.

        Raises NotReady (no worker yet), NotFound (a model or pinned version nobody serves), Overloaded
        (over --max-queue: nothing was queued), GatewayTimeout (past the deadline) and the
        errors of decoding and of the worker (the first, once every image has finished)."""
        if not self.is_serving():
            raise NotReady("not ready: no inference worker has the model loaded yet", reason="not_ready")
        model = self.model_of(request.model)
        deadline = self.dispatcher.deadline(request.timeout_s, since=request.started)
        with self._admit(request.size) as ticket:  # the whole request, or none of it
            slot = self._slot(model, request)
            if routed is not None:
                routed(slot)
            view = self.views(model)[slot]
            if request.images is not None:
                images: list[torch.Tensor | bytes] = await gather(
                    self.dispatcher.preprocess(d, view.meta, alone=len(request.images) == 1) for d in request.images)
                normalized = False
            else:
                assert request.pixels is not None
                images, normalized = list(torch.from_numpy(request.pixels)), True
            results = await gather(
                self._one(image, model=model, slot=slot, top_k=request.top_k, deadline=deadline, ticket=ticket,
                          normalized=normalized, following=len(images) - 1 - i) for i, image in enumerate(images))
        return Inference(results, self.view_of(model, results[0].version) or view)

    def _admit(self, images: int) -> Ticket:
        admission = self.dispatcher.admission
        try:
            return admission.admit(images)
        except Overloaded:
            self.metrics.rejected.labels("overload").inc(images)
            raise

    def _slot(self, model: str, request: InferenceRequest) -> str:
        if request.version is not None:
            slot = self.resolve(model, request.version)
            assert slot is not None
            return slot
        served = self.state().model(model)
        return choose_slot(served.weight, served.canary is not None, request.key)

    async def _one(self, image: torch.Tensor | bytes, *, model: str, slot: str, top_k: int, deadline: float,
                   ticket: Ticket, normalized: bool, following: int) -> Result:
        """One admitted image through ``model``'s ``slot``, with the canary's bookkeeping. A stable-served
        image is shadowed on the canary (its share of them) in the same batch: the worker runs it through
        the canary too (one more head when the canary shares the backbone) and says its top class."""
        served = self._served(model)
        shadow = slot == "stable" and served.canary is not None and served.shadow > 0 and random.random() * 100 < served.shadow
        try:
            result = await self.dispatcher.infer(image, model=model, slot=slot, top_k=top_k, deadline=deadline,
                                                 ticket=ticket, normalized=normalized, following=following, shadow=shadow)
        except RequestError as exc:
            canary = self._served(model).canary
            if slot == "canary" and isinstance(exc, SERVER_SIDE) and canary is not None:
                self._judge(model, self.guard.record_canary(canary.version, True))
            raise
        self.metrics.queue_wait.labels(self.metric_model(model)).observe(result.queue_wait_s)
        if result.slot == "canary":
            self._judge(model, self.guard.record_canary(result.version, False))
        if result.shadow is not None:
            version, top = result.shadow
            agree = top == result.top[0][1]
            self.metrics.shadow_comparisons.inc()
            if agree:
                self.metrics.shadow_agreements.inc()
            self._judge(model, self.guard.record_shadow(version, agree))
        return result

    def _served(self, model: str) -> ModelState:
        """Model ``model``'s state; an empty one once it is no longer served (unloaded meanwhile)."""
        served = self.state().models.get(model)
        return served if served is not None else ModelState(stable=SlotSpec(checkpoint=""))

    def _judge(self, model: str, reason: str | None) -> None:
        if reason is None:
            return
        log.warning("canary guard: %s, rolling back the canary of %s", reason, model)
        self._spawn(asyncio.to_thread(self._auto_rollback, model, reason))

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _auto_rollback(self, model: str, reason: str) -> None:
        try:
            self.controller.rollback(caller="guard", reason=reason, model=model)
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
