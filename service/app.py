"""HTTP routes: thin adapters from request shapes to the one inference path in ``Dispatcher``.

Every error is a ``RequestError`` mapped to its status in one place (``error_response``);
nothing reaches LitServe's generic 500 handler, and no body carries a trace or a path. The
``instrumented`` wrapper counts every finished inference request once, whatever its fate.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from service.admission import Admission, Ticket
from service.controller import Controller
from service.dispatch import Dispatcher, ModelView, Result
from service.errors import NotReady, Overloaded, RequestError
from service.metrics import Metrics
from service.predict_protocol import WHOLE_NUMBER, parse_predict, predict_body
from service.routing import CanaryGuard, choose_slot
from service.slots import ServingState, SharedState

log = logging.getLogger("headswap.http")

Handler = Callable[[Request], Awaitable[Response]]
TIMEOUT_HEADER = "x-request-timeout-ms"


def error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(exc), **exc.details}, status_code=exc.status, headers=exc.headers or None)


def model_headers(result: Result) -> dict[str, str]:
    return {"X-Model-Version": result.version, "X-Model-Slot": result.slot, "X-Batch-Size": str(result.batch_size)}


class ServedContext:
    """What the routes of one server share: dispatcher, shared state, readiness, metrics, guard."""

    def __init__(self, dispatcher: Dispatcher, model_name: str, shared: SharedState, *, is_ready: Callable[[], bool],
                 is_serving: Callable[[], bool], max_image_bytes: int, metrics: Metrics, guard: CanaryGuard,
                 controller: Controller) -> None:
        self.dispatcher = dispatcher
        self.model_name = model_name
        self.shared = shared
        self.is_ready = is_ready
        self.is_serving = is_serving
        self.max_image_bytes = max_image_bytes
        self.metrics = metrics
        self.guard = guard
        self.controller = controller
        self._views: tuple[int, dict[str, ModelView]] = (-1, {})
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def admission(self) -> Admission:
        assert self.dispatcher.admission is not None, "a served context admits through its dispatcher"
        return self.dispatcher.admission

    def state(self) -> ServingState:
        return self.shared.read()

    def views(self) -> dict[str, ModelView]:
        state = self.state()
        if self._views[0] != state.generation:
            self._views = (state.generation, {slot: ModelView(self.model_name, spec.version, spec.checkpoint_meta)
                                              for slot, spec in state.slots().items()})
        return self._views[1]

    def route(self, request: Request) -> str:
        """The slot that answers this request (canary weight, sticky by X-Request-Key)."""
        state = self.state()
        slot = choose_slot(state.weight, state.canary is not None, request.headers.get("x-request-key"))
        request.state.slot = slot
        return slot

    def require_serving(self) -> None:
        if not self.is_serving():
            raise NotReady("not ready: no inference worker has the model loaded yet", reason="not_ready")

    def deadline(self, request: Request, timeout_s: float | None = None, *, since: float | None = None) -> float:
        """When this request must be answered: --timeout-s after ``since`` (default: now), or sooner if its
        X-Request-Timeout-Ms header (or ``timeout_s``, from the body) asks. Raises RequestError for a
        malformed header."""
        budgets = [t for t in (timeout_s, header_timeout_s(request)) if t is not None]
        return self.dispatcher.deadline(min(budgets) if budgets else None, since=since)

    def admit(self, images: int) -> Ticket:
        """Admit a request's images, all or none. Raises Overloaded (503, Retry-After) over --max-queue."""
        try:
            return self.admission.admit(images)
        except Overloaded:
            self.metrics.rejected.labels("overload").inc(images)
            raise

    async def infer(self, request: Request, image: torch.Tensor | bytes, *, slot: str, top_k: int, deadline: float,
                    ticket: Ticket, normalized: bool = False, following: int = 0) -> Result:
        """One admitted image through the chosen slot, with canary bookkeeping and shadowing."""
        try:
            result = await self.dispatcher.infer(request, image, slot=slot, top_k=top_k, deadline=deadline,
                                                 ticket=ticket, normalized=normalized, following=following)
        except RequestError as exc:
            canary = self.state().canary
            if slot == "canary" and exc.status >= 500 and canary is not None:
                self._judge(self.guard.record_canary(canary.version, True))
            raise
        if result.slot == "canary":
            self._judge(self.guard.record_canary(result.version, False))
        state = self.state()
        if result.slot == "stable" and state.canary is not None and state.shadow and random.random() * 100 < state.shadow:
            task = asyncio.get_running_loop().create_task(self._shadow(request, image, result, normalized))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return result

    async def _shadow(self, request: Request, image: torch.Tensor | bytes, stable: Result, normalized: bool) -> None:
        """Run a stable-served image on the canary off the response path; count top-1 agreement.
        Best effort: skipped when the queue is full."""
        ticket = self.admission.try_admit(1)
        if ticket is None:
            return
        try:
            with ticket:
                canary = await self.dispatcher.infer(request, image, slot="canary", top_k=1, normalized=normalized,
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
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._auto_rollback, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _auto_rollback(self, reason: str) -> None:
        try:
            self.controller.rollback(caller="guard", reason=reason)
        except RequestError as exc:  # already rolled back by another process
            log.info("guard rollback skipped: %s", exc)


class Routes:
    """/predict, /health and /ready."""

    def __init__(self, ctx: ServedContext) -> None:
        self.ctx = ctx

    def install(self, app: FastAPI) -> None:
        """Replace LitServe's /predict and /health with ours and add /ready."""
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in ("/predict", "/health", "/")]
        app.add_api_route("/predict", instrumented(self.predict, "predict", self.ctx.metrics), methods=["POST"],
                          openapi_extra=PREDICT_OPENAPI, summary="Classify one image", response_model=None)
        app.add_api_route("/health", self.health, methods=["GET"], summary="Liveness: the process answers")
        app.add_api_route("/ready", self.ready, methods=["GET"], summary="Readiness: every worker loaded and warm")

    async def predict(self, request: Request) -> Response:
        self.ctx.require_serving()
        deadline = self.ctx.deadline(request)
        parsed = await parse_predict(request, self.ctx.max_image_bytes)
        with self.ctx.admit(1) as ticket:
            slot = self.ctx.route(request)
            image = await self.ctx.dispatcher.preprocess(parsed.image, self.ctx.views()[slot].meta)
            result = await self.ctx.infer(request, image, slot=slot, top_k=parsed.top_k, deadline=deadline, ticket=ticket)
        return JSONResponse(predict_body(result, self.ctx.model_name), headers=model_headers(result))

    async def health(self) -> Response:
        return JSONResponse({"status": "alive"})

    async def ready(self) -> Response:
        if self.ctx.is_ready():
            return JSONResponse({"status": "ready", "model": self.ctx.model_name,
                                 "versions": {slot: view.version for slot, view in self.ctx.views().items()}})
        return JSONResponse({"status": "not ready"}, status_code=503)


