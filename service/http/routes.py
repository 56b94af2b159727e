"""/predict, /models/{name}/predict, /models, /health and /ready: thin adapters from the /predict
wire format to the data plane.

``instrumented`` counts every finished inference request once, whatever its fate (status and
slot labels, duration, in-flight); errors become their status in ``service.http.errors``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from service.errors import RequestError
from service.http.body import read_body, read_form
from service.http.errors import Handler, guarded
from service.inference.dataplane import DataPlane, InferenceRequest
from service.inference.dispatch import Result
from service.observability.metrics import Metrics
from service.protocols import predict
from service.protocols.catalog import Catalog, catalog_body
from service.protocols.predict import WHOLE_NUMBER
from service.protocols.wire import schema

TIMEOUT_HEADER = "x-request-timeout-ms"


def model_headers(result: Result) -> dict[str, str]:
    return {"X-Model-Version": result.version, "X-Model-Slot": result.slot, "X-Batch-Size": str(result.batch_size)}


class Routes:
    """/predict (the default model), /models/{name}/predict, /models, /health and /ready."""

    def __init__(self, plane: DataPlane, metrics: Metrics, max_image_bytes: int) -> None:
        self.plane = plane
        self.metrics = metrics
        self.max_image_bytes = max_image_bytes

    def install(self, app: FastAPI) -> None:
        """Replace LitServe's /predict and /health with ours and add /ready."""
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in ("/predict", "/health", "/")]
        app.add_api_route("/predict", instrumented(self.predict, "predict", self.metrics, self.plane.metric_model), methods=["POST"],
                          openapi_extra=PREDICT_OPENAPI, summary="Classify one image with the default model", response_model=None)
        app.add_api_route("/models/{name}/predict", instrumented(self.predict, "predict", self.metrics, self.plane.metric_model),
                          methods=["POST"],
                          openapi_extra={**PREDICT_OPENAPI, "parameters": [NAME_PARAMETER, *PREDICT_OPENAPI["parameters"]]},
                          summary="Classify one image with model {name}", response_model=None)
        app.add_api_route("/models", guarded(self.models), methods=["GET"], summary="Every served model",
                          response_model=None, openapi_extra=CATALOG_OPENAPI)
        app.add_api_route("/health", self.health, methods=["GET"], summary="Liveness: the process answers")
        app.add_api_route("/ready", self.ready, methods=["GET"], summary="Readiness: every worker loaded and warm")

    async def predict(self, request: Request) -> Response:
        started = time.monotonic()
        timeout_s = header_timeout_s(request)
        name = request.path_params.get("name")
        self.plane.model_of(name)  # an unknown model is a 404 before its body is read
        parsed = await self._parse(request)
        inference = await self.plane.infer(
            InferenceRequest(images=[parsed.image], top_k=parsed.top_k, timeout_s=timeout_s, started=started,
                             key=request.headers.get("x-request-key"), model=name),
            routed=lambda slot: setattr(request.state, "slot", slot))
        return JSONResponse(predict.predict_body(inference.first, inference.view.name), headers=model_headers(inference.first))

    async def models(self, request: Request) -> Response:
        return JSONResponse(catalog_body(self.plane.state(), self.plane.resident()))

    async def _parse(self, request: Request) -> predict.PredictRequest:
        """Any of the three input forms -> image bytes and top_k. Raises 400/413/415."""
        media = predict.media_type(request.headers.get("content-type"))
        body = await read_body(request, predict.body_limit(media, self.max_image_bytes))
        query_k = request.query_params.get("top_k")
        if media == predict.JSON:
            return predict.from_json(body, query_k, self.max_image_bytes)
        if media == predict.MULTIPART:
            return predict.from_form(*await read_form(request, body), query_k)
        return predict.from_raw(body, query_k)

    async def health(self) -> Response:
        return JSONResponse({"status": "alive"})

    async def ready(self) -> Response:
        if self.plane.is_ready():
            return JSONResponse({"status": "ready", "model": self.plane.default_model, "models": self.plane.models(),
                                 "versions": {slot: view.version for slot, view in self.plane.views().items()}})
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


def instrumented(handler: Handler, endpoint_label: str, metrics: Metrics, model_label: Callable[[str | None], str]) -> Handler:
    """``guarded`` plus the request metrics: in-flight, count by status, slot and model, duration.
    ``model_label`` labels the model a path names (its ``name``; None: the default model)."""
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
        model = model_label(request.path_params.get("name"))
        metrics.requests.labels(endpoint_label, str(status), slot, model).inc()
        metrics.request_duration.labels(endpoint_label, model).observe(time.perf_counter() - started)
        if 400 <= status < 500:
            metrics.input_errors.labels(getattr(request.state, "error_reason", "invalid")).inc()
        return response

    endpoint.__name__ = handler.__name__
    return endpoint


NAME_PARAMETER: dict[str, Any] = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                                  "description": "a served model's name (GET /models)"}
CATALOG_OPENAPI: dict[str, Any] = {"responses": {"200": {"description": "Every served model, the default first", "content": {
    "application/json": {"schema": schema(Catalog)}}}}}
TIMEOUT_PARAMETER: dict[str, Any] = {
    "name": "X-Request-Timeout-Ms", "in": "header", "required": False,
    "description": "answer within this many milliseconds or not at all (504); shortens --timeout-s for this request",
    "schema": {"type": "integer", "minimum": 1, "maximum": 10**12 - 1}}
PREDICT_OPENAPI: dict[str, Any] = {
    "responses": {"200": {"description": "The top classes", "content": {"application/json": {"schema": schema(predict.PredictResponse)}}}},
    "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}},
                   {"name": "X-Request-Key", "in": "header", "required": False, "schema": {"type": "string"}},
                   TIMEOUT_PARAMETER],
    "requestBody": {
        "required": True,
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/jpeg", "image/png", "image/webp", "application/octet-stream")},
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary"}, "top_k": {"type": "integer", "minimum": 1}}}},
            "application/json": {"schema": schema(predict.PredictJSON)},
        },
    },
}
