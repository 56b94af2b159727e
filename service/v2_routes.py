"""KServe V2 / Open Inference Protocol routes: thin adapters over the same inference path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import TypeVar

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from models import CheckpointMeta
from service.admission import Ticket
from service.app import TIMEOUT_PARAMETER, ServedContext, guarded, instrumented, model_headers
from service.dispatch import Result
from service.errors import NotFound, PayloadTooLarge
from service.predict_protocol import read_body
from service.v2_protocol import InferRequest, encode_infer_response, model_metadata, parse_infer_request, server_metadata

MAX_BATCH = 64                         # images in one V2 request
MAX_ELEMENTS = MAX_BATCH * 3 * 512 * 512  # PIXELS numbers in one V2 request
T = TypeVar("T")
V2_BODY_FACTOR = 4                     # a V2 body may hold several images: 4x --max-image-bytes


def _server_version() -> str:
    try:
        return version("headswap")
    except PackageNotFoundError:
        return "0+unknown"


class V2Routes:
    def __init__(self, ctx: ServedContext) -> None:
        self.ctx = ctx

    def install(self, app: FastAPI) -> None:
        get = {"methods": ["GET"], "response_model": None}
        app.add_api_route("/v2", self.server, summary="V2 server metadata", **get)
        app.add_api_route("/v2/health/live", self.live, summary="V2 liveness", **get)
        app.add_api_route("/v2/health/ready", self.ready, summary="V2 readiness", **get)
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{model_version}"):
            params = {"parameters": [_path_param("name")] + ([_path_param("model_version")] if "versions" in base else [])}
            app.add_api_route(base, guarded(self.metadata), summary="V2 model metadata", openapi_extra=params, **get)
            app.add_api_route(f"{base}/ready", guarded(self.model_ready), summary="V2 model readiness",
                              openapi_extra=params, **get)
            app.add_api_route(f"{base}/infer", instrumented(self.infer, "v2_infer", self.ctx.metrics), methods=["POST"], response_model=None,
                              summary="V2 inference (IMAGE BYTES or PIXELS FP32 -> PROBABILITIES)",
                              openapi_extra={**INFER_OPENAPI, "parameters": [*params["parameters"], TIMEOUT_PARAMETER]})

    async def server(self) -> Response:
        return JSONResponse(server_metadata(version=_server_version()))

    async def live(self) -> Response:
        return JSONResponse({"live": True})

    async def ready(self) -> Response:
        ready = self.ctx.is_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    def _slot_for(self, request: Request) -> str:
        """The slot a V2 path names: 404 for another model name or a version nobody serves."""
        name = request.path_params["name"]
        if name != self.ctx.model_name:
            raise NotFound(f"unknown model {name!r}: this server serves {self.ctx.model_name!r}", reason="model")
        pinned = request.path_params.get("model_version")
        views = self.ctx.views()
        if pinned is None:
            return self.ctx.route(request)
        for slot in ("stable", "canary"):
            if slot in views and views[slot].version == pinned:
                request.state.slot = slot
                return slot
        raise NotFound(f"model {name!r} has no served version {pinned!r} (serving: "
                       f"{', '.join(v.version for v in views.values())})", reason="version")

    async def metadata(self, request: Request) -> Response:
        slot = self._slot_for(request)
        view = self.ctx.views()[slot]
        versions = [v.version for v in self.ctx.views().values()]
        return JSONResponse(model_metadata(name=self.ctx.model_name, versions=versions,
                                           num_classes=view.meta.num_classes, input_size=view.meta.input_size))

    async def model_ready(self, request: Request) -> Response:
        self._slot_for(request)
        ready = self.ctx.is_ready()
        return JSONResponse({"name": self.ctx.model_name, "ready": ready}, status_code=200 if ready else 503)

    async def infer(self, request: Request) -> Response:
        slot = self._slot_for(request)
        self.ctx.require_serving()
        view = self.ctx.views()[slot]
        started = time.monotonic()
        body = await read_body(request, self.ctx.max_image_bytes * V2_BODY_FACTOR)
        parsed = parse_infer_request(body, request.headers, max_elements=MAX_ELEMENTS, max_batch=MAX_BATCH)
        deadline = self.ctx.deadline(request, parsed.timeout_s, since=started)
        if parsed.images is not None:
            for data in parsed.images:
                if len(data) > self.ctx.max_image_bytes:
                    raise PayloadTooLarge(f"an IMAGE element is {len(data)} bytes, over the limit of "
                                          f"{self.ctx.max_image_bytes}", reason="too_large")
        with self.ctx.admit(parsed.batch_size) as ticket:  # the whole request, or none of it
            results = await self._run(request, parsed, slot, view.meta, deadline, ticket)
        served = results[0]
        body, headers = encode_infer_response(
            model_name=self.ctx.model_name, model_version=served.version, request=parsed,
            probabilities=np.stack([r.probabilities for r in results]),
            class_names=self._labels(served.version),
            parameters={"slot": served.slot, "version": served.version, "batch_size": max(r.batch_size for r in results)},
        )
        return Response(body, headers={**headers, **model_headers(served)})


    async def _run(self, request: Request, parsed: InferRequest, slot: str, meta: CheckpointMeta, deadline: float,
                   ticket: Ticket) -> list[Result]:
        if parsed.images is not None:
            images = await _all(self.ctx.dispatcher.preprocess(d, meta) for d in parsed.images)
            normalized = False
        else:
            assert parsed.pixels is not None
            images, normalized = list(torch.from_numpy(parsed.pixels)), True
        k = max([o.classification for o in parsed.outputs] + [1])
        return await _all(self.ctx.infer(request, image, slot=slot, top_k=k, normalized=normalized, deadline=deadline,
                                         ticket=ticket, following=len(images) - 1 - i) for i, image in enumerate(images))

    def _labels(self, version: str) -> list[str]:
        """Class names of the version that answered (the canary may have other classes)."""
        for view in self.ctx.views().values():
            if view.version == version:
                return view.meta.class_names
        return []


async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Every call's result; once all have finished (none is left running past the request and
    its admission), the first error among them is raised."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _path_param(name: str) -> dict[str, object]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


INFER_OPENAPI = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "items": {"type": "object"}},
            "outputs": {"type": "array", "items": {"type": "object"}},
            "parameters": {"type": "object"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }},
}
