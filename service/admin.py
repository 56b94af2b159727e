"""The authenticated admin API: inspect slots, load (replace or merge), canary split, promote, rollback.

Bearer-token authentication with a constant-time comparison; with no token configured the
routes do not exist (404). The token never reaches logs, errors or the audit log: callers are
named by a short hash of their token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

from fastapi import FastAPI, Security
from fastapi.security import HTTPBearer
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from service.app import guarded
from service.controller import Controller, LoadRequest
from service.errors import RequestError, Unauthorized
from service.slots import SharedState

SLOTS = ("stable", "canary")
MODES = ("replace", "merge")


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
            "rollout_error": state.rollout_error, "last_rejection": self.shared.last_rejection(),
            "workers": workers, "guard": self.guard_settings,
            "converged": bool(workers) and all(w["generation"] >= state.generation and not w["error"] for w in workers.values()),
        })

    async def load(self, request: Request) -> Response:
        body = await _json_body(request)
        unknown = set(body) - {"checkpoint", "slot", "mode", "min_match", "allow_new_classes"}
        if unknown:
            raise RequestError(f"unknown fields {sorted(unknown)}", reason="body")
        checkpoint = body.get("checkpoint")
        if not isinstance(checkpoint, str) or not checkpoint:
            raise RequestError('"checkpoint" must be a path inside the checkpoint store', reason="body")
        slot, mode = body.get("slot", "stable"), body.get("mode", "replace")
        if slot not in SLOTS or mode not in MODES:
            raise RequestError(f'"slot" must be stable or canary and "mode" replace or merge, found {slot!r}, {mode!r}', reason="body")
        min_match = body.get("min_match", 0.0)
        if isinstance(min_match, bool) or not isinstance(min_match, (int, float)) or not 0 <= min_match <= 1:
            raise RequestError('"min_match" must be a number within [0, 1]', reason="body")
        allow = body.get("allow_new_classes", False)
        if not isinstance(allow, bool):
            raise RequestError('"allow_new_classes" must be true or false', reason="body")
        req = LoadRequest(checkpoint, slot, mode, float(min_match), allow)
        return JSONResponse(await asyncio.to_thread(self.controller.load, req, self._caller))

    async def canary(self, request: Request) -> Response:
        body = await _json_body(request)
        current = self.shared.read()
        weight, shadow = body.get("weight", current.weight), body.get("shadow", current.shadow)
        if set(body) - {"weight", "shadow"} or not all(type(v) is int and 0 <= v <= 100 for v in (weight, shadow)):
            raise RequestError('body must be {"weight": 0-100, "shadow": 0-100} (integers)', reason="body")
        return JSONResponse(await asyncio.to_thread(self.controller.set_canary, weight, shadow, self._caller))

    async def promote(self, request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(self.controller.promote, self._caller))

    async def rollback(self, request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(self.controller.rollback, self._caller))


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > 64 * 1024:
        raise RequestError("admin request body over 64 KiB", reason="body")
    try:
        body = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError("admin request body must be a JSON object", reason="body") from None
    if not isinstance(body, dict):
        raise RequestError("admin request body must be a JSON object", reason="body")
    return body


BEARER = HTTPBearer(auto_error=False, scheme_name="bearer")
ADMIN_OPENAPI: dict[str, dict[str, Any]] = {
    "/admin/load": {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["checkpoint"], "properties": {
            "checkpoint": {"type": "string"}, "slot": {"type": "string", "enum": list(SLOTS)},
            "mode": {"type": "string", "enum": list(MODES)}, "min_match": {"type": "number", "minimum": 0, "maximum": 1},
            "allow_new_classes": {"type": "boolean"}}}}}}},
    "/admin/canary": {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"weight": {"type": "integer", "minimum": 0, "maximum": 100},
                                         "shadow": {"type": "integer", "minimum": 0, "maximum": 100}}}}}}},
}
