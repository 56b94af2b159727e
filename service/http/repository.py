"""Triton's model-repository extension over the served models: index, load, unload.

``POST /v2/repository/index`` lists every served model (``READY`` once every worker holds it);
``POST /v2/repository/models/{name}/load`` serves ``{name}.safetensors`` (else ``{name}.pt``) from
the checkpoint store, or what ``parameters.config`` names (``{"checkpoint", "merges"}``, the JSON
text tritonclient's ``load_model(name, config=...)`` sends), as a new model or a new stable
version of a served one; ``.../unload`` stops serving it. The admin token is required, as for
``/admin``; tritonclient passes it as a header (``headers={"Authorization": "Bearer ..."}``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from service.control.controller import Controller
from service.control.slots import SharedState
from service.control.store import CheckpointStore
from service.errors import NotFound
from service.http.body import json_body
from service.http.errors import guarded
from service.protocols.admin import RepositoryConfig, RepositoryIndexBody, RepositoryLoadBody, check_model_name
from service.protocols.wire import load_object, schema, validate

Authenticated = Callable[[Any], Any]


class RepositoryRoutes:
    def __init__(self, authenticated: Authenticated, controller: Controller, shared: SharedState, store: CheckpointStore,
                 caller: str) -> None:
        self.authenticated = authenticated
        self.controller = controller
        self.shared = shared
        self.store = store
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
        state = self.shared.read()
        serving, holding = self.shared.held()
        entries = []
        for name in state.names():
            ready = name in serving
            reason = ("loading" if not ready else "" if name in holding
                      else "evicted (--memory-budget-mb): loaded again on its next request")
            entries.append({"name": name, "version": state.models[name].stable.version,
                            "state": "READY" if ready else "UNAVAILABLE", "reason": reason})
        return JSONResponse([e for e in entries if e["state"] == "READY"] if body.ready else entries)

    async def load(self, request: Request) -> Response:
        name = request.path_params["name"]
        check_model_name(name)
        body = validate(RepositoryLoadBody, await json_body(request, "repository request body"), quote=True)
        if body.parameters is None:
            checkpoint, merges = self._default_checkpoint(name), ()
        else:
            config = validate(RepositoryConfig, load_object(body.parameters.config.encode(), what="parameters.config",
                                                            reason="body"), where="parameters.config")
            checkpoint, merges = config.checkpoint, tuple(config.merges)
        await asyncio.to_thread(self.controller.add_model, name, checkpoint, merges, self.caller)
        return Response(status_code=200)

    async def unload(self, request: Request) -> Response:
        name = request.path_params["name"]
        check_model_name(name)
        await json_body(request, "repository request body")  # Triton's unload parameters (unload_dependents) change nothing here
        await asyncio.to_thread(self.controller.remove_model, name, self.caller)
        return Response(status_code=200)

    def _default_checkpoint(self, name: str) -> str:
        for suffix in (".safetensors", ".pt"):
            if (self.store.root / f"{name}{suffix}").is_file():
                return f"{name}{suffix}"
        raise NotFound(f"no {name}.safetensors or {name}.pt in the checkpoint store: name the checkpoint in "
                       "parameters.config", reason="checkpoint")
