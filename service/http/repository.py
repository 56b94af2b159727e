"""Triton's model-repository extension over HTTP (``service.control.repository`` does the work).

``POST /v2/repository/index``, ``POST /v2/repository/models/{name}/load`` and ``.../unload``. The
admin token is required, as for ``/admin``; tritonclient passes it as a header
(``headers={"Authorization": "Bearer ..."}``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from service.control.repository import Repository
from service.http.body import json_body
from service.http.errors import guarded
from service.protocols.admin import RepositoryIndexBody, RepositoryLoadBody
from service.protocols.wire import schema, validate

Authenticated = Callable[[Any], Any]


class RepositoryRoutes:
    def __init__(self, authenticated: Authenticated, repository: Repository, caller: str) -> None:
        self.authenticated = authenticated
        self.repository = repository
        self.caller = caller

    def install(self, app: FastAPI) -> None:
        routes = [("/v2/repository/index", self.index, RepositoryIndexBody, "Every served model and its state"),
                  ("/v2/repository/models/{name}/load", self.load, RepositoryLoadBody, "Serve a checkpoint as model {name}"),
                  ("/v2/repository/models/{name}/unload", self.unload, None, "Stop serving model {name}")]
        for path, handler, body, summary in routes:
            extra: dict[str, Any] = {"requestBody": {"required": False, "content": {"application/json": {"schema": schema(body)}}}
                                     } if body else {}
            if "{name}" in path:
                extra["parameters"] = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                                        "description": "the model's name (1-64 of A-Z a-z 0-9 _ . -)"}]
            app.add_api_route(path, guarded(self.authenticated(handler)), methods=["POST"], summary=summary,
                              response_model=None, openapi_extra=extra)

    async def index(self, request: Request) -> Response:
        body = validate(RepositoryIndexBody, await json_body(request, "repository request body"), quote=True)
        return JSONResponse(self.repository.index(bool(body.ready)))

    async def load(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = validate(RepositoryLoadBody, await json_body(request, "repository request body"), quote=True)
        config = None if body.parameters is None else body.parameters.config
        await asyncio.to_thread(self.repository.load, name, config, self.caller)
        return Response(status_code=200)

    async def unload(self, request: Request) -> Response:
        await json_body(request, "repository request body")  # Triton's unload parameters (unload_dependents) change nothing here
        await asyncio.to_thread(self.repository.unload, request.path_params["name"], self.caller)
        return Response(status_code=200)
