"""KServe V2 / Open Inference Protocol routes: thin adapters from the V2 wire format to the data plane."""

from __future__ import annotations

import time

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from service.http.body import read_body
from service.http.errors import guarded
from service.http.routes import TIMEOUT_PARAMETER, instrumented, model_headers
from service.inference.dataplane import DataPlane, InferenceRequest
from service.observability.metrics import Metrics
from service.protocols import v2_models
from service.protocols.v2 import (
    BODY_FACTOR,
    MAX_BATCH,
    MAX_ELEMENTS,
    check_image_sizes,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
    server_metadata,
)
from service.protocols.wire import schema
from service.settings import server_version


class V2Routes:
    def __init__(self, plane: DataPlane, metrics: Metrics, max_image_bytes: int) -> None:
        self.plane = plane
        self.metrics = metrics
        self.max_image_bytes = max_image_bytes

    def install(self, app: FastAPI) -> None:
        get = {"methods": ["GET"], "response_model": None}
        app.add_api_route("/v2", self.server, summary="V2 server metadata", **get)
        app.add_api_route("/v2/health/live", self.live, summary="V2 liveness", **get)
        app.add_api_route("/v2/health/ready", self.ready, summary="V2 readiness", **get)
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{model_version}"):
            params = {"parameters": [_path_param("name")] + ([_path_param("model_version")] if "versions" in base else [])}
            app.add_api_route(base, guarded(self.metadata), summary="V2 model metadata",
                              openapi_extra={**params, **METADATA_OPENAPI}, **get)
            app.add_api_route(f"{base}/ready", guarded(self.model_ready), summary="V2 model readiness",
                              openapi_extra=params, **get)
            app.add_api_route(f"{base}/infer", instrumented(self.infer, "v2_infer", self.metrics, self.plane.metric_model), methods=["POST"],
                              response_model=None, summary="V2 inference (IMAGE BYTES or PIXELS FP32 -> PROBABILITIES)",
                              openapi_extra={**INFER_OPENAPI, "parameters": [*params["parameters"], TIMEOUT_PARAMETER]})

    async def server(self) -> Response:
        return JSONResponse(server_metadata(version=server_version()))

    async def live(self) -> Response:
        return JSONResponse({"live": True})

    async def ready(self) -> Response:
        ready = self.plane.is_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    def _resolve(self, request: Request) -> str | None:
        """The pinned slot of a V2 path (None: routed); 404 for another model or a version nobody serves."""
        slot = self.plane.resolve(request.path_params["name"], request.path_params.get("model_version"))
        if slot is not None:
            request.state.slot = slot
        return slot

    async def metadata(self, request: Request) -> Response:
        slot = self._resolve(request) or "stable"
        name = request.path_params["name"]
        views = self.plane.views(name)
        view = views[slot]
        return JSONResponse(model_metadata(name=name, versions=[v.version for v in views.values()],
                                           num_classes=view.meta.num_classes, input_size=view.meta.input_size))

    async def model_ready(self, request: Request) -> Response:
        self._resolve(request)
        ready = self.plane.is_ready()
        return JSONResponse({"name": request.path_params["name"], "ready": ready}, status_code=200 if ready else 503)

    async def infer(self, request: Request) -> Response:
        started = time.monotonic()
        self._resolve(request)
        body = await read_body(request, self.max_image_bytes * BODY_FACTOR)
        parsed = parse_infer_request(body, request.headers, max_elements=MAX_ELEMENTS, max_batch=MAX_BATCH)
        check_image_sizes(parsed.images, self.max_image_bytes)
        inference = await self.plane.infer(InferenceRequest(
            images=parsed.images, pixels=parsed.pixels, top_k=parsed.top_k,
            timeout_s=parsed.timeout_s, started=started, key=request.headers.get("x-request-key"),
            version=request.path_params.get("model_version"), model=request.path_params["name"]),
            routed=lambda slot: setattr(request.state, "slot", slot))
        served = inference.first
        body, headers = encode_infer_response(
            model_name=inference.view.name, model_version=served.version, request=parsed,
            probabilities=np.stack([r.probabilities for r in inference.results]), class_names=inference.view.meta.class_names,
            parameters={"slot": served.slot, "version": served.version,
                        "batch_size": max(r.batch_size for r in inference.results)},
        )
        return Response(body, headers={**headers, **model_headers(served)})


def _path_param(name: str) -> dict[str, object]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


INFER_OPENAPI = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": schema(v2_models.InferenceRequest)},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "the JSON header, then binary tensor data (Inference-Header-Content-Length)"},
    }},
    "responses": {"200": {"description": "The outputs", "content": {
        "application/json": {"schema": schema(v2_models.InferenceResponse)},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
}
METADATA_OPENAPI = {"responses": {"200": {"description": "Model metadata", "content": {
    "application/json": {"schema": schema(v2_models.ModelMetadata)}}}}}
