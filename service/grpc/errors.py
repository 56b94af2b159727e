"""The gRPC boundary of the one error table (``service.protocols.status``): error types become status codes.

A ``RequestError`` ends the call with its code and message (a shed request also with ``retry-after``
in the trailing metadata, seconds, as HTTP's Retry-After); anything else ends it with INTERNAL and
"internal server error", its traceback logged, never sent.
"""

from __future__ import annotations

import logging

import grpc

from service.errors import Overloaded, RequestError
from service.protocols import status

log = logging.getLogger("headswap.grpc")
INTERNAL_MESSAGE = "internal server error"


def code_for(kind: type[BaseException]) -> grpc.StatusCode:
    """The gRPC status code for errors of type ``kind``: its nearest listed type's, else INTERNAL."""
    return grpc.StatusCode[status.status_for(kind).grpc]


def http_status(exc: BaseException) -> int:
    """What the same error is over HTTP: the ``status`` label of the request metrics, for every protocol."""
    return status.status_for(type(exc)).http


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """End the call with ``exc``'s code and message (INTERNAL, without internals, for anything unexpected)."""
    if isinstance(exc, RequestError):
        if isinstance(exc, Overloaded):
            context.set_trailing_metadata((("retry-after", str(exc.retry_after)),))
        await context.abort(code_for(type(exc)), str(exc))
    log.error("unexpected error in gRPC %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
