"""The authenticated admin API: inspect slots, load (replace or merge), canary split, promote, rollback,
each for one model (``"model"``, absent: the default one); and Triton's repository extension.

Bearer-token authentication with a constant-time comparison; with no token configured the
routes do not exist (404). The token never reaches logs, errors or the audit log: callers are
named by a short hash of their token.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from starlette.requests import Request

from service.control.controller import Controller, LoadRequest
from service.control.repository import Repository
from service.control.slots import ModelState, SharedState
from service.errors import by_name
from service.http.body import json_body
from service.http.errors import guarded, status_for
from service.http.repository import RepositoryRoutes
from service.protocols.admin import CanaryBody, LoadBody, ModelBody, check_bearer, token_id
from service.protocols.wire import schema, validate


class AdminRoutes:
    def __init__(self, token: str, controller: Controller, shared: SharedState, repository: Repository,
                 guard_settings: dict[str, Any]) -> None:
        self._token = token
        self._caller = token_id(token)
        self.controller = controller
        self.shared = shared
        self.repository = repository
        self.guard_settings = guard_settings

    def install(self, app: FastAPI) -> None:
        routes = [("/admin/models", self.models, "GET", "Both slots, canary split and every worker's versions"),
                  ("/admin/load", self.load, "POST", "Load a checkpoint into a slot (replace or merge)"),
                  ("/admin/canary", self.canary, "POST", "Set canary weight and shadow share"),
                  ("/admin/promote", self.promote, "POST", "Make the canary stable"),
                  ("/admin/rollback", self.rollback, "POST", "Drop the canary, or restore the previous stable")]
        for path, handler, method, summary in routes:
            app.add_api_route(path, guarded(self.authenticated(handler)), methods=[method], summary=summary,
                              response_model=None, openapi_extra=ADMIN_OPENAPI.get(path, {}),
                              dependencies=[Security(BEARER)])  # documents the scheme; authenticated checks it
        RepositoryRoutes(self.authenticated, self.repository, self._caller).install(app)

    def authenticated(self, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            check_bearer(request.headers.get("authorization", ""), self._token)
            return await handler(request)

        endpoint.__name__ = handler.__name__
        return endpoint

    async def models(self, request: Request) -> Response:
        state = self.shared.read()
        workers = {w: {"pid": a.pid, "generation": a.generation, "versions": a.versions, "error": a.error}
                   for w, a in sorted(self.shared.acks().items())}
        return JSONResponse({
            "model": state.default, **_model_public(state.model()), "default": state.default,
            "models": {name: _model_public(model) for name, model in state.models.items()},
            "generation": state.generation, "revision": state.revision, "rollout_error": state.rollout_error,
            "last_rejection": _with_status(self.shared.last_rejection()), "workers": workers, "guard": self.guard_settings,
            "converged": bool(workers) and all(w["generation"] >= state.generation and not w["error"] for w in workers.values()),
        })

    async def load(self, request: Request) -> Response:
        body = validate(LoadBody, await json_body(request), quote=True)
        req = LoadRequest(body.checkpoint, body.slot, body.mode, body.min_match, body.allow_new_classes, body.model)
        return JSONResponse(await asyncio.to_thread(self.controller.load, req, self._caller))

    async def canary(self, request: Request) -> Response:
        body = validate(CanaryBody, await json_body(request), quote=True)
        return JSONResponse(await asyncio.to_thread(self.controller.set_canary, body.weight, body.shadow, self._caller,
                                                    body.model))

    async def promote(self, request: Request) -> Response:
        body = validate(ModelBody, await json_body(request), quote=True)
        return JSONResponse(await asyncio.to_thread(self.controller.promote, self._caller, body.model))

    async def rollback(self, request: Request) -> Response:
        body = validate(ModelBody, await json_body(request), quote=True)
        return JSONResponse(await asyncio.to_thread(self.controller.rollback, self._caller, "manual", body.model))


def _model_public(model: ModelState) -> dict[str, Any]:
    """One model's slots as GET /admin/models shows them."""
    return {
        "stable": model.stable.public(), "canary": model.canary.public() if model.canary else None,
        "canary_weight": model.weight if model.canary else 0, "shadow": model.shadow if model.canary else 0,
        "previous_stable": model.previous_stable.version if model.previous_stable else None,
        "rollout_error": model.rollout_error,
    }


BEARER = HTTPBearer(auto_error=False, scheme_name="bearer")
ADMIN_OPENAPI: dict[str, dict[str, Any]] = {
    path: {"requestBody": {"required": model is not ModelBody, "content": {"application/json": {"schema": schema(model)}}}}
    for path, model in (("/admin/load", LoadBody), ("/admin/canary", CanaryBody), ("/admin/promote", ModelBody),
                        ("/admin/rollback", ModelBody))
}


def _with_status(rejection: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recorded rejection as the admin API shows it: with the HTTP status its error had."""
    if rejection is None:
        return None
    if "type" not in rejection:  # recorded by an earlier release, with its status
        return rejection
    shown = {k: v for k, v in rejection.items() if k != "type"}
    return {**shown, "status": status_for(by_name(rejection["type"]))}