def header_timeout_s(request: Request) -> float | None:
    """The X-Request-Timeout-Ms header in seconds (None: absent). Raises RequestError unless a positive integer."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    value = value.strip()
    if not WHOLE_NUMBER.fullmatch(value) or len(value) > 12 or int(value) < 1:
        raise RequestError(f"X-Request-Timeout-Ms must be a positive whole number of milliseconds, found {value[:20]!r}",
                           reason="timeout_header")
    return int(value) / 1000


def guarded(handler: Handler) -> Handler:
    """Turn RequestErrors into their status and anything unexpected into a bare 500."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except RequestError as exc:
            request.state.error_reason = exc.reason
            return error_response(exc)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            return JSONResponse({"error": "internal server error"}, status_code=500)

    endpoint.__name__ = handler.__name__
    return endpoint


def instrumented(handler: Handler, endpoint_label: str, metrics: Metrics) -> Handler:
    """``guarded`` plus the request metrics: in-flight, count by status and slot, duration."""
    inner = guarded(handler)

    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        metrics.inflight.inc()
        try:
            response = await inner(request)
        finally:
            metrics.inflight.dec()
        status = response.status_code
        slot = response.headers.get("x-model-slot") or getattr(request.state, "slot", None) or "none"
        metrics.requests.labels(endpoint_label, str(status), slot).inc()
        metrics.request_duration.labels(endpoint_label).observe(time.perf_counter() - started)
        if 400 <= status < 500:
            metrics.input_errors.labels(getattr(request.state, "error_reason", "invalid")).inc()
        return response

    endpoint.__name__ = handler.__name__
    return endpoint


TIMEOUT_PARAMETER: dict[str, Any] = {
    "name": "X-Request-Timeout-Ms", "in": "header", "required": False,
    "description": "answer within this many milliseconds or not at all (504); shortens --timeout-s for this request",
    "schema": {"type": "integer", "minimum": 1, "maximum": 10**12 - 1}}
PREDICT_OPENAPI: dict[str, Any] = {
    "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}},
                   {"name": "X-Request-Key", "in": "header", "required": False, "schema": {"type": "string"}},
                   TIMEOUT_PARAMETER],
    "requestBody": {
        "required": True,
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/jpeg", "image/png", "image/webp", "application/octet-stream")},
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary"}, "top_k": {"type": "integer", "minimum": 1}}}},
            "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "description": "base64 image bytes"}, "top_k": {"type": "integer", "minimum": 1}}}},
        },
    },
}
