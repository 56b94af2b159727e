"""HTTP routes: thin adapters from request shapes to the one inference path in ``Dispatcher``.

Every error is a ``RequestError`` mapped to its status in one place (``error_response``);
nothing reaches LitServe's generic 500 handler, and no body carries a trace or a path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from service.dispatch import Dispatcher, ModelView, Result
from service.errors import NotReady, RequestError
from service.predict_protocol import parse_predict, predict_body

log = logging.getLogger("headswap.http")

Handler = Callable[[Request], Awaitable[Response]]


def error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


def model_headers(result: Result) -> dict[str, str]:
    return {"X-Model-Version": result.version, "X-Model-Slot": result.slot, "X-Batch-Size": str(result.batch_size)}


class ServedContext:
    """What the routes of one server share: the dispatcher, the served slots and readiness."""

    def __init__(self, dispatcher: Dispatcher, model_name: str, views: Callable[[], dict[str, ModelView]],
                 is_ready: Callable[[], bool], is_serving: Callable[[], bool], max_image_bytes: int) -> None:
        self.dispatcher = dispatcher
        self.model_name = model_name
        self.views = views
        self.is_ready = is_ready
        self.is_serving = is_serving
        self.max_image_bytes = max_image_bytes

    def route(self, request: Request) -> str:
        """The slot that answers this request."""
        return "stable"

    def require_serving(self) -> None:
        if not self.is_serving():
            raise NotReady("not ready: no inference worker has the model loaded yet", reason="not_ready")


class Routes:
    """/predict, /health and /ready."""

    def __init__(self, ctx: ServedContext) -> None:
        self.ctx = ctx

    def install(self, app: FastAPI) -> None:
        """Replace LitServe's /predict and /health with ours and add /ready."""
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in ("/predict", "/health", "/")]
        app.add_api_route("/predict", guarded(self.predict), methods=["POST"], openapi_extra=PREDICT_OPENAPI,
                          summary="Classify one image", response_model=None)
        app.add_api_route("/health", self.health, methods=["GET"], summary="Liveness: the process answers")
        app.add_api_route("/ready", self.ready, methods=["GET"], summary="Readiness: every worker loaded and warm")

    async def predict(self, request: Request) -> Response:
        self.ctx.require_serving()
        parsed = await parse_predict(request, self.ctx.max_image_bytes)
        slot = self.ctx.route(request)
        image = await self.ctx.dispatcher.preprocess(parsed.image, self.ctx.views()[slot].meta)
        result = await self.ctx.dispatcher.infer(request, image, slot=slot, top_k=parsed.top_k)
        return JSONResponse(predict_body(result, self.ctx.model_name), headers=model_headers(result))

    async def health(self) -> Response:
        return JSONResponse({"status": "alive"})

    async def ready(self) -> Response:
        if self.ctx.is_ready():
            views = self.ctx.views()
            return JSONResponse({"status": "ready", "model": self.ctx.model_name,
                                 "versions": {slot: view.version for slot, view in views.items()}})
        return JSONResponse({"status": "not ready"}, status_code=503)


def guarded(handler: Handler) -> Handler:
    """Turn RequestErrors into their status and anything unexpected into a bare 500."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except RequestError as exc:
            return error_response(exc)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            return JSONResponse({"error": "internal server error"}, status_code=500)

    endpoint.__name__ = handler.__name__
    return endpoint


PREDICT_OPENAPI: dict[str, Any] = {
    "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}}],
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
