"""Refusing a /predict request before any work is spent on it, when the queue is already full.

Under overload most requests are refused; each refusal should cost as little as a server can
make it. ``ShedEarly`` is ASGI middleware outside routing: a ``POST /predict`` (or
``/models/{name}/predict``) that arrives
while the queue has no room for one more image gets its 503 (``Retry-After``, the same error
body and metrics as a refusal by the route) without its body being read or parsed, without
FastAPI's routing, dependencies and exception layers. It only looks: the route still admits,
so a request that passes here can still be refused there; one refused here might have found room
by the time its body was read, which is the price of refusing early (the queue was full when it
arrived). A V2 request is left to its route, which knows how many images it holds.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from service.errors import Overloaded
from service.http.errors import error_response
from service.observability.metrics import Metrics

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ShedEarly:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *,
                 refusal: Callable[[int], Overloaded | None], metrics: Metrics, model_label: Callable[[str | None], str]) -> None:
        self.app = app
        self.refusal = refusal
        self.metrics = metrics
        self.model_label = model_label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not _is_predict(scope["path"]):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        refused = self.refusal(1)
        if refused is None:
            await self.app(scope, receive, send)
            return
        response = error_response(refused)  # the route's own answer to Overloaded: body, status, Retry-After
        await response(scope, receive, send)
        self.metrics.rejected.labels(refused.reason).inc()
        model = self.model_label(_model_named(scope["path"]))
        self.metrics.requests.labels("predict", str(response.status_code), "none", model).inc()
        self.metrics.request_duration.labels("predict", model).observe(time.perf_counter() - started)


def _is_predict(path: str) -> bool:
    """``/predict`` or ``/models/{name}/predict`` (a name without slashes)."""
    return path == "/predict" or bool(_model_named(path))


def _model_named(path: str) -> str | None:
    """The ``name`` of ``/models/{name}/predict``; None for any other path."""
    head, _, name = path.removesuffix("/predict").partition("/models/")
    return name if path.endswith("/predict") and head == "" and name and "/" not in name else None
