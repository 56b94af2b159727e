"""The HTTP boundary of the one error table (``service.protocols.status``): error types become status codes.

Every route is wrapped in ``guarded``: a ``RequestError`` becomes its status and
``{"error": message, **details}``; anything else is a 500 saying only "internal server error",
logged with its traceback. Starlette's own 404/405 get the same body shape (``framework_error``),
so nothing reaches LitServe's generic handler and no body carries a trace or a path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from service.errors import Overloaded, RequestError
from service.protocols import status

log = logging.getLogger("headswap.http")
Handler = Callable[[Request], Awaitable[Response]]


def status_for(kind: type[BaseException]) -> int:
    """The HTTP status for errors of type ``kind`` (``service.protocols.status``: its nearest listed type's, else 500)."""
    return status.status_for(kind).http


def status_of(exc: BaseException) -> int:
    return status_for(type(exc))


def error_headers(exc: BaseException) -> dict[str, str]:
    """Headers that go with an error's answer: Retry-After for a shed request."""
    return {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else {}


def error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(exc), **exc.details}, status_code=status_of(exc), headers=error_headers(exc) or None)


def guarded(handler: Handler) -> Handler:
    """Turn RequestErrors into their status and anything unexpected into a bare 500."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except RequestError as exc:
            request.state.error_reason = exc.reason
            return error_response(exc)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            return JSONResponse({"error": "internal server error"}, status_code=500)

    endpoint.__name__ = handler.__name__
    return endpoint


async def framework_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404/405 in our error shape, ``{"error": ...}``, keeping its headers (Allow)."""
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))
