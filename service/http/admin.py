"""The authenticated admin API: inspect slots, load (replace or merge), canary split, promote, rollback.

Bearer-token authentication with a constant-time comparison; with no token configured the
routes do not exist (404). The token never reaches logs, errors or the audit log: callers are
named by a short hash of their token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any

from fastapi import FastAPI, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from starlette.requests import Request

from service.control.controller import Controller, LoadRequest
from service.control.slots import SharedState
from service.protocols.admin import CanaryBody, LoadBody
from service.protocols.wire import load_object, schema, validate
from service.errors import RequestError, Unauthorized, by_name
from service.http.errors import guarded, status_for



def token_id(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:8]


class AdminRoutes:
    def __init__(self, token: str, controller: Controller, shared: SharedState, model_name: str,
                 guard_settings: dict[str, Any]) -> None:
        self._token = token.encode()
        self._caller = token_id(token)
        self.controller = controller
        self.shared = shared
        self.model_name = model_name
        self.guard_settings = guard_settings

    def install(self, app: FastAPI) -> None:
        routes = [("/admin/models", self.models, "GET", "Both slots, canary split and every worker's versions"),
                  ("/admin/load", self.load, "POST", "Load a checkpoint into a slot (replace or merge)"),
                  ("/admin/canary", self.canary, "POST", "Set canary weight and shadow share"),
                  ("/admin/promote", self.promote, "POST", "Make the canary stable"),
                  ("/admin/rollback", self.rollback, "POST", "Drop the canary, or restore the previous stable")]
        for path, handler, method, summary in routes:
            app.add_api_route(path, guarded(self._authenticated(handler)), methods=[method], summary=summary,
                              response_model=None, openapi_extra=ADMIN_OPENAPI.get(path, {}),
                              dependencies=[Security(BEARER)])  # documents the scheme; _authenticated checks it

    def _authenticated(self, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
                raise Unauthorized("missing or wrong admin token: send Authorization: Bearer <token>", reason="auth")
            return await handler(request)

        endpoint.__name__ = handler.__name__
        return endpoint

    async def models(self, request: Request) -> Response:
        state = self.shared.read()
        workers = {w: {"pid": a.pid, "generation": a.generation, "versions": a.versions, "error": a.error}
                   for w, a in sorted(self.shared.acks().items())}
        return JSONResponse({
            "model": self.model_name, "generation": state.generation, "revision": state.revision,
            "stable": state.stable.public(), "canary": state.canary.public() if state.canary else None,
            "canary_weight": state.weight if state.canary else 0, "shadow": state.shadow if state.canary else 0,
            "previous_stable": state.previous_stable.version if state.previous_stable else None,
            "rollout_error": state.rollout_error, "last_rejection": _with_status(self.shared.last_rejection()),
            "workers": workers, "guard": self.guard_settings,
            "converged": bool(workers) and all(w["generation"] >= state.generation and not w["error"] for w in workers.values()),
        })

    async def load(self, request: Request) -> Response:
        body = validate(LoadBody, await _json_body(request), quote=True)
        req = LoadRequest(body.checkpoint, body.slot, body.mode, body.min_match, body.allow_new_classes)
        return JSONResponse(await asyncio.to_thread(self.controller.load, req, self._caller))

    async def canary(self, request: Request) -> Response:
        body = validate(CanaryBody, await _json_body(request), quote=True)
        current = self.shared.read()
        weight = current.weight if body.weight is None else body.weight
        shadow = current.shadow if body.shadow is None else body.shadow
        return JSONResponse(await asyncio.to_thread(self.controller.set_canary, weight, shadow, self._caller))

    async def promote(self, request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(self.controller.promote, self._caller))

    async def rollback(self, request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(self.controller.rollback, self._caller))


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > 64 * 1024:
        raise RequestError("admin request body over 64 KiB", reason="body")
    return load_object(raw or b"{}", what="admin request body", reason="body")


BEARER = HTTPBearer(auto_error=False, scheme_name="bearer")
ADMIN_OPENAPI: dict[str, dict[str, Any]] = {
    path: {"requestBody": {"required": True, "content": {"application/json": {"schema": schema(model)}}}}
    for path, model in (("/admin/load", LoadBody), ("/admin/canary", CanaryBody))
}


def _with_status(rejection: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recorded rejection as the admin API shows it: with the HTTP status its error had."""
    if rejection is None:
        return None
    if "type" not in rejection:  # recorded by an earlier release, with its status
        return rejection
    shown = {k: v for k, v in rejection.items() if k != "type"}
    return {**shown, "status": status_for(by_name(rejection["type"]))}
